"""Model families: everything that differs between SD1.x and SDXL, in one object (DESIGN.md "Model
families"; SPEC §9).

A :class:`Family` is data: the shipped configs, the text encoders and their hidden layer, the
bigG padding token, whether the UNet takes SDXL's added embeddings, the prediction type, the LoRA
key prefixes stock ComfyUI maps, and the LoRA metadata the ecosystem reads. :func:`detect` decides
the family from what the user gives -- a diffusers folder (``model_index.json``, the UNet and
scheduler configs) or a single-file checkpoint (its tensor names, read from the safetensors header
only) -- before any weight is built, and refuses anything else by name (SD2.x: v-prediction, which
no objective here targets). The reading itself is :mod:`.family_detect`'s (standard library only, so
the config's resolution uses the same detector before torch is imported).

SDXL's added conditioning travels inside the context tensor, so the sampler, the objectives and the
denoisers pass one tensor as for SD1.x: :func:`.conditioning.join_pooled` appends one row holding
the pooled embedding (``text_embeds``, 1280) and :class:`AddedConditioning`, a forward pre-hook on
the SDXL UNet, takes it off again and adds the micro-conditioning ids of the latent's size, as
ComfyUI does at inference:

    time_ids = (8 h, 8 w, 0, 0, 8 h, 8 w)    (original size, crop top-left, target size; h x w latent)

so at the training resolution ``R`` they are ``(R, R, 0, 0, R, R)`` (CoMat-SDXL: 512).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from . import family_detect
from .conditioning import split_pooled
from .family_detect import TEXT_ENCODERS
from .lora_format import CONFIG_DIR
from .safe_io import ModelFileError

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


SD15 = Family("sd15", "SD1.x", TEXT_ENCODERS["sd15"], None, ("lora_te_",), "stable-diffusion-v1", "sd_v1")
SDXL = Family("sdxl", "SDXL", TEXT_ENCODERS["sdxl"], -2, ("lora_te1_", "lora_te2_"),
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


@contextlib.contextmanager
def _model_file_errors() -> Iterator[None]:
    """:class:`.family_detect.DetectionError` (the torch-free detector's) as :class:`.safe_io.ModelFileError`."""
    try:
        yield
    except family_detect.DetectionError as e:
        raise ModelFileError(str(e)) from e


def detect_folder(path: str) -> Family:
    """The family of a diffusers folder, from ``model_index.json`` and the UNet/scheduler configs
    (:func:`.family_detect.folder_family`)."""
    with _model_file_errors():
        return FAMILIES[family_detect.folder_family(path)]


def safetensors_header(path: str, what: str) -> dict:
    """The JSON header of a .safetensors file (names, dtypes, shapes, ``__metadata__``); no tensor is read."""
    with _model_file_errors():
        return family_detect.safetensors_header(path, what)


def checkpoint_keys(path: str) -> list[str]:
    """The tensor names of a single-file checkpoint, without reading its tensors (safetensors: the
    header; a pickled ``.ckpt``: a memory-mapped weights-only load)."""
    if path.lower().endswith(".safetensors"):
        with _model_file_errors():
            return family_detect.safetensors_keys(path)
    from .safe_io import load_pickle

    data = load_pickle(path, "model.pretrained")
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelFileError(f"model.pretrained: {path!r} holds a {type(data).__name__}, not a state dict")
    return [str(k) for k in data]


def detect_keys(keys: Iterable[str], what: str) -> Family:
    """The family of a single-file checkpoint (LDM names, as ComfyUI users have them) by its keys
    (:func:`.family_detect.keys_family`)."""
    with _model_file_errors():
        return FAMILIES[family_detect.keys_family(keys, what)]


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
