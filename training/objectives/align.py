"""``align``: the diffusion (epsilon, L2) loss on long-text image-caption pairs (SPEC §4).

    x_0 = VAE(image) * s,  t ~ U{0..999},  x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps
    L = || eps - UNet(x_t, t, c) ||^2,      c = segment-level conditioning of the caption,
                                            replaced by the empty prompt's with prob. p = 0.1
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..conditioning import TextConditioner


class AlignObjective:
    needs_images = True

    def __init__(self, unet, vae, scheduler, conditioner: TextConditioner, caption_dropout: float, weight_dtype: torch.dtype):
        self.unet, self.vae, self.scheduler = unet, vae, scheduler
        self.conditioner, self.caption_dropout, self.weight_dtype = conditioner, caption_dropout, weight_dtype
        self.alphas_cumprod = scheduler.alphas_cumprod

    def loss(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pixels = batch["pixel_values"].to(self.vae.device, self.weight_dtype)
        B = pixels.shape[0]
        device = pixels.device
        drop = torch.rand(B, generator=generator, device=device) < self.caption_dropout
        captions = ["" if d else c for d, c in zip(drop.tolist(), batch["caption"])]
        with torch.no_grad():
            latents = self.vae.encode(pixels).latent_dist.sample(generator=generator) * self.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
        t = torch.randint(0, len(self.alphas_cumprod), (B,), generator=generator, device=device)
        a = self.alphas_cumprod.to(device)[t].view(B, 1, 1, 1).to(latents.dtype)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        context = self.conditioner(captions)
        eps = self.unet(noisy, t, context.to(noisy.dtype)).sample
        loss = F.mse_loss(eps.float(), noise.float())
        return loss, {}
