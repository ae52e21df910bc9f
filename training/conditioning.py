"""Text conditioning for training: the segment-level CLIP encoding shared with the node
(:func:`.encode.encode_long_prompts`) and, with a T5 encoder, LongSD's ct5f conditioning
(:func:`.t5.encode_ct5f`).

SDXL (SPEC §9): :class:`SDXLClipBackend` runs CLIP-L and bigG as one segment encoder (rows
``[L | G]``, 2048 wide; pooled = bigG's projected ``text_embeds``), and the conditioning carries each
caption's pooled embedding (of its first segment, as ComfyUI's node) as one extra last row
(:func:`join_pooled`), which the SDXL UNet's hook (:class:`.families.AddedConditioning`) takes off.
"""
from __future__ import annotations

from typing import Sequence

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .clip_text import TransformersClipBackend
from .encode import SegmentOptions, SegmentRow, encode_long_prompts, pad_embedding
from .t5 import T5Branch, encode_ct5f, join_ct5f
from .transfer import to_device


def join_pooled(cond: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """``(B, L + 1, D)``: ``cond`` (B, L, D) followed by one row ``[pooled (P) | 0 (D - P)]``."""
    B, _, D = cond.shape
    P = pooled.shape[-1]
    if P > D:
        raise ValueError(f"pooled width {P} exceeds the conditioning width {D}")
    row = torch.cat([pooled.to(cond.dtype).expand(B, P), cond.new_zeros(B, D - P)], dim=-1)
    return torch.cat([cond, row[:, None]], dim=1)


def split_pooled(context: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`join_pooled`: ``(cond (B, L, D), pooled (B, pooled_dim))``."""
    return context[:, :-1], context[:, -1, :pooled_dim]


class SDXLClipBackend(TransformersClipBackend):
    """CLIP-L and OpenCLIP bigG as one segment encoder (SPEC §9; ComfyUI ``sdxl_clip``, diffusers
    ``StableDiffusionXLPipeline.encode_prompt``): each encoder's penultimate hidden state without the
    final LayerNorm, joined ``[L | G]`` on the feature axis; the pooled output is bigG's projected
    ``text_embeds`` of every row. Both read the same CLIP BPE ids; bigG pads with ``pad_2`` (0)
    after EOS, CLIP-L with EOS."""

    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel,
                 text_encoder_2: CLIPTextModelWithProjection, pad_2: int = 0):
        super().__init__(tokenizer, text_encoder, hidden_layer=-2)
        self.text_encoder_2, self.pad_2 = text_encoder_2, pad_2

    @property
    def text_encoders(self) -> tuple[torch.nn.Module, ...]:
        return self.text_encoder, self.text_encoder_2

    def encode(self, rows: Sequence[SegmentRow], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.text_encoder.device
        ids = to_device([row.payload[:length] for row in rows], device, torch.long)
        ends = torch.tensor([row.end for row in rows], device=device)
        ids_2 = ids.masked_fill(torch.arange(ids.shape[1], device=device) > ends[:, None], self.pad_2)
        hidden_l = self.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states[-2]
        out_g = self.text_encoder_2(input_ids=ids_2.to(self.text_encoder_2.device), output_hidden_states=True)
        hidden = torch.cat([hidden_l, out_g.hidden_states[-2].to(hidden_l.device, hidden_l.dtype)], dim=-1)
        return hidden, out_g.text_embeds


class TextConditioner:
    """Captions -> ``(B, L, 768)`` (CLIP only), ``(B, 2L, 768)`` (ct5f) or, with ``pooled`` (SDXL),
    ``(B, L + 1, 2048)`` (:func:`join_pooled`).

    The encoders are frozen (no parameter needs a gradient, so they build no graph); only a
    training TextAdapter gets gradients. The CLIP pad embedding is computed once, as the reference
    caches it.
    """

    def __init__(self, backend: TransformersClipBackend, token_length: int, t5: T5Branch | None = None,
                 pooled: bool = False):
        if pooled and t5 is not None:
            raise ValueError("the T5 branch (ct5f) is SD1.5-only: it cannot join a pooled (SDXL) conditioning")
        self.backend, self.t5, self.pooled = backend, t5, pooled
        self.options = SegmentOptions(token_length=token_length)
        with torch.no_grad():
            self.pad = pad_embedding(backend)

    def _clip(self, captions: Sequence[str]) -> torch.Tensor:
        encoding = encode_long_prompts(list(captions), self.backend, self.options, self.pad)
        return join_pooled(encoding.cond, encoding.pooled) if self.pooled else encoding.cond

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        if self.t5 is None:
            return self._clip(captions)
        return encode_ct5f(list(captions), self.backend, self.t5, self.options, self.pad).cond

    def frozen(self, captions: Sequence[str]) -> torch.Tensor:
        """What the frozen encoders give for ``captions``, for a cache: the CLIP segment conditioning
        ``(B, L, D)``, with a T5 branch followed on the feature axis by T5's hidden state
        (``(B, L, D + d_t5)``, in the wider of the two dtypes, so nothing is rounded)."""
        clip = self._clip(captions)
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
