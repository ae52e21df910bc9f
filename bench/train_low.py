"""The reward step's low-memory setting (``sampling.checkpoint_calls``) against ``--mode reference``,
both measured here (GPU only; not in the default suites: it compiles the fast mode once more)."""
from __future__ import annotations

from .common import Result
from .train import _device, _measure, _reward_step


def run(quick: bool) -> list[Result]:
    name = "reward step peak memory, sampling.checkpoint_calls"
    device = _device(quick)
    if device.type != "cuda":
        return [Result(name, float("nan"), float("nan"), "G", "<= 0.5x", None, note="not measured: CUDA only")]
    ref_time, ref_mem = _measure("reference", True, device, 2)
    low_time, low_mem = _measure("fast", True, device, 3,
                                 lambda m, f, d: _reward_step(m, f, d, checkpoint_calls=True),
                                 "reward step, sampling.checkpoint_calls")
    return [Result(name, low_mem, ref_mem, "G", "<= 0.5x", low_mem / ref_mem <= 0.5,
                   note=f"speed-up {ref_time / low_time:.2f}x")]
