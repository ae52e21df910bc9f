"""``reward``: decomposed preference optimisation through the differentiable sampler (SPEC §4).

Per batch of prompts: pure noise -> :func:`..sampling.sample_x0` (50 DDIM steps, CFG 7.5, K = 5
gradient calls) -> VAE decode with gradient -> image in [0, 1] -> reweighted decomposed score
``s_w`` (:mod:`..scoring`), with ``v`` gathered over all processes ->

    L = 0.5 (1 - mean s_w)

No image and no VAE encoder is touched: the stage needs prompts only.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..conditioning import TextConditioner
from ..scoring import reward_loss, score_images
from ..reward_models import PreferenceModel
from ..sampling import DDIM, Denoiser, gradient_step_indices, sample_x0


class RewardObjective:
    needs_images = False

    def __init__(self, denoiser: Denoiser, vae, scheduler, conditioner: TextConditioner, scorer: PreferenceModel,
                 latent_shape: tuple[int, int, int], steps: int, guidance: float, grad_steps: int, w: float,
                 gather: Callable[[torch.Tensor], torch.Tensor] | None, weight_dtype: torch.dtype):
        self.denoiser, self.vae, self.conditioner, self.scorer = denoiser, vae, conditioner, scorer
        self.ddim = DDIM(scheduler.alphas_cumprod, scheduler.config.num_train_timesteps)
        self.latent_shape, self.steps, self.guidance, self.K, self.w = latent_shape, steps, guidance, grad_steps, w
        self.gather, self.weight_dtype = gather, weight_dtype
        self._uncond: torch.Tensor | None = None

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        image = self.vae.decode(x0.to(self.weight_dtype) / self.vae.config.scaling_factor).sample
        return (image.float() * 0.5 + 0.5).clamp(0, 1)

    def loss(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        captions = batch["caption"]
        device = self.vae.device
        with torch.no_grad():
            cond = self.conditioner(captions).to(self.weight_dtype)
            if self._uncond is None:  # frozen encoders: the empty prompt's conditioning never changes
                self._uncond = self.conditioner([""]).to(self.weight_dtype)
        self.ddim.alphas_cumprod = self.ddim.alphas_cumprod.to(device)
        noise = torch.randn((len(captions), *self.latent_shape), generator=generator, device=device,
                            dtype=self.weight_dtype)
        grad_indices = gradient_step_indices(self.steps, self.K, generator)
        x0 = sample_x0(self.denoiser, noise, cond, self._uncond, self.ddim, self.steps, self.guidance, grad_indices)
        images = self.decode(x0)
        scores = score_images(self.scorer, images, captions, w=self.w, direction="batch", gather=self.gather,
                              train=True, generator=generator)
        loss = reward_loss(scores)
        return loss, {
            "reward": scores.reweighted.detach().mean(),
            "score": scores.total.detach().mean(),
            "text_relevant": scores.text_relevant.detach().mean(),
            "text_irrelevant": scores.text_irrelevant.detach().mean(),
        }
