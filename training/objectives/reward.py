"""``reward``: decomposed preference optimisation through the differentiable sampler (SPEC §4).

Per batch of prompts: pure noise -> :func:`..sampling.sample_x0` (50 DDIM steps, CFG 7.5, K = 5
gradient calls; ``reward_lcm``: ``solver`` = :class:`..sampling.LCM`, 4 steps, no CFG) -> VAE decode with gradient -> image in [0, 1] -> reweighted decomposed score
``s_w`` (:mod:`..scoring`), with ``v`` gathered over all processes ->

    L = 0.5 (1 - mean_b s_w,b)

Two ways to decode and score, the same numbers:

* ``decode_chunk = 0`` (reference): the whole batch decoded with gradient, activations kept
  (about 24 GiB at batch 8 on SD1.5, SPEC §8);
* ``decode_chunk = c`` (fast): ``c`` images at a time decoded and scored with gradient, and the
  gradient of their ``s_w`` back-propagated into ``x0`` at once, before the next chunk
  (:class:`ChunkedDecodeScore`). ``s_w,b`` depends on image ``b`` only once ``f_T`` and ``v`` are
  fixed (they come from text), so this is exact; the random crop is drawn once per batch and
  replayed in every chunk.

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
    """``score, columns = ChunkedDecodeScore.apply(x0, fn, chunk)``: ``columns = cat_c fn(x0_c, start_c)``
    (``(n,)`` or ``(n, C)``, image by image) and ``score`` its first column, the only one that carries a
    gradient (the others are for logging).

    Each chunk is decoded and scored once, with gradient, in forward, and ``d score_b / d x0_b`` is
    kept (the size of ``x0``); backward scales it by the incoming gradient. That is exact because
    ``score_b`` depends on image ``b`` alone (so the gradient of ``sum_b score_b`` holds every image's
    own), and it decodes every image once, not once without a graph and again in backward.
    """

    @staticmethod
    def forward(ctx, x0: torch.Tensor, fn: Callable[[torch.Tensor, int], torch.Tensor], chunk: int):
        columns, grads = [], []
        for start, part in _chunks(x0, chunk):
            with torch.enable_grad():
                part = part.detach().requires_grad_(True)
                out = fn(part, start)
                first = out if out.ndim == 1 else out[:, 0]
                grads.append(torch.autograd.grad(first.sum(), part)[0])
            columns.append(out.detach())
        ctx.save_for_backward(torch.cat(grads))
        columns = torch.cat(columns)
        ctx.mark_non_differentiable(columns)
        return (columns if columns.ndim == 1 else columns[:, 0]).clone(), columns

    @staticmethod
    def backward(ctx, grad_score: torch.Tensor, _grad_columns: torch.Tensor):
        (jacobian,) = ctx.saved_tensors
        return grad_score.view(-1, *([1] * (jacobian.ndim - 1))).to(jacobian.dtype) * jacobian, None, None


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
            reweighted, columns = ChunkedDecodeScore.apply(x0, fn, self.decode_chunk)
        else:
            columns = self._scores(x0, f_T, direction, crop)
            reweighted = columns[:, 0]
        loss = 0.5 * (1.0 - reweighted.mean())
        means = columns.detach().mean(dim=0)
        return loss, {"reward": means[0], "score": means[1], "text_relevant": means[2], "text_irrelevant": means[3]}
