"""What every benchmark module shares: timing, the result row, and the table.

A benchmark module exposes ``run(quick: bool) -> list[Result]``; ``python -m bench`` collects them.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch


@dataclass
class Result:
    """One measured comparison: ``ratio = ours / baseline`` (for times and memory, lower is better)."""

    name: str
    ours: float
    baseline: float
    unit: str
    target: str
    passed: bool | None
    """None when the target is reported, not asserted (e.g. CPU timings for GPU targets)."""
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.ours / self.baseline if self.baseline else float("nan")

    def as_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


def median_time(fn: Callable[[], object], repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in seconds after warm-up (device synchronised on CUDA)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_median_times(a: Callable[[], object], b: Callable[[], object], repeats: int = 7, warmup: int = 2) -> tuple[float, float]:
    """Median times of ``a`` and ``b`` measured interleaved (a, b, a, b, ...), so drift hits both."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        a()
        b()
    sync()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, acc in ((a, ta), (b, tb)):
            start = time.perf_counter()
            fn()
            sync()
            acc.append(time.perf_counter() - start)
    return statistics.median(ta), statistics.median(tb)


def format_table(results: list[Result]) -> str:
    header = f"{'benchmark':<48} {'ours':>12} {'baseline':>12} {'ratio':>7}  {'target':<10} result"
    lines = [header, "-" * len(header)]
    for r in results:
        verdict = "report" if r.passed is None else ("PASS" if r.passed else "FAIL")
        lines.append(
            f"{r.name:<48} {r.ours:>10.4g}{r.unit:>2} {r.baseline:>10.4g}{r.unit:>2} {r.ratio:>7.3f}  {r.target:<10} {verdict}"
            + (f"  ({r.note})" if r.note else "")
        )
    return "\n".join(lines)
