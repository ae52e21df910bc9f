"""Small host-to-device copies that do not stall the GPU.

``torch.tensor(data, device="cuda")`` is a blocking copy: PyTorch synchronises the stream first, so
the host waits for every kernel queued before it and cannot queue the next ones meanwhile (with the
scorer's image tower queued, that is its whole forward). A copy with ``non_blocking=True`` is ordered
on the stream like any kernel and leaves the host free; from pageable memory the driver stages the
data before the call returns, so the host list may go away at once.
"""
from __future__ import annotations

import torch


def to_device(data, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.tensor(data, dtype=dtype)`` on ``device``, copied without a stream synchronisation."""
    return torch.tensor(data, dtype=dtype).to(device, non_blocking=True)
