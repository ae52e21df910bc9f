"""The diffusion model's components for training, from local files only (or ``--tiny``).

``model.pretrained`` is a diffusers SD1.5 folder (``model_index.json`` + ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``) or a single-file checkpoint as ComfyUI users have
it (``.safetensors`` / ``.ckpt``), read with diffusers' ``from_single_file`` and the SD1.5 configs
shipped in ``training/configs/sd15`` (so nothing is looked up on a hub).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from .clip_text import clip_tokenizer
from .config import ModelConfig
from .lora_format import CONFIG_DIR
from .safe_io import ModelFileError
from .tiny import tiny_clip_text_model, tiny_unet, tiny_vae

SD15_CONFIG = os.path.join(CONFIG_DIR, "sd15")


@dataclass
class Components:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDPMScheduler


def sd15_scheduler() -> DDPMScheduler:
    """SD1.5's training noise schedule (scaled-linear betas 0.00085..0.012, 1000 steps, epsilon)."""
    return DDPMScheduler.from_pretrained(SD15_CONFIG, subfolder="scheduler")


def load_components(cfg: ModelConfig) -> Components:
    """UNet, VAE, CLIP text encoder, tokenizer and noise schedule, in fp32 on the CPU."""
    if cfg.tiny:
        return Components(tiny_unet(), tiny_vae(), tiny_clip_text_model(), clip_tokenizer(), sd15_scheduler())
    path = cfg.pretrained
    if not path:
        raise ModelFileError("model.pretrained is not set: give an SD1.5 diffusers folder or checkpoint file (or --tiny)")
    if not os.path.exists(path):
        raise ModelFileError(f"model.pretrained: {path!r} does not exist")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise ModelFileError(
                f"model.pretrained: {path!r} is a folder without model_index.json; expected a diffusers "
                "SD1.5 folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
            )
        kw = {"local_files_only": True}
        return Components(
            UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw),
            AutoencoderKL.from_pretrained(path, subfolder="vae", **kw),
            CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw),
            clip_tokenizer(path),
            DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw),
        )
    if not path.lower().endswith((".safetensors", ".ckpt", ".pt", ".pth", ".bin")):
        raise ModelFileError(f"model.pretrained: {path!r} is neither a diffusers folder nor a checkpoint file")
    config = cfg.config or SD15_CONFIG
    kw = {"config": config, "local_files_only": True}
    return Components(
        UNet2DConditionModel.from_single_file(path, subfolder="unet", **kw),
        AutoencoderKL.from_single_file(path, subfolder="vae", **kw),
        _single_file_text_encoder(path, config),
        clip_tokenizer(),
        DDPMScheduler.from_pretrained(config, subfolder="scheduler"),
    )


def _single_file_text_encoder(path: str, config: str) -> CLIPTextModel:
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm, load_single_file_checkpoint

    checkpoint = load_single_file_checkpoint(path, local_files_only=True)
    return create_diffusers_clip_model_from_ldm(
        CLIPTextModel, checkpoint, config=os.path.join(config, "text_encoder"), local_files_only=True
    )
