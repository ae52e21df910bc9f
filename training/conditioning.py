"""Text conditioning for training: the segment-level CLIP encoding shared with the node
(:func:`.encode.encode_long_prompts`) and, with a T5 encoder, LongSD's ct5f conditioning
(:func:`.t5.encode_ct5f`)."""
from __future__ import annotations

from typing import Sequence

import torch

from .clip_text import TransformersClipBackend
from .encode import SegmentOptions, encode_long_prompts, pad_embedding
from .t5 import T5Branch, encode_ct5f, join_ct5f


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

    def frozen(self, captions: Sequence[str]) -> torch.Tensor:
        """What the frozen encoders give for ``captions``, for a cache: the CLIP segment conditioning
        ``(B, L, D)``, with a T5 branch followed on the feature axis by T5's hidden state
        (``(B, L, D + d_t5)``, in the wider of the two dtypes, so nothing is rounded)."""
        clip = encode_long_prompts(list(captions), self.backend, self.options, self.pad).cond
        if self.t5 is None:
            return clip
        hidden = self.t5.hidden(captions, self.options.token_length)
        dtype = torch.promote_types(clip.dtype, hidden.dtype)
        return torch.cat([clip.to(dtype), hidden.to(clip.device, dtype)], dim=-1)

    def assemble(self, frozen: torch.Tensor) -> torch.Tensor:
        """The conditioning from :meth:`frozen`'s output, equal to ``self(captions)``: with a T5 branch
        ``cat([clip, TextAdapter(T5 hidden)], dim=1)``, the adapter run here (with its graph when it
        trains)."""
        if self.t5 is None:
            return frozen
        width = self.pad.shape[-1]
        clip = frozen[..., :width].to(self.pad.dtype)
        return join_ct5f(clip, self.t5.adapt(frozen[..., width:].to(self.t5.encoder.dtype)))
