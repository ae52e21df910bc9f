"""Cross-attention maps of the UNet and CoMat's attribute-concentration losses (SPEC §6).

Capture: every cross-attention (``attn2``) of the mid block and the up blocks gets a
:class:`CaptureProcessor`. It runs the module's own processor unchanged (the output is the default
one's) and, only while the :class:`AttentionStore` records, also computes the conditional branch's
attention probabilities

    A = softmax(Q K^T / sqrt(d))       Q = to_q(h_cond), K = to_k(c_cond), per head

with the module's own ``get_attention_scores`` (so LoRA on ``to_q`` / ``to_k`` gets the gradient) and
keeps, per sample, only the columns of that sample's concept tokens: ``(heads, h*w, n_tokens)``.
:class:`RecordingDenoiser` marks the chosen gradient calls of the shared loop (CoMat: 2 of the 5);
nothing is computed in the other calls.

Losses, per sample, for every recorded (step, resolution) and every group g with mask M_g
(the reference's ``get_grounding_loss_by_layer``):

    L_token = sum_layers mean_g mean_{tokens j of g} (1 - mean_heads( sum(A_j * M_g) / sum(A_j) ))^2
    L_pixel = mean_g BCE( sum_{j in g} mean_{layers, heads} A_j , M_g )

summed over (step, resolution) and averaged over the batch. ``M_g`` is the noun's segmentation mask
resized to the map (CoMat: Grounding DINO + FastSAM) when the caller supplies masks; without masks
(our default: no detector here) it is the noun's own map, ``mean_heads(sum_{j in noun} A_j)``,
normalised by its maximum and thresholded at ``threshold`` (detached), so the attribute tokens are
pulled into the region the noun occupies. ``L_pixel`` needs real masks and is skipped without them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

CAPTURE_BLOCKS = ("mid_block", "up_blocks")


@dataclass
class AttentionStore:
    """What to record and what was recorded in one sampling pass.

    A recorded UNet call is recognised by its context tensor: :class:`RecordingDenoiser` passes a
    copy of the context of its own to that call and registers it here; the attention layers see it,
    or a view of it (SDXL's UNet hook takes the pooled row off: :class:`.families.AddedConditioning`).
    Activation checkpointing re-runs the call in backward with the same tensor, so the recomputation
    computes the same maps (the checkpoint needs the same saved tensors) but does not store them again.
    """

    tokens: list[list[int]] = field(default_factory=list)
    """Per conditional sample, the context rows whose attention columns are kept."""
    record_calls: frozenset[int] = frozenset()
    """Ordinals (0-based) of the gradient calls to record."""
    maps: list[tuple[int, str, list[torch.Tensor]]] = field(default_factory=list)
    """``(call ordinal, layer name, per-sample (heads, h*w, n_tokens) probabilities)``."""
    call: int = 0
    marked: list[tuple[torch.Tensor, int]] = field(default_factory=list)
    """``(context view, call ordinal)`` of the recorded calls."""

    def begin(self, tokens: list[list[int]], record_calls: Sequence[int]) -> None:
        self.tokens, self.record_calls = tokens, frozenset(record_calls)
        self.maps, self.call, self.marked = [], 0, []

    def ordinal(self, context: torch.Tensor) -> int | None:
        """The recorded call ``context`` (the marked tensor or a view of it) belongs to, or None."""
        return next((call for marked, call in self.marked if marked is context or marked is context._base), None)

    def record(self, call: int, name: str, attn, hidden_states: torch.Tensor, context: torch.Tensor) -> None:
        B = len(self.tokens)
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states[:B]))
        key = attn.head_to_batch_dim(attn.to_k(context[:B]))
        probs = attn.get_attention_scores(query, key, None)  # (B * heads, h*w, T)
        heads = probs.shape[0] // B
        per_sample = [probs[b * heads:(b + 1) * heads][..., idx] for b, idx in enumerate(self.tokens)]
        if not any(c == call and n == name for c, n, _ in self.maps):  # not a checkpoint's recomputation
            self.maps.append((call, name, per_sample))


class CaptureProcessor:
    """The module's own processor plus recording into ``store`` (see the module docstring)."""

    def __init__(self, name: str, store: AttentionStore, inner):
        self.name, self.store, self.inner = name, store, inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        call = self.store.ordinal(encoder_hidden_states) if encoder_hidden_states is not None else None
        if call is not None:
            self.store.record(call, self.name, attn, hidden_states, encoder_hidden_states)
        return out


def install_capture(unet: torch.nn.Module, store: AttentionStore, blocks: Sequence[str] = CAPTURE_BLOCKS
                    ) -> list[str]:
    """Wrap the processor of every cross-attention under ``blocks``; returns the module names."""
    from diffusers.models.attention_processor import Attention

    names = []
    for name, module in getattr(unet, "module", unet).named_modules():
        if isinstance(module, Attention) and module.is_cross_attention and name.startswith(tuple(blocks)):
            module.set_processor(CaptureProcessor(name, store, module.processor))
            names.append(name)
    if not names:
        raise ValueError(f"the UNet has no cross-attention layers under {list(blocks)} to capture")
    return names


class RecordingDenoiser:
    """A :class:`.sampling.Denoiser` that records attention during the chosen gradient calls."""

    def __init__(self, inner, store: AttentionStore):
        self.inner, self.store = inner, store

    def prepare(self) -> None:
        self.store.call = 0
        self.inner.prepare()

    def no_grad(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.inner.no_grad(x, t, context)

    def with_grad(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        call = self.store.call
        self.store.call += 1
        if call in self.store.record_calls:
            context = context.clone()  # a tensor of its own (views of it too): marks this call
            self.store.marked.append((context, call))
        return self.inner.with_grad(x, t, context)


@dataclass(frozen=True)
class Group:
    """Columns (into a sample's kept token list) of one group's tokens and of its noun's tokens."""

    tokens: tuple[int, ...]
    noun: tuple[int, ...]


def _self_mask(maps: Sequence[torch.Tensor], noun: tuple[int, ...], threshold: float) -> torch.Tensor:
    """Mask-free region of a noun: its head- and layer-mean map, over its max, >= ``threshold``."""
    m = torch.stack([a[..., list(noun)].sum(-1).mean(0) for a in maps]).mean(0).detach()
    return (m >= threshold * m.max().clamp_min(1e-12)).to(m.dtype)


def concentration_losses(store: AttentionStore, groups: Sequence[Sequence[Group]],
                         masks: Sequence[Sequence[torch.Tensor | None]] | None = None, threshold: float = 0.5,
                         pixel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_token, L_pixel)`` of the recorded maps (see the module docstring); ``groups[b]`` and
    ``masks[b][g]`` (a ``(H, W)`` mask in [0, 1], or None) for sample ``b``."""
    B = len(groups)
    device = store.maps[0][2][0].device if store.maps else torch.device("cpu")
    token_loss = torch.zeros((), device=device)
    pixel_loss = torch.zeros((), device=device)
    by_key: dict[tuple[int, int], list[int]] = {}
    for i, (call, _, per_sample) in enumerate(store.maps):
        by_key.setdefault((call, per_sample[0].shape[1]), []).append(i)
    for b in range(B):
        if not groups[b]:
            continue
        for (_, hw), indices in by_key.items():
            maps = [store.maps[i][2][b].float() for i in indices]
            res = math.isqrt(hw)
            region = []
            for g, group in enumerate(groups[b]):
                given = masks[b][g] if masks is not None else None
                if given is None:
                    region.append(_self_mask(maps, group.noun, threshold))
                else:
                    resized = F.interpolate(given[None, None].float().to(device), size=(res, res), mode="area")
                    region.append((resized.flatten() > 0).float())
            for a in maps:
                per_group = [torch.stack([(1 - ((a[..., j] * M).sum(-1) / a[..., j].sum(-1).clamp_min(1e-12)).mean()) ** 2
                                          for j in group.tokens]).mean() for group, M in zip(groups[b], region)]
                token_loss = token_loss + torch.stack(per_group).mean()
            if pixel and masks is not None:
                mean_map = torch.stack([a.mean(0) for a in maps]).mean(0)  # (h*w, n_tokens)
                bce = [F.binary_cross_entropy(mean_map[:, list(group.tokens)].sum(-1).clamp(0, 1), M)
                       for group, M, given in zip(groups[b], region, masks[b]) if given is not None]
                if bce:
                    pixel_loss = pixel_loss + torch.stack(bce).mean()
    return token_loss / max(B, 1), pixel_loss / max(B, 1)
