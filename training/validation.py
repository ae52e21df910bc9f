"""Validation images during training: a few fixed prompts sampled from fixed noise with the model as
it is now, so the grids of successive steps compare.

DDIM, 25 steps, CFG 7.5 by default (align; the reference samples with UniPC 25 steps; DDIM reuses the
trainer's one sampler); the reward stages sample as they train (their solver, steps, guidance). Saved as a PNG
grid labelled with the step and each image's prompt under ``samples/`` and to TensorBoard.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .denoisers import CheckpointedUNet
from .safe_io import atomic_path
from .sampling import DDIM, sample_x0

VALIDATION_STEPS = 25
VALIDATION_GUIDANCE = 7.5


@torch.no_grad()
def validation_images(unet, vae, scheduler, conditioner, prompts: list[str], resolution: int,
                      dtype: torch.dtype, seed: int = 0, solver: DDIM | None = None, steps: int = VALIDATION_STEPS,
                      guidance: float = VALIDATION_GUIDANCE) -> np.ndarray:
    """``(N, H, W, 3)`` uint8 images of ``prompts``, from noise (and LCM re-noising) seeded by ``seed``."""
    device = vae.device
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (len(prompts), unet.config.in_channels, resolution // factor, resolution // factor)
    generator = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    solver = solver or DDIM(scheduler.alphas_cumprod, scheduler.config.num_train_timesteps)
    solver = dataclasses.replace(solver, alphas_cumprod=solver.alphas_cumprod.to(device))
    cond, uncond = conditioner(prompts).to(dtype), conditioner([""]).to(dtype)
    was_training = unet.training
    unet.eval()
    x0 = sample_x0(CheckpointedUNet(unet), noise, cond, uncond, solver, steps, guidance, generator=generator)
    unet.train(was_training)
    images = vae.decode(x0 / vae.config.scaling_factor).sample.float()
    return ((images * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


MIN_CELL_WIDTH = 128
"""Narrower images are centred in cells this wide, so their labels stay readable."""
MAX_LABEL_LINES = 4


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int) -> list[str]:
    """``text`` broken at spaces into lines at most ``width`` pixels wide; the last kept line ends in
    an ellipsis when text is left over."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate, font=font) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        while lines[-1] and draw.textlength(lines[-1] + " ...", font=font) > width:
            lines[-1] = lines[-1][:-1]
        lines[-1] += " ..."
    return lines


def _line_height(font) -> int:
    return font.getbbox("Ag")[3] + 3


def header_height() -> int:
    """Rows of :func:`labelled_grid`'s header (the step) above the images."""
    return _line_height(ImageFont.load_default()) + 4


def labelled_grid(images: np.ndarray, step: int, prompts: list[str]) -> np.ndarray:
    """``(H', W', 3)`` uint8: a header naming ``step``, then the images side by side, each over its
    prompt (wrapped, at most :data:`MAX_LABEL_LINES` lines), black on white in PIL's default font."""
    n, h, w, _ = images.shape
    cell = max(w, MIN_CELL_WIDTH)
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = _line_height(font)
    labels = [_wrap(measure, prompts[i] if i < len(prompts) else "", font, cell - 4, MAX_LABEL_LINES) for i in range(n)]
    header = header_height()
    label_h = max(len(lines) for lines in labels) * line_h + 4
    grid = Image.new("RGB", (n * cell, header + h + label_h), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((2, 2), f"step {step}", fill="black", font=font)
    for i, (image, lines) in enumerate(zip(images, labels)):
        grid.paste(Image.fromarray(image), (i * cell + (cell - w) // 2, header))
        for j, line in enumerate(lines):
            draw.text((i * cell + 2, header + h + 2 + j * line_h), line, fill="black", font=font)
    return np.asarray(grid)


def save_image(image: np.ndarray, path: str) -> str:
    """``(H, W, 3)`` uint8 as a PNG, written atomically."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return path
