"""Text embedding interpolation (TextCraftor, Li et al. CVPR 2024, §4 / SPEC §5).

With a fine-tuned text encoder ``E_ft`` and the original ``E_orig``, the conditioning

    c = a E_ft(p) + (1 - a) E_orig(p),        a in [0, 1]

trades the fine-tuned encoder's style (a = 1) against the original's fidelity (a = 0). The pooled
outputs, when both conditionings carry one, are interpolated the same way. Works on ComfyUI
CONDITIONING lists ``[[cond (B, L, D), {"pooled_output": ..., ...}], ...]``; LongAlign
conditionings of equal ``token_length`` have equal ``L``.
"""
from __future__ import annotations

from typing import Any

import torch

Conditioning = list[list[Any]]


def lerp_tensors(ft: torch.Tensor, orig: torch.Tensor, a: float, name: str) -> torch.Tensor:
    """``a ft + (1 - a) orig``; exact at a = 0 and a = 1 (``0 * x`` and ``1 * x`` are exact)."""
    if tuple(ft.shape) != tuple(orig.shape):
        raise ValueError(
            f"Text Embedding Interpolate: {name} shapes differ: fine-tuned {tuple(ft.shape)} vs original "
            f"{tuple(orig.shape)}; expected equal shapes (encode both prompts with the same token_length, "
            "e.g. two LongAlign Text Encode nodes with equal token_length)"
        )
    orig = orig.to(ft.device, ft.dtype)
    return a * ft + (1.0 - a) * orig


def interpolate_conditioning(c_ft: Conditioning, c_orig: Conditioning, a: float) -> Conditioning:
    """``a c_ft + (1 - a) c_orig`` entry by entry. Other fields (masks, areas, ...) come from the
    input with the larger weight, so a = 0 returns ``c_orig`` and a = 1 returns ``c_ft`` exactly."""
    if not 0.0 <= float(a) <= 1.0:
        raise ValueError(f"Text Embedding Interpolate: factor must be in [0, 1], got {a}")
    for name, c in (("conditioning_ft", c_ft), ("conditioning_orig", c_orig)):
        if not isinstance(c, list) or not c or not all(isinstance(e, (list, tuple)) and len(e) == 2 for e in c):
            raise ValueError(f"Text Embedding Interpolate: {name} is not a CONDITIONING (a non-empty list of "
                             f"[tensor, dict] entries), got {type(c).__name__}")
    if len(c_ft) != len(c_orig):
        raise ValueError(f"Text Embedding Interpolate: conditioning_ft has {len(c_ft)} entries, conditioning_orig "
                         f"{len(c_orig)}; expected the same number (encode the same prompt with both encoders)")
    out: Conditioning = []
    for i, ((ft, ft_extra), (orig, orig_extra)) in enumerate(zip(c_ft, c_orig)):
        cond = lerp_tensors(ft, orig, float(a), f"entry {i} embedding")
        extra = dict(ft_extra if a >= 0.5 else orig_extra)
        p_ft, p_orig = ft_extra.get("pooled_output"), orig_extra.get("pooled_output")
        if (p_ft is None) != (p_orig is None):
            missing = "conditioning_ft" if p_ft is None else "conditioning_orig"
            raise ValueError(f"Text Embedding Interpolate: entry {i}: {missing} has no pooled_output but the other "
                             "input has one; expected both or neither (use the same kind of encode node)")
        if p_ft is not None:
            extra["pooled_output"] = lerp_tensors(p_ft, p_orig, float(a), f"entry {i} pooled_output")
        out.append([cond, extra])
    return out
