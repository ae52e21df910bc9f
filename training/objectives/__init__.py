"""Training objectives: each a loss over a batch, none with its own sampling loop or data loop."""
from __future__ import annotations

from typing import Protocol

import torch


class Objective(Protocol):
    needs_images: bool
    """Whether batches carry ``pixel_values`` (align) or captions only (reward stages)."""

    def loss(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scalar loss and named scalars to log (detached tensors; read at logging time only)."""
