"""The diffusion model's components for training, from local files only (or ``--tiny``).

``model.pretrained`` is a diffusers folder (``model_index.json`` + ``unet/``, ``vae/``,
``text_encoder/`` (SDXL: and ``text_encoder_2/``), ``tokenizer/``, ``scheduler/``) or a single-file
checkpoint as ComfyUI users have it (``.safetensors`` / ``.ckpt``), read with diffusers'
``from_single_file`` and the family's configs shipped in ``training/configs/<family>`` (so nothing is
looked up on a hub). The family (:mod:`.families`) is decided, and parts that do not fit it refused,
before any weight is built.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .clip_text import TransformersClipBackend, clip_tokenizer
from .conditioning import SDXLClipBackend, TextConditioner
from .config import ModelConfig
from .families import SD15, SDXL, Family, detect, family_named, safetensors_header
from .lora_format import CONFIG_DIR, lora_layers
from .safe_io import (ModelFileError, check_config_sizes, check_pretrained_folder, load_json_object,
                      load_pretrained_folder, meta_model, weight_shapes)
from .t5 import T5Branch
from .tiny import TINY_SDXL_UNET_CONFIG, TINY_UNET_CONFIG, tiny_clip_text_model, tiny_sdxl_text_encoders, tiny_sdxl_unet, tiny_unet, tiny_vae

SD15_CONFIG = os.path.join(CONFIG_DIR, "sd15")


@dataclass
class Components:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDPMScheduler
    family: Family = SD15
    text_encoder_2: CLIPTextModelWithProjection | None = None
    """SDXL's bigG (it reads ``tokenizer``'s ids, padded with 0: :class:`.conditioning.SDXLClipBackend`)."""

    @property
    def text_encoders(self) -> tuple[torch.nn.Module, ...]:
        return tuple(m for m in (self.text_encoder, self.text_encoder_2) if m is not None)

    def frozen_modules(self) -> tuple[torch.nn.Module, ...]:
        """Every model whose weights stay frozen in training (the LoRA is added afterwards)."""
        return (self.unet, self.vae, *self.text_encoders)

    def text_backend(self) -> TransformersClipBackend:
        """The family's text encoders as one segment encoder (:class:`.encode.TextEncoderBackend`)."""
        if self.family.added_conditioning:
            return SDXLClipBackend(self.tokenizer, self.text_encoder, self.text_encoder_2, self.family.pad_token_2)
        return TransformersClipBackend(self.tokenizer, self.text_encoder, self.family.hidden_layer)

    def conditioner(self, token_length: int, t5: T5Branch | None = None) -> TextConditioner:
        """The training conditioner (SDXL: with the pooled row, :func:`.conditioning.join_pooled`)."""
        return TextConditioner(self.text_backend(), token_length, t5, pooled=self.family.added_conditioning)


def sd15_scheduler() -> DDPMScheduler:
    """SD1.5's training noise schedule (scaled-linear betas 0.00085..0.012, 1000 steps, epsilon)."""
    return DDPMScheduler.from_pretrained(SD15_CONFIG, subfolder="scheduler")


def model_family(cfg: ModelConfig) -> Family:
    """The family of ``cfg`` (``model.family``, or detected from ``model.pretrained``), with every part
    of ``cfg`` checked against it; reads configs and file headers only."""
    if cfg.tiny:
        family = SD15 if cfg.family == "auto" else family_named(cfg.family)
    else:
        path = cfg.pretrained
        if not path:
            raise ModelFileError("model.pretrained is not set: give an SD1.5 or SDXL diffusers folder or checkpoint "
                                 "file (or --tiny)")
        if not os.path.exists(path):
            raise ModelFileError(f"model.pretrained: {path!r} does not exist")
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "model_index.json")):
                raise ModelFileError(
                    f"model.pretrained: {path!r} is a folder without model_index.json; expected a diffusers SD1.5 "
                    "folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/) or an SDXL one (also text_encoder_2/)"
                )
        elif not path.lower().endswith((".safetensors", ".ckpt", ".pt", ".pth", ".bin")):
            raise ModelFileError(f"model.pretrained: {path!r} is neither a diffusers folder nor a checkpoint file")
        family = detect(path)
        if cfg.family not in ("auto", family.name):
            raise ModelFileError(f"model.family is {cfg.family!r} but model.pretrained {path!r} is {family.label} "
                                 f"({family.name}); set model.family auto or {family.name}")
    check_parts(cfg, family)
    return family


def check_parts(cfg: ModelConfig, family: Family) -> None:
    """Refuse parts of ``cfg`` made for another family, naming them: LongSD's T5 branch and list LoRAs
    (SD1.5 only) and ``model.init_lora`` files whose layers are not this UNet's."""
    for key in ("t5", "adapter"):
        if getattr(cfg, key) and family is not SD15:
            raise ModelFileError(f"model.{key}: the T5 branch (LongSD's ct5f, TextAdapter) is SD1.5-only and this model "
                                 f"is {family.label}; unset model.{key}")
    layers = {layer.kohya_name: layer for layer in lora_layers(_unet_config(cfg, family))}
    for path in cfg.init_lora:
        if family is SD15 and path.lower().endswith((".pt", ".pth")):
            continue  # LongSD's list format: checked layer by layer when it is read (lora_format)
        if not path.lower().endswith(".safetensors"):
            raise ModelFileError(f"model.init_lora: {path!r} is not a .safetensors LoRA; LongSD's list LoRAs "
                                 f"(.pt) are SD1.5-only and this model is {family.label}")
        check_lora(path, family, layers)


def check_lora(path: str, family: Family, layers: dict) -> None:
    """Refuse a UNet LoRA whose metadata names another family, or whose ``lora_unet_`` layers are not
    layers of this UNet with matching shapes (e.g. an SD1.5 LoRA for SDXL)."""
    header = safetensors_header(path, "model.init_lora")
    meta = header.get("__metadata__") or {}
    version, arch = meta.get("ss_base_model_version", ""), meta.get("modelspec.architecture", "")
    if (version and version.split("_v")[0] != family.base_model_version.split("_v")[0]) or (
            arch and not arch.startswith(family.architecture)):
        raise ModelFileError(f"model.init_lora: {path!r} was trained for {version or arch}; this model is "
                             f"{family.label} ({family.architecture}): expected a {family.label} LoRA")
    wrong = []
    for name, info in header.items():
        if not name.startswith("lora_unet_") or not name.endswith(".lora_down.weight"):
            continue
        stem = name[: -len(".lora_down.weight")]
        layer = layers.get(stem)
        shape = tuple(info.get("shape", ()))
        if layer is None or len(shape) < 2 or layer.lora_shapes(shape[0])[1] != shape:
            wrong.append(stem)
    if wrong:
        raise ModelFileError(f"model.init_lora: {path!r} has {len(wrong)} LoRA layers that are not layers of this "
                             f"{family.label} UNet (e.g. {wrong[0]}): expected a {family.label} LoRA (an SD1.5 LoRA "
                             "does not fit SDXL, nor the reverse)")


def _unet_config(cfg: ModelConfig, family: Family) -> dict:
    """The UNet's config as it will be built (tiny, the folder's, or the shipped single-file one)."""
    if cfg.tiny:
        return dict(TINY_SDXL_UNET_CONFIG if family is SDXL else TINY_UNET_CONFIG)
    folder = cfg.pretrained if os.path.isdir(cfg.pretrained) else (cfg.config or family.configs)
    config = load_json_object(os.path.join(folder, "unet", "config.json"), "model.config" if cfg.config else
                              "model.pretrained")
    return {k: v for k, v in config.items() if not k.startswith("_")}


def load_components(cfg: ModelConfig) -> Components:
    """The family's UNet, VAE, text encoders, tokenizer and noise schedule, in fp32 on the CPU; the
    UNet prepared to read the family's context (:meth:`.families.Family.prepare_unet`)."""
    family = model_family(cfg)
    components = _load(cfg, family)
    family.prepare_unet(components.unet)
    return components


def _load(cfg: ModelConfig, family: Family) -> Components:
    if cfg.tiny:
        if family is SDXL:
            text_encoder, text_encoder_2 = tiny_sdxl_text_encoders()
            return Components(tiny_sdxl_unet(), tiny_vae(), text_encoder, clip_tokenizer(), sd15_scheduler(),
                              family, text_encoder_2)
        return Components(tiny_unet(), tiny_vae(), tiny_clip_text_model(), clip_tokenizer(), sd15_scheduler())
    path = cfg.pretrained
    kw = {"local_files_only": True}
    if os.path.isdir(path):
        what = f"model.pretrained {path!r}"
        for cls, sub in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae")):
            check_pretrained_folder(cls, os.path.join(path, sub), f"{what} {sub}/")
        text_encoders = [load_pretrained_folder(cls, os.path.join(path, sub), f"{what} {sub}/", torch.float32)
                         for cls, sub in zip(TEXT_ENCODER_CLASSES, family.text_encoders)]
        return Components(
            UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw),
            AutoencoderKL.from_pretrained(path, subfolder="vae", **kw),
            text_encoders[0],
            clip_tokenizer(path),
            DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw),
            family,
            *text_encoders[1:],
        )
    config = cfg.config or family.configs
    _check_single_file_configs(path, config, family)
    kw = {"config": config, "local_files_only": True}
    text_encoders = _single_file_text_encoders(path, config, family)
    return Components(
        UNet2DConditionModel.from_single_file(path, subfolder="unet", **kw),
        AutoencoderKL.from_single_file(path, subfolder="vae", **kw),
        text_encoders[0],
        clip_tokenizer(),
        DDPMScheduler.from_pretrained(config, subfolder="scheduler", local_files_only=True),
        family,
        *text_encoders[1:],
    )


TEXT_ENCODER_CLASSES = (CLIPTextModel, CLIPTextModelWithProjection)
"""The classes of a family's text encoders, in ``Family.text_encoders`` order ([L | G])."""


def _check_single_file_configs(path: str, config: str, family: Family) -> None:
    """Before anything is built from a single file: every component config (``model.config`` may be the
    user's) within :data:`.safe_io.SIZE_BOUNDS`, and the components it describes, built on the meta
    device, no larger than the file's weights (``from_single_file`` would fill the rest with random
    weights, in real memory)."""
    shapes = weight_shapes(path, "model.pretrained")
    parts = [(UNet2DConditionModel, "unet"), (AutoencoderKL, "vae"), *zip(TEXT_ENCODER_CLASSES, family.text_encoders)]
    need = 0
    for cls, sub in parts:
        what = f"model.config {os.path.join(config, sub)!r}"
        fields = load_json_object(os.path.join(config, sub, "config.json"), what)
        check_config_sizes(fields, what, len(shapes))
        if hasattr(cls, "config_class"):  # transformers
            settings = cls.config_class.from_dict(fields)
            need += sum(p.numel() for p in meta_model(lambda: cls(settings), what).parameters())
        else:
            need += sum(p.numel() for p in meta_model(lambda: cls.from_config(fields), what).parameters())
    have = sum(math.prod(shape) for shape in shapes.values())
    if need > have:
        raise ModelFileError(f"model.pretrained {path!r}: the configs in {config!r} describe {need:,} parameters but "
                             f"the file holds {have:,} values: configs and weights do not match")


def _single_file_text_encoders(path: str, config: str, family: Family) -> list[torch.nn.Module]:
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm, load_single_file_checkpoint

    checkpoint = load_single_file_checkpoint(path, local_files_only=True)
    return [create_diffusers_clip_model_from_ldm(cls, checkpoint, config=os.path.join(config, sub), local_files_only=True)
            for cls, sub in zip(TEXT_ENCODER_CLASSES, family.text_encoders)]
