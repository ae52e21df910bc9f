"""Segment-level long-text encoding (LongAlign, SPEC §1 steps 2-4).

For a caption split into segments ``s_1 .. s_n`` (:mod:`.segments`), every segment is tokenised to
one CLIP window ``[BOS, tokens, EOS, pad ...]`` and all windows of all captions go through the
text encoder in **one** forward. For caption ``b`` the kept rows are, segment by segment, the
positions before EOS (each segment keeps its own BOS):

    c_b = concat_i  E(s_i)[:eos_i]                      shape (n_kept, D)

then ``c_b`` is cut to ``L`` rows or padded up to ``L`` with the pad embedding

    p = mean_{j = 17..76} E("")_j                        (the last 60 positions of the empty prompt)

so the output is ``(B, L, D)``. ``L = 0`` keeps the natural length (no truncation, no padding).

The encoder itself is injected as a :class:`TextEncoderBackend`: the ComfyUI node drives ComfyUI's
CLIP object through it (keeping ComfyUI's ``(word:1.2)`` and ``embedding:`` syntax), the trainer a
transformers ``CLIPTextModel`` (:mod:`.clip_text`). Splitting, masks, padding and length live here
only, so the node and the trainer give the same tensors for the same weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Literal, NamedTuple, Protocol, Sequence

import torch

from .segments import pack_words, split_sentences

SplitRule = Literal["sentences", "native"]
PadPolicy = Literal["mean", "none"]
PAD_EMBEDDING_POSITIONS = 60
"""The reference averages the last 60 of the empty prompt's 77 positions (all padding)."""
TOKENIZE_CHARS = 1500
"""Characters of sentences per tokenizer call: about 300 CLIP tokens of English, so that L = 240
usually takes one call and text far past L is not tokenised."""


class SegmentRow(NamedTuple):
    """One encoder window: ``payload`` is what the backend encodes; positions ``[0, end)`` are BOS
    and content (``end`` is the EOS position), positions from ``end`` on are EOS and padding."""

    end: int
    payload: object


class TextEncoderBackend(Protocol):
    """What :func:`encode_long_prompts` needs from a CLIP text encoder."""

    window: int
    """Positions per row, BOS and EOS included (77 for CLIP)."""

    def tokenize(self, text: str) -> list[SegmentRow]:
        """Rows for ``text``: one window, or several for text longer than ``window - 2`` tokens."""

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[SegmentRow]]:
        """``[tokenize(t) for t in texts]``, in as few tokenizer calls as the backend can."""

    def encode(self, rows: Sequence[SegmentRow], length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states ``(len(rows), T, D)`` with ``T >= length``, and the pooled output ``(1, P)`` of
        the first row (ComfyUI's convention), or ``(len(rows), P)`` of every row, or None.

        Every row is padded to at least ``length`` positions; a backend may use more (ComfyUI's CLIP
        always runs full windows), which changes nothing before EOS (the encoder is causal).
        """


@dataclass(frozen=True)
class SegmentOptions:
    """How a prompt becomes segments and a fixed-length conditioning (defaults = the reference)."""

    split: SplitRule = "sentences"
    """``sentences``: LongAlign segments; ``native``: ComfyUI's own 77-token windows, all positions kept."""
    token_length: int = 240
    """L: rows of the output; 0 = natural length (no truncation, no padding)."""
    pad: PadPolicy = "mean"
    """``mean``: pad to L with the mean padding embedding; ``none``: truncate only."""
    keep_bos: bool = True
    """Every segment keeps its BOS row (reference); False keeps only the first segment's."""

    def __post_init__(self) -> None:
        if self.split not in ("sentences", "native"):
            raise ValueError(f"split must be 'sentences' or 'native', got {self.split!r}")
        if self.pad not in ("mean", "none"):
            raise ValueError(f"pad must be 'mean' or 'none', got {self.pad!r}")
        if not isinstance(self.token_length, int) or self.token_length < 0:
            raise ValueError(f"token_length must be an integer >= 0, got {self.token_length!r}")


@dataclass
class LongPromptEncoding:
    """The result for a batch of prompts."""

    cond: torch.Tensor
    """(B, L, D) conditioning; with L = 0 and pad 'none', (B, max kept, D) only when all are equal."""
    pooled: torch.Tensor | None
    """(1, P): the pooled output of the first prompt's first segment (ComfyUI's convention, used by
    SDXL), or, from a backend that pools every row, (B, P): each prompt's first segment's; or None."""
    segments: list[list[str]] = field(default_factory=list)
    """The segment texts of each prompt that were encoded (those starting past L are not)."""
    kept_tokens: list[int] = field(default_factory=list)
    """Rows each prompt produced before truncation or padding to L."""


def segment_rows(
    text: str, backend: TextEncoderBackend, split: SplitRule = "sentences"
) -> Iterator[tuple[str, list[SegmentRow]]]:
    """The segments a prompt is encoded as, each with its tokenised rows, in order; lazily, so that a
    caller that stops (the encoder, at L rows) tokenises few segments past that point.

    ``sentences``: :func:`.segments.split_sentences` (which normalises the text as the reference's
    ftfy tokenizer did), tokenised :data:`TOKENIZE_CHARS` characters of sentences per tokenizer call;
    a sentence longer than one window is packed at word boundaries. ``native``: the raw prompt as
    ComfyUI's stock windows, untouched, so that it equals the stock node.
    """
    if split == "native":
        yield text, backend.tokenize(text)
        return
    limit = backend.window - 2

    def count(t: str) -> int:
        return sum(row.end - 1 for row in backend.tokenize(t))

    for batch in _char_batches(split_sentences(text), TOKENIZE_CHARS):
        for sentence, rows in zip(batch, backend.tokenize_batch(batch)):
            if len(rows) == 1:
                yield sentence, rows
            else:
                yield from ((piece, backend.tokenize(piece)) for piece in pack_words(sentence, count, limit))


def _char_batches(sentences: list[str], chars: int) -> Iterator[list[str]]:
    """Consecutive runs of ``sentences`` of about ``chars`` characters (at least one sentence each)."""
    batch: list[str] = []
    size = 0
    for sentence in sentences:
        if batch and size + len(sentence) > chars:
            yield batch
            batch, size = [], 0
        batch.append(sentence)
        size += len(sentence) + 1
    if batch:
        yield batch


def pad_embedding(backend: TextEncoderBackend) -> torch.Tensor:
    """``p`` = mean of the last 60 positions of the empty prompt's full window, shape (D,)."""
    hidden, _ = backend.encode(backend.tokenize(""), backend.window)
    return hidden[0, backend.window - PAD_EMBEDDING_POSITIONS: backend.window].mean(dim=0)


def _kept_rows(hidden: torch.Tensor, row: SegmentRow, first: bool, options: SegmentOptions) -> torch.Tensor:
    """Rows of one window that enter the concatenation (all of them for ``native``)."""
    if options.split == "native":
        return hidden
    start = 0 if (first or options.keep_bos) else 1
    return hidden[start: row.end]


def encode_long_prompts(
    texts: Sequence[str],
    backend: TextEncoderBackend,
    options: SegmentOptions = SegmentOptions(),
    pad: torch.Tensor | None = None,
) -> LongPromptEncoding:
    """Encode ``texts`` segment by segment in one encoder forward (see the module docstring).

    ``pad`` is a precomputed pad embedding (:func:`pad_embedding`); without it, and when padding is
    needed, the empty prompt joins the same forward. Pass it when the encoder is frozen (trainer).
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of prompts, not a single string")
    if len(texts) == 0:
        raise ValueError("texts is empty: give at least one prompt (use '' for the empty prompt)")
    L = options.token_length
    rows: list[SegmentRow] = []
    owners: list[tuple[int, bool]] = []  # (prompt index, is that prompt's first row)
    segments: list[list[str]] = []
    for b, text in enumerate(texts):
        kept = 0
        segments.append([])
        for segment, seg_rows in segment_rows(text, backend, options.split):
            if L and kept >= L:  # segments past L would be cut anyway: neither tokenised nor encoded
                break
            segments[b].append(segment)
            for row in seg_rows:
                if L and kept >= L:
                    break
                first = kept == 0
                rows.append(row)
                owners.append((b, first))
                kept += backend.window if options.split == "native" else row.end - (0 if first or options.keep_bos else 1)

    want_pad = options.pad == "mean" and L > 0
    length = max(row.end for row in rows) + 1
    if options.split == "native":
        length = backend.window
    joint_pad = want_pad and pad is None
    if joint_pad:
        rows.append(backend.tokenize("")[0])
        length = backend.window
    hidden, pooled = backend.encode(rows, length)
    if options.split == "native":
        hidden = hidden[:, : backend.window]
    if joint_pad:
        pad = hidden[-1, backend.window - PAD_EMBEDDING_POSITIONS: backend.window].mean(dim=0)

    per_prompt: list[list[torch.Tensor]] = [[] for _ in texts]
    for i, ((b, first), row) in enumerate(zip(owners, rows)):
        per_prompt[b].append(_kept_rows(hidden[i], row, first, options))

    conds: list[torch.Tensor] = []
    kept_tokens: list[int] = []
    for parts in per_prompt:
        c = torch.cat(parts, dim=0)
        kept_tokens.append(c.shape[0])
        if L:
            c = c[:L]
            if want_pad and c.shape[0] < L:
                c = torch.cat([c, pad.to(c.dtype).expand(L - c.shape[0], -1)], dim=0)
        conds.append(c)
    if len({c.shape[0] for c in conds}) != 1:
        raise ValueError(
            f"prompts encode to different lengths {[c.shape[0] for c in conds]}: a batch needs "
            "token_length > 0 with pad 'mean'"
        )
    if pooled is not None and pooled.shape[0] == len(rows) > 1:  # one per row: each prompt's first row
        pooled = pooled[[i for i, (_, first) in enumerate(owners) if first]]
    return LongPromptEncoding(torch.stack(conds), pooled, segments, kept_tokens)
