"""The one differentiable sampling loop shared by every reward-style objective (SPEC §4 ``reward``,
``reward_lcm``; §5 TextCraftor; §6 CoMat).

DDIM (eta = 0) over ``t = 999, 979, ..., 19`` (``steps`` = 50) with classifier-free guidance

    eps = eps_u + g (eps_c - eps_u)
    x0_t = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    x_{t-Δ} = sqrt(a_{t-Δ}) x0_t + sqrt(1 - a_{t-Δ}) eps            (a_{-1} := a_0, as the reference)

or LCM multistep sampling (:class:`LCM`, Luo et al. 2023), the solver being the only difference.
With ``g <= 1`` there is no guidance: the conditional branch alone runs (ComfyUI's cfg 1, LCM's
"guidance 0").

At ``K`` of the steps (every ``steps / K``-th, random offset) the UNet runs **with** gradient on a
detached input; at the others without. The update itself is never detached, so the loss on the
final ``x0`` reaches each gradient call through the linear sampler path. What runs the UNet is a
:class:`Denoiser`, so the reference mode (one activation checkpoint around the whole UNet, LoRA
unmerged) and the fast mode share this loop. The conditioning may change from step to step
(``context_at``: TextCraftor runs the first steps on the original text encoder and the last ones
on the fine-tuned one, with gradient into the encoder).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

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

    def timesteps(self, steps: int) -> list[int]:
        return ddim_timesteps(steps, self.num_train_timesteps)

    def alpha(self, t: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``a_t`` for one timestep, or per sample (``t`` of shape ``(B,)``) shaped to broadcast over ``like``."""
        a = self.alphas_cumprod[t]
        return a.view(-1, *([1] * (like.ndim - 1))) if a.ndim else a

    def predict_x0(self, eps: torch.Tensor, x_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        a_t = self.alpha(t, x_t)
        return (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()

    def step(self, x0: torch.Tensor, eps: torch.Tensor, t_prev: int | torch.Tensor) -> torch.Tensor:
        a_prev = self.alpha(t_prev.clamp(min=0) if isinstance(t_prev, torch.Tensor) else max(t_prev, 0), x0)
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps

    def update(self, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, i: int, timesteps: list[int],
               generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_{t-Δ}, x0_t)``: the next sample and this step's ``x0``."""
        ratio = self.num_train_timesteps // len(timesteps)
        return self.step(x0, eps, timesteps[i] - ratio), x0


def lcm_boundary(t: torch.Tensor | int, sigma_data: float = 0.5, timestep_scaling: float = 10.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The consistency model's boundary scalings (LCM, Luo et al. 2023, eq. 9 / SPEC §4):

        c_skip(t) = sigma_data^2 / ((s t)^2 + sigma_data^2),   c_out(t) = s t / sqrt((s t)^2 + sigma_data^2)

    with timestep scaling ``s`` = 10 and ``sigma_data`` = 0.5, so ``f(x, t) = c_skip x + c_out x0(x, t)``
    is the identity at ``t = 0``."""
    scaled = torch.as_tensor(t, dtype=torch.float32) * timestep_scaling
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / (scaled ** 2 + sigma_data ** 2) ** 0.5
    return c_skip, c_out


@dataclass
class LCM(DDIM):
    """LCM multistep sampling (Luo et al. 2023, Algorithm 1; diffusers' ``LCMScheduler``).

    Timesteps: the ``origin_steps`` = 50 skipping-step grid ``19, 39, ..., 999`` read from the top with
    stride ``origin_steps // steps`` (4 steps: 999, 759, 519, 279). Per step the consistency
    function ``x0_cm = c_skip(t) x_t + c_out(t) x0_t``; the next sample re-noises it with fresh noise,
    ``x_{t'} = sqrt(a_{t'}) x0_cm + sqrt(1 - a_{t'}) z``; the last step returns ``x0_cm``.
    """

    origin_steps: int = 50
    sigma_data: float = 0.5
    timestep_scaling: float = 10.0

    def timesteps(self, steps: int) -> list[int]:
        if not 1 <= steps <= self.origin_steps:
            raise ValueError(f"LCM steps must be in [1, {self.origin_steps}], got {steps}")
        c = self.num_train_timesteps // self.origin_steps
        origin = [(i + 1) * c - 1 for i in range(self.origin_steps)]
        return origin[::-(self.origin_steps // steps)][:steps]

    def update(self, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, i: int, timesteps: list[int],
               generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        c_skip, c_out = lcm_boundary(timesteps[i], self.sigma_data, self.timestep_scaling)
        denoised = c_skip.to(x) * x + c_out.to(x) * x0
        if i + 1 == len(timesteps):
            return denoised, denoised
        a_next = self.alphas_cumprod[timesteps[i + 1]]
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return a_next.sqrt() * denoised + (1 - a_next).sqrt() * z, denoised


StepConditioning = Callable[[int], "tuple[torch.Tensor, torch.Tensor] | None"]
"""``i -> (cond, uncond)`` for step ``i``, or None to keep the call's ``(cond, uncond)``."""


def sample_x0(
    denoiser: Denoiser,
    noise: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    ddim: DDIM,
    steps: int = 50,
    guidance: float = 7.5,
    grad_indices: list[int] | tuple[int, ...] = (),
    *,
    context_at: StepConditioning | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The final step's ``x0`` prediction (what the reference decodes), differentiable through the
    ``grad_indices`` UNet calls. ``ddim``: the solver (:class:`DDIM` or :class:`LCM`; LCM draws its
    re-noising from ``generator``). ``context_at``: per-step conditioning (see
    :data:`StepConditioning`); a conditioning that carries a graph (a training text encoder) passes
    its gradient through the gradient calls."""
    timesteps = ddim.timesteps(steps)
    use_cfg = guidance > 1.0
    B = noise.shape[0]
    stacked: dict[tuple[int, int], tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]] = {}

    def context(pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The UNet's context for ``pair``, built once per distinct pair (the pair is kept alive with it)."""
        key = (id(pair[0]), id(pair[1]))
        if key not in stacked:
            c, u = pair
            stacked[key] = (pair, torch.cat([c, u.expand(B, -1, -1) if u.shape[0] == 1 else u]) if use_cfg else c)
        return stacked[key][1]

    x, x0 = noise, noise
    grad_set = set(grad_indices)
    n = 2 * B if use_cfg else B
    denoiser.prepare()
    for i, t in enumerate(timesteps):
        ctx = context((context_at(i) if context_at is not None else None) or (cond, uncond))
        t_batch = torch.full((n,), t, device=noise.device, dtype=torch.long)
        x_in = torch.cat([x, x]) if use_cfg else x
        if i in grad_set:
            eps_both = denoiser.with_grad(x_in.detach(), t_batch, ctx)
        else:
            with torch.no_grad():
                eps_both = denoiser.no_grad(x_in, t_batch, ctx)
        if use_cfg:
            eps_c, eps_u = eps_both[:B], eps_both[B:]
            eps = eps_u + guidance * (eps_c - eps_u)
        else:
            eps = eps_both
        x0 = ddim.predict_x0(eps.to(x.dtype), x, t)
        x, x0 = ddim.update(x, x0, eps.to(x.dtype), i, timesteps, generator)
    return x0
