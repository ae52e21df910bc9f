"""Command-line start-up: ``python -m training.align --help`` vs ``python -c "import torch, diffusers"``.

The stages parse their command line before importing torch (:mod:`training.cli`), so ``--help`` and
argument errors answer at once; the baseline is what every call cost before that: importing torch
and diffusers. Wall time of fresh processes, measured interleaved; target: under 2 s.
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable

from .common import Result, paired_median_times

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _process(*argv: str) -> Callable[[], None]:
    return lambda: subprocess.run([sys.executable, *argv], cwd=REPO, check=True, capture_output=True, timeout=600)


def run(quick: bool) -> list[Result]:
    repeats, warmup = (1, 0) if quick else (5, 1)
    ours, baseline = paired_median_times(_process("-m", "training.align", "--help"),
                                         _process("-c", "import torch, diffusers"), repeats, warmup)
    return [Result("CLI --help start-up (training.align)", ours, baseline, "s", "<= 2 s",
                   None if quick else ours <= 2.0, note=f"{baseline / ours:.0f}x faster than importing torch + diffusers")]
