"""What runs the UNet inside :func:`.sampling.sample_x0` (the :class:`.sampling.Denoiser` seam).

* :class:`CheckpointedUNet` -- the reference's way (``--mode reference``): the peft LoRA stays
  unmerged on all calls; a gradient call is one activation checkpoint around the whole UNet.
* :class:`MergedShadowUNet` -- the fast mode: the no-grad calls (45 of 50) run a separate copy of
  the UNet whose target weights are ``W + (alpha / r) B A``, refreshed from the LoRA before every
  sampling pass (the trained weights are never merged and unmerged in place, so bf16 rounding
  cannot drift them); gradient calls go through the peft LoRA with diffusers' per-block gradient
  checkpointing (SPEC §8: faster and 3.6x lighter than one whole-UNet checkpoint). LoRA dropout,
  when set, acts in the gradient calls only. With ``compile``, both paths are ``torch.compile``d
  with static shapes (SPEC §8, one batch-16 call on an H100: no-grad 54 -> 38 ms, gradient call
  270 -> 209 ms), and the compiled shadow runs in channels-last memory format (cuDNN's and
  inductor's preferred layout for convolutions: 38.7 -> 37.9 ms, bench/RESULTS.md). With
  ``checkpoint_calls``, each gradient call is also wrapped in one checkpoint (nested around the
  per-block ones): between sampling and the backward pass only the K calls' inputs are held instead
  of their block inputs (13.8 GiB for K = 5 at batch 16 on SD1.5, bench/RESULTS.md), for one more
  UNet forward per gradient call (peak 19.3 -> 11.3 GiB, 1.98x -> 1.75x the reference's speed).
"""
from __future__ import annotations

import copy

import torch
from torch.utils.checkpoint import checkpoint

from .lora import injected_lora_layers


class CheckpointedUNet:
    """``checkpointing``: ``"unet"`` (one checkpoint around the whole UNet, reference) or
    ``"blocks"`` (diffusers' per-block gradient checkpointing)."""

    def __init__(self, unet: torch.nn.Module, checkpointing: str = "unet"):
        if checkpointing not in ("unet", "blocks"):
            raise ValueError(f"checkpointing must be 'unet' or 'blocks', got {checkpointing!r}")
        self.unet, self.checkpointing = unet, checkpointing
        if checkpointing == "blocks":
            _raw(unet).enable_gradient_checkpointing()

    def prepare(self) -> None:
        """Nothing to refresh: the LoRA is applied on the fly."""

    def _eps(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, context).sample

    def no_grad(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self._eps(x, t, context)

    def with_grad(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.checkpointing == "unet":
            return checkpoint(self._eps, x, t, context, use_reentrant=False)
        return self._eps(x, t, context)


def _raw(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP (or similar) wrapper."""
    return getattr(module, "module", module)


def _set_submodule(root: torch.nn.Module, name: str, value: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, value)


class MergedShadowUNet:
    """The fast mode (see the module docstring). ``compile``: ``torch.compile`` the shadow's forward
    and the LoRA UNet's gradient forward (static shapes; worth it on CUDA). ``checkpoint_calls``: one
    more checkpoint around each gradient call (memory)."""

    def __init__(self, unet: torch.nn.Module, compile: bool = False, checkpoint_calls: bool = False):
        self.unet, self.checkpoint_calls = unet, checkpoint_calls
        raw = _raw(unet)
        raw.enable_gradient_checkpointing()
        self.layers = [layer.name for layer in injected_lora_layers(raw)]
        self.lora = {name: raw.get_submodule(name) for name in self.layers}
        shadow = copy.deepcopy(raw)
        for name in self.layers:  # the shadow holds plain layers with their own weight buffers
            _set_submodule(shadow, name, copy.deepcopy(self.lora[name].base_layer))
        shadow.requires_grad_(False).disable_gradient_checkpointing()
        self.memory_format = torch.channels_last if compile else torch.contiguous_format
        self.shadow = shadow.to(memory_format=self.memory_format)
        self._forward = torch.compile(shadow, dynamic=False) if compile else shadow
        self._grad_forward = torch.compile(unet, dynamic=False) if compile else unet

    @torch.no_grad()
    def prepare(self) -> None:
        """``W_shadow = W + scaling * B A`` for every LoRA layer (computed in float32)."""
        for name in self.layers:
            layer = self.lora[name]
            adapter = next(iter(layer.lora_A.keys()))
            base = layer.base_layer.weight
            A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            delta = (B.flatten(1).float() @ A.flatten(1).float()).view(base.shape) * layer.scaling[adapter]
            self.shadow.get_submodule(name).weight.copy_(base.float() + delta)

    def no_grad(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self._forward(x.contiguous(memory_format=self.memory_format), t, context).sample

    def _grad_eps(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self._grad_forward(x, t, context).sample

    def with_grad(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_calls:
            return checkpoint(self._grad_eps, x, t, context, use_reentrant=False)
        return self._grad_eps(x, t, context)
