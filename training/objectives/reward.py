"""``reward``: decomposed preference optimisation through the differentiable sampler (SPEC §4).

Per batch of prompts: pure noise -> :func:`..sampling.sample_x0` (50 DDIM steps, CFG 7.5, K = 5
gradient calls; ``reward_lcm``: ``solver`` = :class:`..sampling.LCM`, 4 steps, no CFG) -> VAE decode with gradient -> image in [0, 1] -> reweighted decomposed score
``s_w`` (:mod:`..scoring`), with ``v`` gathered over all processes ->

    L = 0.5 (1 - mean_b s_w,b)

Two ways to decode and score, the same numbers:

* ``decode_chunk = 0`` (reference): the whole batch decoded with gradient, activations kept
  (about 24 GiB at batch 8 on SD1.5, SPEC §8);
* ``decode_chunk = c`` (fast): decoded and scored without a graph, then, in backward, ``c`` images
  at a time decoded again with gradient and back-propagated into ``x0``. ``s_w,b`` depends on image
  ``b`` only once ``f_T`` and ``v`` are fixed (they come from text), so this is exact; the random
  crop is drawn once per batch and replayed in every chunk.

The stage needs prompts only. ``reference_encodes_images`` reproduces the reference's cost of
VAE-encoding a batch of images every step (it used them only for the noise's shape); it is for
``--mode reference`` measurements and changes no number.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..conditioning import TextConditioner
from ..reward_models import PreferenceModel
from ..sampling import DDIM, Denoiser, gradient_step_indices, sample_x0
from ..scoring import decompose, image_features, resolve_direction, text_features

SCORE_COLUMNS = ("reweighted", "total", "text_relevant", "text_irrelevant")


def _chunks(x: torch.Tensor, size: int) -> list[tuple[int, torch.Tensor]]:
    return [(start, x[start: start + size]) for start in range(0, x.shape[0], size)]


def replayed_generator(saved: tuple[str, torch.Tensor]) -> torch.Generator:
    """A generator in the saved ``(device, state)``: every chunk of a batch draws the batch's one crop."""
    generator = torch.Generator(device=saved[0])
    generator.set_state(saved[1])
    return generator


class ChunkedDecodeScore(torch.autograd.Function):
    """``scores = cat_c fn(x0_c, start_c)`` computed without a graph; backward recomputes ``fn``
    chunk by chunk with gradient and returns ``d scores / d x0``."""

    @staticmethod
    def forward(ctx, x0: torch.Tensor, fn: Callable[[torch.Tensor, int], torch.Tensor], chunk: int) -> torch.Tensor:
        ctx.fn, ctx.chunk = fn, chunk
        ctx.save_for_backward(x0)
        with torch.no_grad():
            return torch.cat([fn(part, start) for start, part in _chunks(x0, chunk)])

    @staticmethod
    def backward(ctx, grad_scores: torch.Tensor):
        (x0,) = ctx.saved_tensors
        grads = []
        for start, part in _chunks(x0, ctx.chunk):
            with torch.enable_grad():
                part = part.detach().requires_grad_(True)
                scores = ctx.fn(part, start)
                grads.append(torch.autograd.grad(scores, part, grad_scores[start: start + part.shape[0]])[0])
        return torch.cat(grads), None, None


class RewardObjective:
    needs_images = False

    def __init__(self, denoiser: Denoiser, vae, scheduler, conditioner: TextConditioner, scorer: PreferenceModel,
                 latent_shape: tuple[int, int, int], steps: int, guidance: float, grad_steps: int, w: float,
                 gather: Callable[[torch.Tensor], torch.Tensor] | None, weight_dtype: torch.dtype,
                 decode_chunk: int = 0, reference_encodes_images: bool = False, solver: DDIM | None = None):
        self.denoiser, self.vae, self.conditioner, self.scorer = denoiser, vae, conditioner, scorer
        self.ddim = solver or DDIM(scheduler.alphas_cumprod, scheduler.config.num_train_timesteps)
        self.latent_shape, self.steps, self.guidance, self.K, self.w = latent_shape, steps, guidance, grad_steps, w
        self.gather, self.weight_dtype = gather, weight_dtype
        self.decode_chunk, self.reference_encodes_images = decode_chunk, reference_encodes_images
        self._uncond: torch.Tensor | None = None

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        image = self.vae.decode(x0.to(self.weight_dtype) / self.vae.config.scaling_factor).sample
        return (image.float() * 0.5 + 0.5).clamp(0, 1)

    def _scores(self, x0: torch.Tensor, f_T: torch.Tensor, direction, crop: tuple[str, torch.Tensor]) -> torch.Tensor:
        """``(n, 4)``: the :data:`SCORE_COLUMNS` of each image of ``x0``; ``crop`` = (device, generator
        state) replays the batch's one random crop."""
        f_I = image_features(self.scorer, self.decode(x0), train=True, generator=replayed_generator(crop))
        s = decompose(f_T, f_I, direction, self.w)
        return torch.stack([s.reweighted, s.total, s.text_relevant, s.text_irrelevant], dim=1)

    def loss(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        captions = batch["caption"]
        device = self.vae.device
        B = len(captions)
        with torch.no_grad():
            cond = self.conditioner(captions).to(self.weight_dtype)
            if self._uncond is None:  # frozen encoders: the empty prompt's conditioning never changes
                self._uncond = self.conditioner([""]).to(self.weight_dtype)
            if self.reference_encodes_images:
                h, w = self.latent_shape[1] * 8, self.latent_shape[2] * 8
                self.vae.encode(torch.rand(B, 3, h, w, device=device, dtype=self.weight_dtype))
            f_T = text_features(self.scorer, captions)
            direction = resolve_direction(self.scorer, "batch", f_T, gather=self.gather)
        self.ddim.alphas_cumprod = self.ddim.alphas_cumprod.to(device)
        noise = torch.randn((B, *self.latent_shape), generator=generator, device=device, dtype=self.weight_dtype)
        grad_indices = gradient_step_indices(self.steps, self.K, generator)
        crop = (str(generator.device), generator.get_state())
        x0 = sample_x0(self.denoiser, noise, cond, self._uncond, self.ddim, self.steps, self.guidance, grad_indices,
                       generator=generator)
        if self.decode_chunk:
            fn = lambda part, start: self._scores(part, f_T[start: start + part.shape[0]], direction, crop)  # noqa: E731
            columns = ChunkedDecodeScore.apply(x0, fn, self.decode_chunk)
        else:
            columns = self._scores(x0, f_T, direction, crop)
        loss = 0.5 * (1.0 - columns[:, 0].mean())
        means = columns.detach().mean(dim=0)
        return loss, {"reward": means[0], "score": means[1], "text_relevant": means[2], "text_irrelevant": means[3]}
