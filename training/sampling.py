"""The one differentiable sampling loop shared by every reward-style objective (SPEC §4 ``reward``).

DDIM (eta = 0) over ``t = 999, 979, ..., 19`` (``steps`` = 50) with classifier-free guidance

    eps = eps_u + g (eps_c - eps_u)
    x0_t = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    x_{t-Δ} = sqrt(a_{t-Δ}) x0_t + sqrt(1 - a_{t-Δ}) eps            (a_{-1} := a_0, as the reference)

At ``K`` of the steps (every ``steps / K``-th, random offset) the UNet runs **with** gradient on a
detached input; at the others without. The update itself is never detached, so the loss on the
final ``x0`` reaches each gradient call through the linear sampler path. What runs the UNet is a
:class:`Denoiser`, so the reference mode (one activation checkpoint around the whole UNet, LoRA
unmerged) and the fast mode share this loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class Denoiser(Protocol):
    """Predicts epsilon for the stacked ``[cond; uncond]`` batch."""

    def prepare(self) -> None:
        """Called once before each sampling pass (the LoRA may have changed since the last)."""

    def no_grad(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor: ...

    def with_grad(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor: ...


def ddim_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """``t_i = T - 1 - i * (T // steps)``: 999, 979, ..., 19 for 50 steps (the reference's grid)."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    ratio = num_train_timesteps // steps
    return [num_train_timesteps - 1 - i * ratio for i in range(steps)]


def gradient_step_indices(steps: int, K: int, generator: torch.Generator) -> list[int]:
    """The K step indices that run with gradient: ``offset, offset + steps/K, ...`` (reference:
    ``time_all[randint(0, 9)::10]`` for 50 steps and K = 5)."""
    if K <= 0:
        return []
    if K > steps:
        raise ValueError(f"grad_steps K = {K} exceeds the {steps} sampling steps")
    stride = steps // K
    offset = int(torch.randint(0, stride, (1,), generator=generator, device=generator.device))
    return list(range(offset, steps, stride))[:K]


@dataclass
class DDIM:
    """Deterministic DDIM on a noise schedule's ``alphas_cumprod``."""

    alphas_cumprod: torch.Tensor
    num_train_timesteps: int = 1000

    def predict_x0(self, eps: torch.Tensor, x_t: torch.Tensor, t: int) -> torch.Tensor:
        a_t = self.alphas_cumprod[t]
        return (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()

    def step(self, x0: torch.Tensor, eps: torch.Tensor, t_prev: int) -> torch.Tensor:
        a_prev = self.alphas_cumprod[max(t_prev, 0)]
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def sample_x0(
    denoiser: Denoiser,
    noise: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    ddim: DDIM,
    steps: int = 50,
    guidance: float = 7.5,
    grad_indices: list[int] | tuple[int, ...] = (),
) -> torch.Tensor:
    """The final step's ``x0`` prediction (what the reference decodes), differentiable through the
    ``grad_indices`` UNet calls."""
    timesteps = ddim_timesteps(steps, ddim.num_train_timesteps)
    ratio = ddim.num_train_timesteps // steps
    context = torch.cat([cond, uncond.expand(cond.shape[0], -1, -1) if uncond.shape[0] == 1 else uncond])
    x, x0 = noise, noise
    grad_set = set(grad_indices)
    B = noise.shape[0]
    denoiser.prepare()
    for i, t in enumerate(timesteps):
        t_batch = torch.full((2 * B,), t, device=noise.device, dtype=torch.long)
        if i in grad_set:
            eps_both = denoiser.with_grad(torch.cat([x, x]).detach(), t_batch, context)
        else:
            with torch.no_grad():
                eps_both = denoiser.no_grad(torch.cat([x, x]), t_batch, context)
        eps_c, eps_u = eps_both[:B], eps_both[B:]
        eps = eps_u + guidance * (eps_c - eps_u)
        x0 = ddim.predict_x0(eps.to(x.dtype), x, t)
        x = ddim.step(x0, eps.to(x.dtype), t - ratio)
    return x0
