"""UNet model FLOP utilisation in the no-grad sampling calls (issue 11).

    MFU = F / t / P

``F``: the floating-point operations of one SD1.5 UNet call as the reward stage makes it (batch 16 =
8 prompts x CFG, 64x64 latents, ct5f context of 480 tokens, bf16), counted by
``torch.utils.flop_counter`` on that call (matrix products, convolutions, attention); ``t``: the
call's median time, eager and compiled as the fast mode's shadow UNet runs it
(``torch.compile(dynamic=False)``, channels-last memory format); ``P``: the rate of a large bf16 matrix product (8192^3)
measured in the same run. Target: at least 45 % for the compiled call. CUDA only.

The trainer prepares its UNet with accelerate, so the fast mode's shadow copy (a deep copy of the
prepared UNet) runs its forward under bf16 autocast (GroupNorm and its SiLU in fp32): the third row
times the compiled call that way (:func:`.train._prepared`).
"""
from __future__ import annotations

import copy
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from .common import Result, median_time
from .train import _prepared

BATCH, LATENT, CONTEXT = 16, 64, 480


def _matmul_rate(device: torch.device, n: int = 8192) -> float:
    """FLOP/s of an ``n x n x n`` bf16 matrix product on random data."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / median_time(lambda: a @ b, repeats=20, warmup=5)


def _sd15_unet(device: torch.device) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    from training.models import SD15_CONFIG

    torch.manual_seed(0)
    with device:
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIG, subfolder="unet"))
    return unet.to(torch.bfloat16).eval().requires_grad_(False)


def run(quick: bool) -> list[Result]:
    name = f"UNet MFU, no-grad call (SD1.5, b{BATCH}, ctx {CONTEXT}, bf16)"
    if quick or not torch.cuda.is_available():
        return [Result(name, float("nan"), float("nan"), "TF", ">= 0.45", None, note="not measured: CUDA only")]
    device = torch.device("cuda")
    peak = _matmul_rate(device)
    unet = _sd15_unet(device)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(BATCH, 4, LATENT, LATENT, device=device, dtype=torch.bfloat16, generator=g)
    t = torch.full((BATCH,), 500, device=device, dtype=torch.long)
    context = torch.randn(BATCH, CONTEXT, 768, device=device, dtype=torch.bfloat16, generator=g)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, t, context)
    flops = counter.get_total_flops()
    results = []

    def row(label: str, seconds: float, asserted: bool) -> None:
        rate = flops / seconds
        results.append(Result(f"{name}, {label}", rate / 1e12, peak / 1e12, "TF",
                              ">= 0.45" if asserted else "report", rate / peak >= 0.45 if asserted else None,
                              note=f"{seconds * 1e3:.1f} ms per call, {flops / 1e12:.2f} TFLOP; baseline = "
                                   "8192^3 bf16 matmul in the same run"))
        print(f"[bench] MFU {label}: {seconds * 1e3:.1f} ms, {rate / peak:.1%}", file=sys.stderr, flush=True)

    with torch.no_grad():
        row("eager", median_time(lambda: unet(x, t, context), repeats=20, warmup=3), False)
        shadow = unet.to(memory_format=torch.channels_last)  # as MergedShadowUNet runs it compiled
        compiled, x_cl = torch.compile(shadow, dynamic=False), x.contiguous(memory_format=torch.channels_last)
        row("compiled, channels-last", median_time(lambda: compiled(x_cl, t, context), repeats=20, warmup=3), True)
        prepared = torch.compile(_prepared(copy.deepcopy(shadow), device), dynamic=False)
        row("compiled, channels-last, autocast (trainer)",
            median_time(lambda: prepared(x_cl, t, context), repeats=20, warmup=3), False)
    return results
