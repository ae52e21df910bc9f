"""The scalars a run logs (TensorBoard and ``metrics.jsonl``): loss, reward and scores averaged over
the logging interval and over all processes, so a logged value describes the interval, not one
micro-batch of one process."""
from __future__ import annotations

import json
import os

import torch

METRICS_FILE = "metrics.jsonl"
"""One JSON line per logging step (the same scalars as TensorBoard), for scripts and tests."""


class IntervalMeans:
    """Running sums of the objective's scalars since the last log, on the device (no host sync per
    step). :meth:`means` returns, per key, ``sum_p sum_i v_pi / sum_p n_p`` over the ``n_p``
    micro-batches of each process ``p``, and starts the next interval."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for key, value in values.items():
            value = value.detach().float().reshape(())
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.count += 1

    def means(self, accelerator) -> dict[str, float]:
        """Collective on several processes: every process calls it at the same step."""
        keys = sorted(self.sums)
        device = accelerator.device
        packed = torch.stack([self.sums[k].to(device) for k in keys] + [torch.tensor(float(self.count), device=device)])
        if accelerator.num_processes > 1:
            packed = accelerator.reduce(packed, reduction="sum")
        totals = packed.tolist()
        self.sums, self.count = {}, 0
        return {k: s / totals[-1] for k, s in zip(keys, totals)} if totals[-1] else {}


def append_metrics(output_dir: str, row: dict) -> None:
    with open(os.path.join(output_dir, METRICS_FILE), "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
