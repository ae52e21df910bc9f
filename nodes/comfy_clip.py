"""ComfyUI's CLIP object as a :class:`training.encode.TextEncoderBackend`.

Tokenising goes through ``clip.tokenize`` and encoding through ``clip.encode_from_tokens``, so
ComfyUI's prompt weighting ``(word:1.2)``, ``embedding:`` names, clip-skip and LoRA patches keep
their meaning inside every segment. Glue only: no ComfyUI import is needed (the CLIP is passed in).
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Iterator, Sequence

import torch

from ..training.encode import SegmentRow, pad_embedding

SUPPORTED_ENCODERS = {"l", "g", "h"}  # SD1.x (l), SD2.x (h), SDXL (g + l)
_PAD_CACHE: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_PAD_CACHE_SIZE = 8


class _LeadingPositions(torch.nn.Module):
    """Stands in for a CLIP position embedding during one call: ``weight`` is a view of the first
    ``length`` rows of the real table, so rows shorter than 77 tokens can be encoded."""

    def __init__(self, weight: torch.Tensor, length: int) -> None:
        super().__init__()
        self.weight = weight[:length]


@contextlib.contextmanager
def _short_rows(embeddings: list[torch.nn.Module], length: int) -> Iterator[None]:
    """Let ComfyUI's CLIP encode ``length``-token rows; the original modules are always restored.

    ComfyUI's CLIP adds its whole position table (77 rows) to the token embeddings. CLIP is causal,
    so positions before EOS do not depend on the padding after it: encoding a segment in a row cut
    right after its EOS gives the same kept rows as a full window, at a fraction of the cost.
    """
    originals = [m.position_embedding for m in embeddings]
    try:
        for m, original in zip(embeddings, originals):
            m.position_embedding = _LeadingPositions(original.weight, length)
        yield
    finally:
        for m, original in zip(embeddings, originals):
            m.position_embedding = original


class ComfyClipBackend:
    """Segments through ComfyUI's CLIP object (SD1.x, SD2.x, SDXL).

    Rows are cut to the longest segment in the batch (see :func:`_short_rows`); the pad embedding,
    which needs the full 77-token empty prompt, is cached per CLIP weights (patch set) and layer.
    """

    window = 77

    def __init__(self, clip) -> None:
        self.clip = clip
        self._embeddings = [
            m for m in clip.cond_stage_model.modules()
            if type(m).__name__ == "CLIPEmbeddings" and hasattr(m, "position_embedding")
        ]
        empty = clip.tokenize("")
        keys = set(empty)
        if not keys or not keys <= SUPPORTED_ENCODERS:
            raise ValueError(
                "LongAlign Text Encode needs an SD1.x, SD2.x or SDXL CLIP (CLIP-L/H/G encoders); "
                f"this CLIP has text encoders {sorted(keys)}"
            )
        self.keys = sorted(keys, key=lambda k: k != "l")  # masks read from 'l' when present
        first = empty[self.keys[0]][0]
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

    def encode(self, rows: Sequence[SegmentRow], length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if length >= self.window or not self._embeddings:
            length, shorten = self.window, contextlib.nullcontext()
        else:
            self.clip.load_model()  # weights patched and placed before the swap, not during it
            shorten = _short_rows(self._embeddings, length)
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
