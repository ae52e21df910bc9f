"""``align``: the diffusion (epsilon, L2) loss on long-text image-caption pairs (SPEC §4).

    x_0 = VAE(image) * s,  t ~ U{0..999},  x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps
    L = || eps - UNet(x_t, t, c) ||^2,      c = segment-level conditioning of the caption,
                                            replaced by the empty prompt's with prob. p = 0.1

With a :class:`..feature_cache.FeatureCache` (fast mode) the frozen VAE encoder and the frozen text
encoders run once per image and caption: the cache keeps each image's latent distribution (mean,
std) and draws ``x_0 = mean + std * n`` with the same generator draw as ``latent_dist.sample``, so
the numbers are the reference's. With a T5 branch the cache keeps T5's hidden states, and the
TextAdapter, which trains, runs on them every step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..conditioning import TextConditioner
from ..feature_cache import FeatureCache


class AlignObjective:
    needs_images = True

    def __init__(self, unet, vae, scheduler, conditioner: TextConditioner, caption_dropout: float,
                 weight_dtype: torch.dtype, cache: FeatureCache | None = None):
        self.unet, self.vae, self.scheduler = unet, vae, scheduler
        self.conditioner, self.caption_dropout, self.weight_dtype = conditioner, caption_dropout, weight_dtype
        self.alphas_cumprod = scheduler.alphas_cumprod
        self.cache = cache

    def _latent_moments(self, pixels: torch.Tensor, keys: list) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of each image's latent distribution, from the cache when given."""
        def encode(positions: list[int] | None = None) -> torch.Tensor:
            dist = self.vae.encode(pixels if positions is None else pixels[positions]).latent_dist
            return torch.stack([dist.mean, dist.std], dim=1)

        with torch.no_grad():
            moments = encode() if self.cache is None else self.cache.get_many(keys, encode, pixels.device)
        return moments[:, 0], moments[:, 1]

    def _context(self, captions: list[str]) -> torch.Tensor:
        if self.cache is None:
            return self.conditioner(captions)
        with torch.no_grad():
            frozen = self.cache.get_many([("text", c) for c in captions],
                                         lambda positions: self.conditioner.frozen([captions[i] for i in positions]),
                                         self.vae.device)
        return self.conditioner.assemble(frozen)

    def loss(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pixels = batch["pixel_values"].to(self.vae.device, self.weight_dtype)
        B = pixels.shape[0]
        device = pixels.device
        drop = torch.rand(B, generator=generator, device=device) < self.caption_dropout
        captions = ["" if d else c for d, c in zip(drop.tolist(), batch["caption"])]
        mean, std = self._latent_moments(pixels, [("image", i) for i in batch["index"]])
        sample = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
        latents = (mean + std * sample) * self.vae.config.scaling_factor  # = latent_dist.sample(generator)
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
        t = torch.randint(0, len(self.alphas_cumprod), (B,), generator=generator, device=device)
        a = self.alphas_cumprod.to(device)[t].view(B, 1, 1, 1).to(latents.dtype)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        context = self._context(captions)
        eps = self.unet(noisy, t, context.to(noisy.dtype)).sample
        loss = F.mse_loss(eps.float(), noise.float())
        return loss, {}
