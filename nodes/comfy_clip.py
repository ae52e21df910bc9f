"""ComfyUI's CLIP object as a :class:`training.encode.TextEncoderBackend`.

Tokenising goes through ``clip.tokenize`` (plain sentences through the same tokenizers, batched) and
encoding through ``clip.encode_from_tokens``, so ComfyUI's prompt weighting ``(word:1.2)``,
``embedding:`` names, clip-skip and LoRA patches keep their meaning inside every segment. Glue only:
no ComfyUI import is needed (the CLIP is passed in).
"""
from __future__ import annotations

import contextlib
import re
import weakref
from collections import OrderedDict
from typing import Iterator, Sequence

import torch

from ..training.encode import SegmentRow, pad_embedding

SUPPORTED_ENCODERS = {"l", "g", "h"}  # SD1.x (l), SD2.x (h), SDXL (g + l)
_PAD_CACHE: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_PAD_CACHE_SIZE = 8


class _LeadingPositions(torch.nn.Module):
    """Stands in for a CLIP position embedding during one forward: ``weight`` is a view of the first
    ``length`` rows of the real table, so rows shorter than 77 tokens can be encoded."""

    def __init__(self, weight: torch.Tensor, length: int) -> None:
        super().__init__()
        self.weight = weight[:length]


@contextlib.contextmanager
def _short_rows(text_models: Sequence[torch.nn.Module], length: int) -> Iterator[None]:
    """Let ComfyUI's CLIP encode ``length``-token rows; the original modules are always restored.

    ComfyUI's CLIP adds its whole position table (77 rows) to the token embeddings. CLIP is causal,
    so positions before EOS do not depend on the padding after it: encoding a segment in a row cut
    right after its EOS gives the same kept rows as a full window, at a fraction of the cost.

    The table is swapped inside each text model's forward (a pre-hook), so after ComfyUI's own
    ``load_model`` in ``encode_from_tokens`` has patched and placed the weights: no extra load
    (on a GPU, each load is a few host-side memory queries, 0.3-0.6 ms in bench/RESULTS.md run 1).
    """
    swapped: dict[torch.nn.Module, torch.nn.Module] = {}

    def swap(text_model: torch.nn.Module, _args) -> None:
        embeddings = text_model.embeddings
        swapped.setdefault(embeddings, embeddings.position_embedding)
        embeddings.position_embedding = _LeadingPositions(swapped[embeddings].weight, length)

    def restore(text_model: torch.nn.Module, _args, _output) -> None:
        text_model.embeddings.position_embedding = swapped.pop(text_model.embeddings)

    handles = [h for m in text_models
               for h in (m.register_forward_pre_hook(swap), m.register_forward_hook(restore))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for embeddings, original in swapped.items():
            embeddings.position_embedding = original


_TEXT_MODELS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()
"""Per CLIP model: its text models (the modules whose ``embeddings`` is a CLIPEmbeddings)."""
_EMPTY: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()
"""Per tokenizer: ``clip.tokenize("")``."""
EMBEDDING_PREFIX = "embedding:"
"""ComfyUI's prompt syntax for a textual-inversion embedding."""


def _text_models(clip) -> tuple:
    """The modules that add ComfyUI's CLIP position table in their forward (found once per model)."""
    model = clip.cond_stage_model
    if model not in _TEXT_MODELS:
        _TEXT_MODELS[model] = tuple(
            m for m in model.modules()
            if type(getattr(m, "embeddings", None)).__name__ == "CLIPEmbeddings"
            and hasattr(m.embeddings, "position_embedding"))
    return _TEXT_MODELS[model]


def _empty_prompt(clip, cached: bool) -> dict:
    """``clip.tokenize("")``: per encoder key, the window ``[start, end, pad ...]`` as ComfyUI builds
    it (``cached``: once per tokenizer; a CLIP with tokenizer options needs it every time)."""
    if not cached:
        return clip.tokenize("")
    if clip.tokenizer not in _EMPTY:
        _EMPTY[clip.tokenizer] = clip.tokenize("")
    return _EMPTY[clip.tokenizer]


MAX_BRACKET_DEPTH = 32
"""Deepest ``(...)`` nesting a prompt may hold. ComfyUI's weight parser recurses once per level and
copies the text at each, so a few thousand levels cost minutes of CPU and end in a RecursionError;
``(((a)))`` is already ``a`` at 1.1^3."""


def check_bracket_depth(text: str, what: str) -> None:
    """ValueError naming ``what`` when ``text`` nests matched, unescaped brackets deeper than
    :data:`MAX_BRACKET_DEPTH` (``\\(`` and ``\\)`` are literal, as in ComfyUI)."""
    opened: list[int] = []
    steps: list[tuple[int, int]] = []  # (position, +1 where a matched pair opens / -1 after it closes)
    for match in re.finditer(r"[()]", text.replace("\\(", "").replace("\\)", "")):
        if match.group() == "(":
            opened.append(match.start())
        elif opened:
            steps += [(opened.pop(), 1), (match.start(), -1)]
    depth = deepest = 0
    for _, step in sorted(steps):
        depth += step
        deepest = max(deepest, depth)
    if deepest > MAX_BRACKET_DEPTH:
        raise ValueError(f"{what}: brackets are nested {deepest} deep; at most {MAX_BRACKET_DEPTH} levels of "
                         "(weight) brackets are accepted (escape literal ones as \\( \\))")


def _plain(text: str) -> bool:
    """Text without ComfyUI prompt syntax (weights, escapes, embeddings): ComfyUI tokenises it as the
    CLIP BPE does, all weights 1."""
    return not any(c in text for c in "()\\") and EMBEDDING_PREFIX not in text


class ComfyClipBackend:
    """Segments through ComfyUI's CLIP object (SD1.x, SD2.x, SDXL, and a Long-CLIP-L loaded by ComfyUI
    from its position count, whose window is 248 positions: segments then hold up to 246 tokens).

    Plain sentences are tokenised together (:meth:`tokenize_batch`); rows are cut to
    the longest segment in the batch (see :func:`_short_rows`); the pad embedding, which needs the
    full 77-token empty prompt, is cached per CLIP weights (patch set) and layer.
    """

    window = 77

    def __init__(self, clip) -> None:
        self.clip = clip
        # no tokenizer option (padding) changes ComfyUI's windows: the empty prompt's window is cached
        # and plain sentences are windowed here (_plain_rows)
        self._default_windows = not getattr(clip, "tokenizer_options", None)
        self._empty = _empty_prompt(clip, cached=self._default_windows)
        keys = set(self._empty)
        if not keys or not keys <= SUPPORTED_ENCODERS:
            raise ValueError(
                "LongAlign Text Encode needs an SD1.x, SD2.x or SDXL CLIP (CLIP-L/H/G encoders); "
                f"this CLIP has text encoders {sorted(keys)}"
            )
        self.keys = sorted(keys, key=lambda k: k != "l")  # masks read from 'l' when present
        windows = {f"clip_{k}": len(self._empty[k][0]) for k in self.keys}
        if len(set(windows.values())) > 1:
            raise ValueError(
                "LongAlign Text Encode: this CLIP's text encoders take prompts of different lengths "
                f"({', '.join(f'{k} {n}' for k, n in windows.items())} positions), as a Long-CLIP-L beside "
                "SDXL's CLIP-G does; use text encoders of one length (Long-CLIP-L alone for SD1.x)"
            )
        self._text_models = _text_models(clip)
        first = self._empty[self.keys[0]][0]
        self.window = len(first)
        self.end_token = first[1][0]

    def _end(self, window: list) -> int:
        for j in range(1, len(window)):
            token = window[j][0]
            if not torch.is_tensor(token) and isinstance(token, int) and token == self.end_token:
                return j
        return len(window)

    def tokenize(self, text: str) -> list[SegmentRow]:
        tokens = self.clip.tokenize(text)
        n = len(tokens[self.keys[0]])
        return [
            SegmentRow(self._end(tokens[self.keys[0]][i]), {k: tokens[k][i] for k in self.keys})
            for i in range(n)
        ]

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[SegmentRow]]:
        """``[tokenize(t) for t in texts]``, with the plain texts (:func:`_plain`) tokenised together
        (:meth:`_plain_rows`): one tokenizer call per encoder, as the stock node makes for the same
        text, instead of one ``clip.tokenize`` per sentence (on a GPU the node's cost is host time)."""
        plain = [i for i, t in enumerate(texts) if _plain(t)] if self._default_windows else []
        rows = dict(zip(plain, self._plain_rows([texts[i] for i in plain]))) if len(plain) > 1 else {}
        return [rows[i] if i in rows else self.tokenize(t) for i, t in enumerate(texts)]

    def _plain_rows(self, texts: list[str]) -> list[list[SegmentRow]]:
        """Each text's window as ``clip.tokenize(text)`` builds it for plain text, from one batched
        call of ComfyUI's own tokenizer per encoder: ``[start, *ids, end, pad ...]`` with the ids that
        ComfyUI's ``SDTokenizer`` takes (``tokenizer(text)["input_ids"][tokens_start:end]``), all weights
        1, and the empty prompt's start, end and padding. A text longer than one window, or a CLIP
        whose tokenizer is not laid out as ComfyUI's SD1/SD2/SDXL ones, is tokenised on its own."""
        tokenizers = {k: getattr(self.clip.tokenizer, f"clip_{k}", None) for k in self.keys}
        if not all(hasattr(t, "tokenizer") and hasattr(t, "tokens_start") for t in tokenizers.values()):
            return [self.tokenize(t) for t in texts]
        ids = {}
        for k, sd in tokenizers.items():
            end = -1 if getattr(sd, "tokenizer_adds_end_token", True) else None
            ids[k] = [row[sd.tokens_start:end] for row in sd.tokenizer(list(texts))["input_ids"]]
        out = []
        for i, text in enumerate(texts):
            n = len(ids[self.keys[0]][i])
            if n > self.window - 2 or any(len(ids[k][i]) != n for k in self.keys):
                out.append(self.tokenize(text))
                continue
            payload = {}
            for k in self.keys:
                start, end, *pad = self._empty[k][0]
                payload[k] = [start, *((t, 1.0) for t in ids[k][i]), end, *pad[: len(pad) - n]]
            out.append([SegmentRow(n + 1, payload)])
        return out

    def encode(self, rows: Sequence[SegmentRow], length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if length >= self.window or not self._text_models:
            length, shorten = self.window, contextlib.nullcontext()
        else:
            shorten = _short_rows(self._text_models, length)
        merged = {k: [row.payload[k][:length] for row in rows] for k in self.keys}
        with shorten:
            out = self.clip.encode_from_tokens(merged, return_pooled=True, return_dict=True)
        cond = out["cond"]
        return cond.reshape(len(rows), length, cond.shape[-1]), out.get("pooled_output")

    def cached_pad_embedding(self) -> torch.Tensor:
        """:func:`training.encode.pad_embedding` for this CLIP, computed once per patch set."""
        patcher = getattr(self.clip, "patcher", None)
        key = (id(self.clip.cond_stage_model), getattr(patcher, "patches_uuid", None), getattr(self.clip, "layer_idx", None))
        if key not in _PAD_CACHE:
            _PAD_CACHE[key] = pad_embedding(self)
            while len(_PAD_CACHE) > _PAD_CACHE_SIZE:
                _PAD_CACHE.popitem(last=False)
        _PAD_CACHE.move_to_end(key)
        return _PAD_CACHE[key]
