"""One ``align`` training step: the fast mode vs ``--mode reference``, measured in one run (issues 11, 20:
at least 2x the samples/s at no more memory).

Built by :func:`.train._align_step` (see :mod:`.train` for what each mode does): fast = VAE latent
moments and caption conditionings cached (warm: a later epoch), compiled UNet and fused AdamW on
CUDA; reference = VAE encoder and text encoders every step, eager UNet, plain AdamW. The low-memory
setting is the fast mode with diffusers' gradient checkpointing. Full: SD1.5 shapes, bf16, 512x512,
batch 16, ct5f (CUDA only); ``--quick``: the tiny preset on the CPU.
"""
from __future__ import annotations

from .common import Result
from .train import _align_step, _device, _measure


def run(quick: bool) -> list[Result]:
    device = _device(quick)
    cuda = device.type == "cuda"
    repeats = 2 if quick else 5
    ref_time, ref_mem = _measure("reference", not quick, device, repeats, _align_step, "align step")
    fast_time, fast_mem = _measure("fast", not quick, device, repeats, _align_step, "align step")
    where = "SD1.5 shapes, bf16, batch 16, ct5f" if not quick else "tiny preset, CPU, batch 4"
    results = [Result(f"align step s/sample ({where}; cache warm)", fast_time, ref_time, "s", "<= 0.5x",
                      (fast_time / ref_time <= 0.5 and fast_mem <= ref_mem) if cuda else None,
                      note=f"speed-up {ref_time / fast_time:.2f}x" + (f"; memory {fast_mem:.1f} vs {ref_mem:.1f} GiB"
                                                                      if cuda else ""))]
    if cuda:
        low_time, low_mem = _measure("fast", True, device, repeats,
                                     lambda m, f, d: _align_step(m, f, d, low_memory=True),
                                     "align step, low-memory setting")
        results.append(Result("align step peak memory, low-memory setting", low_mem, ref_mem, "G", "<= 0.4x",
                              low_mem / ref_mem <= 0.4, note=f"{1 / low_time:.3g} samples/s"))
    return results
