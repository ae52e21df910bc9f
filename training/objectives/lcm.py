"""``lcm``: latent consistency distillation of an (aligned) SD1.5 teacher into a LoRA student
(LCM / LCM-LoRA, Luo et al. 2023; SPEC §4). The teacher is the UNet with the LoRA switched off (the
base with the alignment LoRA merged, ``model.init_lora``); the student is the UNet with the LoRA;
the target network is the student itself without gradient (LCM-LoRA keeps no EMA copy).

Per image latent ``z`` (caption ``c``, the empty prompt ``u``), with the DDIM solver's skipping-step
grid of ``N`` = 50 steps, ``k = 1000 / N``:

    t_{n+k} = (i + 1) k - 1,  i ~ U{0..N-1};     t_n = max(t_{n+k} - k, 0)
    x_{t_{n+k}} = sqrt(a) z + sqrt(1 - a) eps
    w ~ U[w_min, w_max]                                                   (3, 15: diffusers' LCM-LoRA script)
    teacher:  e = e_c + w (e_c - e_u);   x_{t_n} = DDIM(x_{t_{n+k}}, e)      (no gradient, LoRA off)
    f(x, t) = c_skip(t) x + c_out(t) x0(x, t)                             (:func:`..sampling.lcm_boundary`,
                                                                           sigma_data 0.5, scaling 10)
    L = mean( sqrt((f_student(x_{t_{n+k}}) - f_target(x_{t_n}))^2 + c^2) - c ),   c = 0.001 (pseudo-Huber)

The unconditional branch uses the empty prompt's conditioning (what ComfyUI's CFG feeds at inference).
"""
from __future__ import annotations

import torch

from ..conditioning import TextConditioner
from ..lora import adapters_disabled
from ..sampling import LCM, lcm_boundary


class LCMDistillObjective:
    needs_images = True

    def __init__(self, unet, vae, scheduler, conditioner: TextConditioner, num_ddim_timesteps: int, w_min: float,
                 w_max: float, huber_c: float, sigma_data: float, timestep_scaling: float, weight_dtype: torch.dtype):
        T = scheduler.config.num_train_timesteps
        if not 1 <= num_ddim_timesteps <= T:
            raise ValueError(f"lcm.num_ddim_timesteps must be in [1, {T}], got {num_ddim_timesteps}")
        if w_min > w_max:
            raise ValueError(f"lcm.w_min ({w_min}) must not exceed lcm.w_max ({w_max})")
        self.unet, self.vae, self.conditioner, self.weight_dtype = unet, vae, conditioner, weight_dtype
        self.solver = LCM(scheduler.alphas_cumprod, T, num_ddim_timesteps, sigma_data, timestep_scaling)
        self.k = T // num_ddim_timesteps
        self.N, self.w_min, self.w_max, self.huber_c = num_ddim_timesteps, w_min, w_max, huber_c
        self._uncond: torch.Tensor | None = None

    def consistency(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``f(x, t) = c_skip(t) x + c_out(t) x0(x, t)`` with the UNet as it is (LoRA on)."""
        eps = self.unet(x, t, context).sample.to(x.dtype)
        c_skip, c_out = (c.to(x).view(-1, 1, 1, 1) for c in
                         lcm_boundary(t, self.solver.sigma_data, self.solver.timestep_scaling))
        return c_skip * x + c_out * self.solver.predict_x0(eps, x, t)

    def loss(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pixels = batch["pixel_values"].to(self.vae.device, self.weight_dtype)
        B, device = pixels.shape[0], pixels.device
        self.solver.alphas_cumprod = self.solver.alphas_cumprod.to(device)
        with torch.no_grad():
            z = self.vae.encode(pixels).latent_dist.sample(generator=generator) * self.vae.config.scaling_factor
            cond = self.conditioner(batch["caption"]).to(self.weight_dtype)
            if self._uncond is None:
                self._uncond = self.conditioner([""]).to(self.weight_dtype)
            uncond = self._uncond.expand(B, -1, -1)
        noise = torch.randn(z.shape, generator=generator, device=device, dtype=z.dtype)
        index = torch.randint(0, self.N, (B,), generator=generator, device=device)
        t = (index + 1) * self.k - 1
        s = (t - self.k).clamp(min=0)
        w = (self.w_min + (self.w_max - self.w_min) * torch.rand(B, generator=generator, device=device)).view(B, 1, 1, 1)
        a = self.solver.alpha(t, z)
        x_t = a.sqrt() * z + (1 - a).sqrt() * noise
        student = self.consistency(x_t, t, cond)
        with torch.no_grad():
            with adapters_disabled(self.unet):
                eps_c, eps_u = self.unet(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                         torch.cat([cond, uncond])).sample.to(z.dtype).chunk(2)
            eps = eps_c + w * (eps_c - eps_u)
            x_s = self.solver.step(self.solver.predict_x0(eps, x_t, t), eps, s)
            target = self.consistency(x_s, s, cond)
        diff = student.float() - target.float()
        loss = (diff.pow(2) + self.huber_c ** 2).sqrt().sub(self.huber_c).mean()
        return loss, {}
