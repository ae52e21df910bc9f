"""Validation images during training: a few prompts sampled with the model as it is now.

DDIM, 25 steps, CFG 7.5, fixed noise (the reference samples with UniPC 25 steps; DDIM reuses the
trainer's one sampler), saved as a PNG grid under ``samples/`` and to TensorBoard.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from .denoisers import CheckpointedUNet
from .safe_io import atomic_path
from .sampling import DDIM, sample_x0

VALIDATION_STEPS = 25
VALIDATION_GUIDANCE = 7.5


@torch.no_grad()
def validation_images(unet, vae, scheduler, conditioner, prompts: list[str], resolution: int,
                      dtype: torch.dtype, seed: int = 0) -> np.ndarray:
    """``(N, H, W, 3)`` uint8 images of ``prompts``."""
    device = vae.device
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (len(prompts), unet.config.in_channels, resolution // factor, resolution // factor)
    noise = torch.randn(shape, generator=torch.Generator(device=device).manual_seed(seed), device=device, dtype=dtype)
    ddim = DDIM(scheduler.alphas_cumprod.to(device), scheduler.config.num_train_timesteps)
    cond, uncond = conditioner(prompts).to(dtype), conditioner([""]).to(dtype)
    was_training = unet.training
    unet.eval()
    x0 = sample_x0(CheckpointedUNet(unet), noise, cond, uncond, ddim, VALIDATION_STEPS, VALIDATION_GUIDANCE)
    unet.train(was_training)
    images = vae.decode(x0 / vae.config.scaling_factor).sample.float()
    return ((images * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: np.ndarray, path: str) -> str:
    """The images side by side in one PNG, written atomically."""
    grid = Image.fromarray(np.concatenate(list(images), axis=1))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return path
