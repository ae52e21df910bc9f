"""A bounded in-memory cache for what frozen models compute from fixed inputs (the align stage's
fast mode): VAE latent distributions per dataset image and segment conditionings per caption.

Entries live in host memory (not on the GPU); least recently used entries are dropped past
``budget_bytes``. A dataset that fits is encoded once (the first epoch) and read back from then on.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable, Sequence

import torch


class FeatureCache:
    def __init__(self, budget_bytes: int):
        self.budget, self.used = budget_bytes, 0
        self.entries: "OrderedDict[Hashable, torch.Tensor]" = OrderedDict()
        self.hits = self.misses = 0

    def get_many(self, keys: Sequence[Hashable], compute: Callable[[list[int]], torch.Tensor],
                 device: torch.device) -> torch.Tensor:
        """Rows for ``keys`` stacked on dim 0, on ``device``; ``compute(positions)`` returns the rows of
        the missing ``keys[positions]`` in one call (one batched forward of the frozen model)."""
        missing = [i for i, k in enumerate(keys) if k not in self.entries]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh = dict(zip(missing, compute(missing))) if missing else {}
        rows = []
        for i, key in enumerate(keys):
            if i in fresh:
                row = fresh[i]
                self._put(key, row)
            else:
                row = self.entries[key].to(device, non_blocking=True)
                self.entries.move_to_end(key)
            rows.append(row)
        return torch.stack(rows)

    def _put(self, key: Hashable, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.budget:
            return
        self.entries[key] = value.detach().to("cpu")
        self.used += size
        while self.used > self.budget:
            _, old = self.entries.popitem(last=False)
            self.used -= old.numel() * old.element_size()
