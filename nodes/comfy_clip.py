"""ComfyUI's CLIP object as a :class:`training.encode.TextEncoderBackend`.

Tokenising goes through ``clip.tokenize`` and encoding through ``clip.encode_from_tokens``, so
ComfyUI's prompt weighting ``(word:1.2)``, ``embedding:`` names, clip-skip and LoRA patches keep
their meaning inside every segment. Glue only: no ComfyUI import is needed (the CLIP is passed in).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..training.encode import SegmentRow

SUPPORTED_ENCODERS = {"l", "g", "h"}  # SD1.x (l), SD2.x (h), SDXL (g + l)


class ComfyClipBackend:
    """Segments through ComfyUI's CLIP; every row is a full 77-token window (ComfyUI's CLIP adds
    all 77 position embeddings, so shorter rows are not possible there)."""

    window = 77

    def __init__(self, clip) -> None:
        self.clip = clip
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
        merged = {k: [row.payload[k] for row in rows] for k in self.keys}
        out = self.clip.encode_from_tokens(merged, return_pooled=True, return_dict=True)
        cond = out["cond"]
        return cond.reshape(len(rows), self.window, cond.shape[-1]), out.get("pooled_output")
