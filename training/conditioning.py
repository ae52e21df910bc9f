"""Text conditioning for training: the segment-level CLIP encoding shared with the node
(:func:`.encode.encode_long_prompts`) and, with a T5 encoder, LongSD's ct5f conditioning
(:func:`.t5.encode_ct5f`)."""
from __future__ import annotations

from typing import Sequence

import torch

from .clip_text import TransformersClipBackend
from .encode import SegmentOptions, encode_long_prompts, pad_embedding
from .t5 import T5Branch, encode_ct5f


class TextConditioner:
    """Captions -> ``(B, L, 768)`` (CLIP only) or ``(B, 2L, 768)`` (ct5f).

    The encoders are frozen (no parameter needs a gradient, so they build no graph); only a
    training TextAdapter gets gradients. The CLIP pad embedding is computed once, as the reference
    caches it.
    """

    def __init__(self, backend: TransformersClipBackend, token_length: int, t5: T5Branch | None = None):
        self.backend, self.t5 = backend, t5
        self.options = SegmentOptions(token_length=token_length)
        with torch.no_grad():
            self.pad = pad_embedding(backend)

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        if self.t5 is None:
            return encode_long_prompts(list(captions), self.backend, self.options, self.pad).cond
        return encode_ct5f(list(captions), self.backend, self.t5, self.options, self.pad).cond
