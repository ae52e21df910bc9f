"""KSampler cost of the longer context: LongAlign's 240 (and ct5f's 480) tokens vs the stock 77.

The UNet's cross-attention is the only part that sees the context length. One ComfyUI SD1.5 model
(the tiny test UNet in ``--quick``; SD1.5 size otherwise, random weights), ComfyUI's own
``comfy.sample.sample`` (euler, 8 steps (2 in quick), CFG 7.5) at 512x512 (64x64 in quick), conditionings of 77,
240 and 480 tokens, interleaved medians. Target: <= 1.05x at 240 (GPU); 480 is reported.
"""
from __future__ import annotations

import torch

from .common import Result, paired_median_times
from .comfy_setup import comfy_ready, comfy_sd15_model


def run(quick: bool) -> list[Result]:
    comfy_ready(quick)
    import comfy.sample

    cuda = torch.cuda.is_available() and not quick
    model, _ = comfy_sd15_model(quick)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    if cuda:
        model.load_device = torch.device("cuda")
    size, steps = (64, 2) if quick else (512, 8)
    latent = torch.zeros(1, 4, size // 8, size // 8)
    noise = torch.randn(latent.shape, generator=g)

    def sample(tokens: int):
        context = torch.randn(1, tokens, 768, generator=torch.Generator().manual_seed(tokens))
        cond = [[context, {}]]
        return lambda: comfy.sample.sample(model, noise, steps, 7.5, "euler", "normal", cond, cond, latent,
                                           disable_pbar=True, seed=0)

    results = []
    for tokens, target in ((240, "<= 1.05x"), (480, "report")):
        ours, stock = paired_median_times(sample(tokens), sample(77), repeats=2 if quick else 15, warmup=2)
        passed = (ours / stock <= 1.05) if (cuda and target != "report") else None
        results.append(Result(f"KSampler s/it, {tokens} vs 77 tokens ({'tiny UNet, CPU' if quick else 'SD1.5'})",
                              ours / steps, stock / steps, "s", target, passed))
    return results
