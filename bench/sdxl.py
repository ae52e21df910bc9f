"""The SDXL reward step (issues 17, 20): the tiny SDXL fast vs ``--mode reference`` on the CPU
(``--quick``); on a GPU the 24 GiB example configs' setting (``sdxl_reward_24gb.yaml``: fast mode,
per-block checkpointing, ``sampling.checkpoint_calls``, one image per decode chunk, batch 1) at
512 px from SDXL shapes (``training/configs/sdxl``, random weights, bf16, CLIP-L + bigG, 240-row
context with the pooled row, time ids at the resolution): its peak memory against 24 GiB and its
samples/s. Built by :func:`.train._reward_step`, measured by :func:`.train._measure`.
"""
from __future__ import annotations

from functools import partial

from .common import Result
from .train import _device, _measure, _reward_step

SDXL_CARD_GIB = 24.0
"""The card the SDXL 24 GiB example configs target (issue #17)."""


def setting_24gb(quick: bool, resolution: int) -> list[Result]:
    """The 24 GiB setting at ``resolution`` px on a GPU: peak memory against 24 GiB, samples/s."""
    name = f"SDXL reward step peak memory, 24 GiB setting ({resolution}px, batch 1)"
    device = _device(quick)
    if device.type != "cuda":
        return [Result(name, float("nan"), SDXL_CARD_GIB, "G", "<= 24 GiB", None, note="not measured: CUDA only")]
    seconds, peak = _measure("fast", True, device, 2,
                             partial(_reward_step, checkpoint_calls=True, family="sdxl", resolution=resolution),
                             f"SDXL reward step, 24 GiB setting, {resolution}px")
    return [Result(name, peak, SDXL_CARD_GIB, "G", "<= 24 GiB", peak <= SDXL_CARD_GIB,
                   note=f"{1 / seconds:.3g} samples/s ({seconds:.2f} s per step); fast, per-block checkpointing, "
                        "sampling.checkpoint_calls, decode_chunk 1, 50 DDIM steps, K 5, bf16")]


def run(quick: bool) -> list[Result]:
    device = _device(quick)
    if device.type == "cuda":
        return setting_24gb(quick, 512)
    step = partial(_reward_step, family="sdxl")
    ref_time, _ = _measure("reference", False, device, 2, step, "SDXL reward step")
    fast_time, _ = _measure("fast", False, device, 2, step, "SDXL reward step")
    return [Result("SDXL reward step s/sample (tiny SDXL, CPU, batch 2, 6 steps, K 2)", fast_time, ref_time, "s",
                   "report", None, note=f"samples/s {1 / fast_time:.3g} vs {1 / ref_time:.3g}: "
                                        f"speed-up {ref_time / fast_time:.2f}x"),
            Result("SDXL reward step peak GPU memory", float("nan"), float("nan"), "G", "report", None,
                   note="not measured: no GPU in this run")]
