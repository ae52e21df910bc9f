"""Which model family ``model.pretrained`` is, with the standard library only (issue #17).

The one detector: :mod:`.families` maps its answer onto a :class:`.families.Family` (and raises
:class:`.safe_io.ModelFileError`), and :func:`.config.resolve` calls it before torch is imported, so
family-dependent defaults (CoMat-SDXL's) apply with ``model.family auto``. It reads

- a diffusers folder: ``model_index.json`` ``_class_name``, the UNet config (``cross_attention_dim``,
  ``addition_embed_type``) and the scheduler's ``prediction_type``;
- a ``.safetensors`` file: its header only (8-byte little-endian length, then JSON; at most
  :data:`HEADER_LIMIT` bytes), the tensor names' LDM prefixes (:data:`SDXL_PREFIXES`, ...).

A pickled ``.ckpt`` cannot be read without torch: :func:`family_name` answers None for it.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterable

SD2_REFUSAL = "SD2.x (v-prediction) is not supported for training; use SD1.5 or SDXL"
HEADER_LIMIT = 100 * 2**20
"""Largest .safetensors header read (bytes); an SDXL checkpoint's is about 0.2 MiB."""

SDXL_PREFIXES = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")
"""CLIP-L and OpenCLIP bigG of an SDXL base checkpoint (both present)."""
SD15_PREFIXES = ("cond_stage_model.transformer.", "model.diffusion_model.")
"""SD1.x's CLIP-L and UNet (both present, and no SDXL ``label_emb``)."""
SDXL_UNET_ADM_PREFIX = "model.diffusion_model.label_emb."
SD2_PREFIX = "cond_stage_model.model."
"""SD2.x's OpenCLIP-H text encoder."""
REFINER_PREFIX = "conditioner.embedders.0.model."
"""An SDXL refiner's only text encoder (bigG)."""

TEXT_ENCODERS = {"sd15": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2")}
"""diffusers subfolders of each family's text encoders, in ``[L | G]`` order."""
LABELS = {"sd15": "SD1.x", "sdxl": "SDXL"}
PREDICTION_TYPE = "epsilon"
"""What every supported family predicts (the objectives' target)."""


class DetectionError(ValueError):
    """What the user gave is unreadable or of an unsupported family; the message names it."""


def read_json(path: str, what: str) -> dict:
    """A JSON object from ``path``, or :class:`DetectionError` naming ``what``."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DetectionError(f"model.pretrained: {what} {path!r} cannot be read as JSON: {e}") from e
    if not isinstance(data, dict):
        raise DetectionError(f"model.pretrained: {what} {path!r} is not a JSON object")
    return data


def safetensors_header(path: str, what: str) -> dict:
    """The JSON header of a .safetensors file (names, dtypes, shapes, ``__metadata__``); no tensor is read."""
    try:
        with open(path, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            if size > HEADER_LIMIT:
                raise ValueError(f"header of {size} bytes (at most {HEADER_LIMIT})")
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise DetectionError(f"{what}: {path!r} is not a readable .safetensors file: {e}") from e
    if not isinstance(header, dict):
        raise DetectionError(f"{what}: {path!r} has a malformed .safetensors header")
    return header


def folder_family(path: str) -> str:
    """The family name (``sd15``, ``sdxl``) of a diffusers folder; SD2.x and others refused by name."""
    index = read_json(os.path.join(path, "model_index.json"), "model_index.json")
    pipeline = index.get("_class_name")
    unet_config = os.path.join(path, "unet", "config.json")
    if not os.path.isfile(unet_config):
        raise DetectionError(f"model.pretrained: {path!r} has no unet/config.json; expected a diffusers SD1.5 or "
                             "SDXL folder (unet/, vae/, text_encoder/, scheduler/, and text_encoder_2/ for SDXL)")
    unet = read_json(unet_config, "UNet config")
    scheduler_config = os.path.join(path, "scheduler", "scheduler_config.json")
    prediction = (read_json(scheduler_config, "scheduler config").get("prediction_type", "epsilon")
                  if os.path.isfile(scheduler_config) else "epsilon")
    context, added = unet.get("cross_attention_dim"), unet.get("addition_embed_type")
    found = (f"pipeline {pipeline!r}, UNet cross_attention_dim {context!r}, addition_embed_type {added!r}, "
             f"prediction_type {prediction!r}")
    if pipeline == "StableDiffusionXLPipeline" and context == 2048 and added == "text_time":
        family = "sdxl"
    elif pipeline == "StableDiffusionPipeline" and context == 768 and added is None:
        family = "sd15"
    elif pipeline == "StableDiffusionPipeline" and context == 1024:
        raise DetectionError(f"model.pretrained: {path!r} is SD2.x ({found}): {SD2_REFUSAL}")
    else:
        raise DetectionError(f"model.pretrained: {path!r} is not a model family the trainer supports ({found}); "
                             "expected SD1.x (StableDiffusionPipeline, context 768) or SDXL base "
                             "(StableDiffusionXLPipeline, context 2048, text_time)")
    if prediction != PREDICTION_TYPE:
        raise DetectionError(f"model.pretrained: {path!r} ({found}) predicts {prediction!r}; the trainer's objectives "
                             f"target {PREDICTION_TYPE!r} ({SD2_REFUSAL})")
    for sub in TEXT_ENCODERS[family]:
        if not os.path.isfile(os.path.join(path, sub, "config.json")):
            raise DetectionError(f"model.pretrained: the {LABELS[family]} folder {path!r} has no {sub}/config.json; "
                                 f"expected the text encoders {', '.join(TEXT_ENCODERS[family])}")
    return family


def keys_family(keys: Iterable[str], what: str) -> str:
    """The family name of a single-file checkpoint (LDM names, as ComfyUI users have them) by its keys."""
    keys = list(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if all(has(p) for p in SDXL_PREFIXES):
        return "sdxl"
    if has(SD2_PREFIX):
        raise DetectionError(f"model.pretrained: {what} is SD2.x (OpenCLIP-H text encoder, {SD2_PREFIX}*): "
                             f"{SD2_REFUSAL}")
    if all(has(p) for p in SD15_PREFIXES) and not has(SDXL_UNET_ADM_PREFIX):
        return "sd15"
    roots = sorted({".".join(k.split(".")[:2]) for k in keys})
    refiner = " (an SDXL refiner: bigG only)" if has(REFINER_PREFIX) else ""
    raise DetectionError(
        f"model.pretrained: {what} is not a checkpoint of a family the trainer supports{refiner}: its keys start with "
        f"{roots[:8]}{' ...' if len(roots) > 8 else ''}; expected SD1.x (model.diffusion_model.*, "
        "cond_stage_model.transformer.*) or SDXL base (conditioner.embedders.0.transformer.*, conditioner.embedders.1.model.*)")


def safetensors_keys(path: str, what: str = "model.pretrained") -> list[str]:
    """The tensor names of a .safetensors file, from its header."""
    return [k for k in safetensors_header(path, what) if k != "__metadata__"]


def family_name(path: str) -> str | None:
    """The family name of ``model.pretrained`` (a diffusers folder or a .safetensors file), or None for a
    pickled checkpoint, whose names need torch to read. Unsupported families raise :class:`DetectionError`."""
    if os.path.isdir(path):
        return folder_family(path)
    if path.lower().endswith(".safetensors"):
        return keys_family(safetensors_keys(path), repr(path))
    return None
