"""Model families: everything that differs between SD1.x and SDXL, in one object (DESIGN.md "Model
families"; SPEC §9).

A :class:`Family` is data: the shipped configs, the text encoders and their hidden layer, the
bigG padding token, whether the UNet takes SDXL's added embeddings, the prediction type, the LoRA
key prefixes stock ComfyUI maps, and the LoRA metadata the ecosystem reads. :func:`detect` decides
the family from what the user gives -- a diffusers folder (``model_index.json``, the UNet and
scheduler configs) or a single-file checkpoint (its tensor names, read from the safetensors header
only) -- before any weight is built, and refuses anything else by name (SD2.x: v-prediction, which
no objective here targets).

SDXL's added conditioning travels inside the context tensor, so the sampler, the objectives and the
denoisers pass one tensor as for SD1.x: :func:`.conditioning.join_pooled` appends one row holding
the pooled embedding (``text_embeds``, 1280) and :class:`AddedConditioning`, a forward pre-hook on
the SDXL UNet, takes it off again and adds the micro-conditioning ids of the latent's size, as
ComfyUI does at inference:

    time_ids = (8 h, 8 w, 0, 0, 8 h, 8 w)    (original size, crop top-left, target size; h x w latent)

so at the training resolution ``R`` they are ``(R, R, 0, 0, R, R)`` (CoMat-SDXL: 512).
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Iterable

import torch

from .conditioning import split_pooled
from .lora_format import CONFIG_DIR
from .safe_io import ModelFileError

SD2_REFUSAL = "SD2.x (v-prediction) is not supported for training; use SD1.5 or SDXL"
VAE_SCALE = 8
"""Pixels per latent position (SD1.x and SDXL VAEs)."""


@dataclass(frozen=True)
class Family:
    """One model family (see the module docstring)."""

    name: str
    """``sd15`` or ``sdxl``: the config value and the folder under ``training/configs``."""
    label: str
    text_encoders: tuple[str, ...]
    """diffusers subfolders of the text encoders, in ``[L | G]`` order."""
    hidden_layer: int | None
    """None: the last hidden state with the final LayerNorm (SD1.x); -2: the penultimate, no LayerNorm (SDXL)."""
    lora_te_prefixes: tuple[str, ...]
    """kohya prefix of each text encoder's LoRA keys, as ComfyUI's ``model_lora_keys_clip`` maps them."""
    architecture: str
    """``modelspec.architecture`` of a LoRA for this family."""
    base_model_version: str
    """kohya's ``ss_base_model_version``."""
    added_conditioning: bool = False
    """The UNet takes ``text_embeds`` and ``time_ids`` (``addition_embed_type = "text_time"``)."""
    pad_token_2: int = 0
    """bigG's padding token (ComfyUI and diffusers' ``tokenizer_2``: ``!`` = 0); CLIP-L pads with EOS."""
    prediction_type: str = "epsilon"
    cross_attention_dim: int = 768

    @property
    def configs(self) -> str:
        """The shipped diffusers configs for single-file checkpoints."""
        return os.path.join(CONFIG_DIR, self.name)

    def lora_metadata(self) -> dict[str, str]:
        """What a LoRA file of this family records (SAI model spec and kohya), besides ours."""
        return {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"{self.architecture}/lora",
                "ss_base_model_version": self.base_model_version, "longalign.family": self.name}

    def prepare_unet(self, unet: torch.nn.Module) -> None:
        """Install what the UNet needs to read this family's context (SDXL: :class:`AddedConditioning`)."""
        if self.added_conditioning:
            unet.register_forward_pre_hook(AddedConditioning(unet.config.projection_class_embeddings_input_dim
                                                             - 6 * unet.config.addition_time_embed_dim),
                                           with_kwargs=True)


SD15 = Family("sd15", "SD1.x", ("text_encoder",), None, ("lora_te_",), "stable-diffusion-v1", "sd_v1")
SDXL = Family("sdxl", "SDXL", ("text_encoder", "text_encoder_2"), -2, ("lora_te1_", "lora_te2_"),
              "stable-diffusion-xl-v1-base", "sdxl_base_v1-0", added_conditioning=True, cross_attention_dim=2048)
FAMILIES = {f.name: f for f in (SD15, SDXL)}


class AddedConditioning:
    """Forward pre-hook of an SDXL UNet: the context's last row carries the pooled embedding
    (:func:`.conditioning.join_pooled`); it becomes ``added_cond_kwargs`` with the time ids of the
    latent's size (module docstring). A call that passes ``added_cond_kwargs`` itself is left alone."""

    def __init__(self, pooled_dim: int):
        self.pooled_dim = pooled_dim

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if kwargs.get("added_cond_kwargs") is not None:
            return args, kwargs
        args = list(args)
        context = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
        hidden, pooled = split_pooled(context, self.pooled_dim)
        if len(args) > 2:
            args[2] = hidden
        else:
            kwargs["encoder_hidden_states"] = hidden
        sample = args[0] if args else kwargs["sample"]
        h, w = sample.shape[-2] * VAE_SCALE, sample.shape[-1] * VAE_SCALE
        time_ids = torch.tensor([h, w, 0, 0, h, w], device=hidden.device, dtype=hidden.dtype)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids.expand(hidden.shape[0], 6)}
        return tuple(args), kwargs


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"model.pretrained: {what} {path!r} cannot be read as JSON: {e}") from e
    if not isinstance(data, dict):
        raise ModelFileError(f"model.pretrained: {what} {path!r} is not a JSON object")
    return data


def detect_folder(path: str) -> Family:
    """The family of a diffusers folder, from ``model_index.json`` and the UNet/scheduler configs."""
    index = _read_json(os.path.join(path, "model_index.json"), "model_index.json")
    pipeline = index.get("_class_name")
    unet_config = os.path.join(path, "unet", "config.json")
    if not os.path.isfile(unet_config):
        raise ModelFileError(f"model.pretrained: {path!r} has no unet/config.json; expected a diffusers SD1.5 or "
                             "SDXL folder (unet/, vae/, text_encoder/, scheduler/, and text_encoder_2/ for SDXL)")
    unet = _read_json(unet_config, "UNet config")
    scheduler_config = os.path.join(path, "scheduler", "scheduler_config.json")
    prediction = (_read_json(scheduler_config, "scheduler config").get("prediction_type", "epsilon")
                  if os.path.isfile(scheduler_config) else "epsilon")
    context, added = unet.get("cross_attention_dim"), unet.get("addition_embed_type")
    found = (f"pipeline {pipeline!r}, UNet cross_attention_dim {context!r}, addition_embed_type {added!r}, "
             f"prediction_type {prediction!r}")
    if pipeline == "StableDiffusionXLPipeline" and context == 2048 and added == "text_time":
        family = SDXL
    elif pipeline == "StableDiffusionPipeline" and context == 768 and added is None:
        family = SD15
    elif pipeline == "StableDiffusionPipeline" and context == 1024:
        raise ModelFileError(f"model.pretrained: {path!r} is SD2.x ({found}): {SD2_REFUSAL}")
    else:
        raise ModelFileError(f"model.pretrained: {path!r} is not a model family the trainer supports ({found}); "
                             "expected SD1.x (StableDiffusionPipeline, context 768) or SDXL base "
                             "(StableDiffusionXLPipeline, context 2048, text_time)")
    if prediction != family.prediction_type:
        raise ModelFileError(f"model.pretrained: {path!r} ({found}) predicts {prediction!r}; the trainer's objectives "
                             f"target {family.prediction_type!r} ({SD2_REFUSAL})")
    for sub in family.text_encoders:
        if not os.path.isfile(os.path.join(path, sub, "config.json")):
            raise ModelFileError(f"model.pretrained: the {family.label} folder {path!r} has no {sub}/config.json; "
                                 f"expected the text encoders {', '.join(family.text_encoders)}")
    return family


def safetensors_header(path: str, what: str) -> dict:
    """The JSON header of a .safetensors file (names, dtypes, shapes, ``__metadata__``); no tensor is read."""
    try:
        with open(path, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            if size > 100 * 2**20:
                raise ValueError(f"header of {size} bytes")
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{what}: {path!r} is not a readable .safetensors file: {e}") from e
    if not isinstance(header, dict):
        raise ModelFileError(f"{what}: {path!r} has a malformed .safetensors header")
    return header


def checkpoint_keys(path: str) -> list[str]:
    """The tensor names of a single-file checkpoint, without reading its tensors (safetensors: the
    header; a pickled ``.ckpt``: a memory-mapped weights-only load)."""
    if path.lower().endswith(".safetensors"):
        return [k for k in safetensors_header(path, "model.pretrained") if k != "__metadata__"]
    from .safe_io import load_pickle

    data = load_pickle(path, "model.pretrained")
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelFileError(f"model.pretrained: {path!r} holds a {type(data).__name__}, not a state dict")
    return [str(k) for k in data]


def detect_keys(keys: Iterable[str], what: str) -> Family:
    """The family of a single-file checkpoint (LDM names, as ComfyUI users have them) by its keys."""
    keys = list(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("conditioner.embedders.1.model.") and has("conditioner.embedders.0.transformer."):
        return SDXL
    if has("cond_stage_model.model."):
        raise ModelFileError(f"model.pretrained: {what} is SD2.x (OpenCLIP-H text encoder, cond_stage_model.model.*): "
                             f"{SD2_REFUSAL}")
    if has("cond_stage_model.transformer.") and has("model.diffusion_model.") and not has("model.diffusion_model.label_emb."):
        return SD15
    roots = sorted({".".join(k.split(".")[:2]) for k in keys})
    refiner = " (an SDXL refiner: bigG only)" if has("conditioner.embedders.0.model.") else ""
    raise ModelFileError(
        f"model.pretrained: {what} is not a checkpoint of a family the trainer supports{refiner}: its keys start with "
        f"{roots[:8]}{' ...' if len(roots) > 8 else ''}; expected SD1.x (model.diffusion_model.*, "
        "cond_stage_model.transformer.*) or SDXL base (conditioner.embedders.0.transformer.*, conditioner.embedders.1.model.*)")


def detect(path: str) -> Family:
    """The family of ``model.pretrained`` (a diffusers folder or a single file); refuses SD2.x and
    anything unknown with a message naming what was found. Reads configs and key names only."""
    if os.path.isdir(path):
        return detect_folder(path)
    return detect_keys(checkpoint_keys(path), repr(path))


def family_named(name: str) -> Family:
    """The family called ``name`` (``sd15``, ``sdxl``)."""
    if name not in FAMILIES:
        raise ModelFileError(f"model.family: {name!r} is not one of {sorted(FAMILIES)}")
    return FAMILIES[name]
