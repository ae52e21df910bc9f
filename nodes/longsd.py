"""LongSD Loader and T5 Adapter Loader: glue over ``training.lora_format`` and ``training.t5``.

ComfyUI modules (``folder_paths``, ``comfy.*``) are imported inside the functions, so the pack
imports outside ComfyUI (the headless trainer, unit tests).
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

import torch

from ..training.adapter import is_adapter_folder, load_text_adapter
from ..training.folder_walk import walk_folder
from ..training.lora_format import load_reference_lora, lora_layers, unet_config_from_ldm
from ..training.safe_io import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, ModelFileError, load_tensors
from ..training.t5 import T5Branch, has_t5_tokenizer, is_t5_folder, load_t5_encoder, t5_tokenizer
from .listing import listed
from .paths import confined, resolve_in

NONE = "None"
EXPECTED_FILES = {
    "alignment": "LongSD's alignment LoRA list (s28750_lora_vis.pt) or a safetensors LoRA",
    "reward": "LongSD's reward LoRA list (sd15-reward-3750.pt) or a safetensors LoRA",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_NOT_LOADED = ("lora key not loaded: ", "NOT LOADED ")  # ComfyUI's warnings for unmatched LoRA keys


class _UnmatchedKeys(logging.Handler):
    """Collects the keys ComfyUI's LoRA loader reports as matching no weight."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.keys: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        for prefix in _NOT_LOADED:
            if message.startswith(prefix):
                self.keys.append(message[len(prefix):])


@contextlib.contextmanager
def _unmatched_keys() -> Iterator[list[str]]:
    handler = _UnmatchedKeys()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler.keys
    finally:
        root.removeHandler(handler)


def apply_reference_list(model, path: str, strength: float, role: str):
    """A clone of ``model`` with a reference ``.pt`` list added as weight patches
    ``W + strength * up @ down``: the layers are matched to the model's own UNet config in reference
    order (every shape checked) and keyed straight to its weights, so ComfyUI matches 224 keys
    instead of scanning its whole LoRA key map."""
    import comfy.lora
    import comfy.utils

    ldm_config = model.model.model_config.unet_config
    config = unet_config_from_ldm(ldm_config)
    weights = load_reference_lora(path, config)
    to_ldm = comfy.utils.unet_to_diffusers(ldm_config)
    layers = lora_layers(config)
    missing = [layer.name for layer in layers if f"{layer.name}.weight" not in to_ldm]
    if missing:
        raise ValueError(f"LongSD Loader: {role} LoRA: this model has no weights for layers {missing[:3]}")
    key_map = {layer.kohya_name: "diffusion_model." + to_ldm[f"{layer.name}.weight"] for layer in layers}
    patched = model.clone()
    applied = patched.add_patches(comfy.lora.load_lora(weights, key_map, log_missing=False), strength)
    if len(applied) != len(layers):
        raise ValueError(
            f"LongSD Loader: {role} LoRA {os.path.basename(path)!r}: {len(applied)} of {len(layers)} layers matched this model's weights"
        )
    return patched


def apply_lora(model, clip, path: str, strength: float, role: str):
    """``(model, clip)`` clones with the LoRA at ``path`` added as ComfyUI weight patches
    (``W + strength * alpha/r * up @ down``). A reference ``.pt`` list goes through
    :func:`apply_reference_list`; a safetensors LoRA through ComfyUI's own
    ``comfy.sd.load_lora_for_models``, refused if any key matches nothing (ComfyUI only warns)."""
    import comfy.sd

    if path.lower().endswith(PICKLE_SUFFIXES):
        return apply_reference_list(model, path, strength, role), clip
    weights = load_tensors(path, "LoRA")
    with _unmatched_keys() as unmatched:
        new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, weights, strength, strength)
    if unmatched:
        hint = "; if they are text-encoder weights, connect the clip input" if clip is None else ""
        raise ValueError(
            f"LongSD Loader: {role} LoRA {os.path.basename(path)!r} has {len(unmatched)} keys that match no layer of this "
            f"model, e.g. {unmatched[:3]}; expected a LoRA for this SD1.5 model (LongSD .pt list, kohya or ComfyUI names){hint}"
        )
    return new_model, (new_clip if clip is not None else None)


class LongSDLoader:
    """Makes a stock SD1.5 checkpoint into LongSD: applies the alignment LoRA, then the reward LoRA
    (the reference's order), each as ComfyUI weight patches ``W + strength * up @ down``.

    Takes LongSD's released ``.pt`` lists (``s28750_lora_vis.pt``, ``sd15-reward-3750.pt``: their
    layer order is rebuilt from the UNet and every shape checked) and safetensors LoRAs (the
    converter's output, this pack's trainer outputs). Pair it with T5 Adapter Loader and LongAlign
    Text Encode for LongSD's CLIP + T5 conditioning.
    """

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        loras = [NONE] + folder_paths.get_filename_list("loras")
        strength = {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An SD1.5 model."}),
                "alignment_lora": (loras, {"default": NONE, "tooltip": "Stage 1 (alignment) LoRA, e.g. s28750_lora_vis.pt; applied first."}),
                "alignment_strength": ("FLOAT", {**strength, "tooltip": "1.0 = the reference merge."}),
                "reward_lora": (loras, {"default": NONE, "tooltip": "Stage 2 (reward) LoRA, e.g. sd15-reward-3750.pt; applied after the alignment LoRA."}),
                "reward_strength": ("FLOAT", {**strength, "tooltip": "1.0 = the reference merge."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "Only needed for safetensors LoRAs that also patch the text encoder."}),
            },
        }

    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The patched model.", "The clip, patched where a LoRA has text-encoder weights (None if no clip was given).")
    FUNCTION = "load"
    CATEGORY = "LongAlign/loaders"
    DESCRIPTION = (
        "Turns a stock SD1.5 checkpoint into LongSD, which follows long prompts: applies the alignment "
        "LoRA, then the reward LoRA. Takes LongSD's released .pt files (s28750_lora_vis.pt, "
        "sd15-reward-3750.pt) and safetensors LoRAs from models/loras. Pair it with T5 Adapter Loader "
        "and LongAlign Text Encode for LongSD's CLIP + T5 conditioning."
    )

    def load(self, model, alignment_lora, alignment_strength, reward_lora, reward_strength, clip=None):
        import folder_paths

        for role, name, strength in (("alignment", alignment_lora, alignment_strength), ("reward", reward_lora, reward_strength)):
            if name != NONE and strength != 0:
                path = resolve_in(name, f"LongSD Loader: {role}_lora", folder_paths.get_folder_paths("loras"))
                try:
                    model, clip = apply_lora(model, clip, path, strength, role)
                except ModelFileError as e:  # the file is not what this input takes
                    raise ModelFileError(f"LongSD Loader: {role}_lora {name!r}: expected {EXPECTED_FILES[role]}; {e}") from e
        return (model, clip)


def _walk_text_encoders() -> dict[str, dict[str, str]]:
    """One bounded walk (:func:`training.folder_walk.walk_folder`) of every ``models/text_encoders``
    folder: ``{"t5": ..., "adapter": ..., "files": ...}``, each ``{display name: path}``: T5 folders,
    TextAdapter folders, and single safetensors files outside any model folder (first folder wins)."""
    import folder_paths

    found: dict[str, dict[str, str]] = {"t5": {}, "adapter": {}, "files": {}}
    for root in folder_paths.get_folder_paths("text_encoders"):
        for folder, subfolders, names in walk_folder(root):
            rel = os.path.relpath(folder, root).replace(os.sep, "/")
            kind = None if folder == root else "t5" if is_t5_folder(folder) else "adapter" if is_adapter_folder(folder) else None
            if kind is not None:
                found[kind].setdefault(rel + "/", folder)
                subfolders.clear()
                continue
            for name in names:
                if name.lower().endswith(SAFETENSORS_SUFFIXES):
                    found["files"].setdefault(name if rel == "." else f"{rel}/{name}", os.path.join(folder, name))
    return found


def text_encoder_entries() -> dict[str, dict[str, str]]:
    """:func:`_walk_text_encoders`, off the event loop (:func:`.listing.listed`)."""
    return listed("models/text_encoders", _walk_text_encoders, {"t5": {}, "adapter": {}, "files": {}})


def t5_choices(entries: dict[str, dict[str, str]] | None = None) -> dict[str, str]:
    """T5 encoders: transformers folders and single safetensors files outside any model folder."""
    entries = text_encoder_entries() if entries is None else entries
    return {**entries["t5"], **entries["files"]}


def comfy_t5_tokenizer_dir() -> str:
    """ComfyUI's bundled T5 sentencepiece tokenizer (shared by the T5 family, T5-large included)."""
    import comfy.sd  # `comfy` itself is a namespace package without __file__

    return os.path.join(os.path.dirname(comfy.sd.__file__), "text_encoders", "t5_tokenizer")


def load_t5_branch(t5_path: str, adapter_path: str, dtype: torch.dtype) -> T5Branch:
    """T5 encoder + its tokenizer (the folder's own, else ComfyUI's) + TextAdapter, on the text-encoder device."""
    import comfy.model_management

    device = comfy.model_management.text_encoder_device()
    tokenizer_dir = t5_path if os.path.isdir(t5_path) and has_t5_tokenizer(t5_path) else comfy_t5_tokenizer_dir()
    return T5Branch(
        tokenizer=t5_tokenizer(tokenizer_dir),
        encoder=load_t5_encoder(t5_path, dtype).to(device),
        adapter=load_text_adapter(adapter_path).to(device, dtype),
    )


class T5AdapterLoader:
    """Loads LongSD's T5 branch: a T5 encoder (T5-large for LongSD) and the LaVi-Bridge TextAdapter
    (``s28750_adapter/``), both from ``models/text_encoders``. Connect it to LongAlign Text Encode's
    ``t5_adapter`` input to get the CLIP + T5 ("ct5f") conditioning of 2 x token_length tokens."""

    @classmethod
    def INPUT_TYPES(cls):
        entries = text_encoder_entries()
        return {
            "required": {
                "t5_name": (sorted(t5_choices(entries)) or [NONE], {"tooltip": "A T5 encoder: a transformers folder (config.json + model.safetensors) or one safetensors file."}),
                "adapter_name": (sorted(entries["adapter"]) or [NONE], {"tooltip": "A TextAdapter folder (config.json + diffusion_pytorch_model.safetensors), e.g. s28750_adapter/."}),
                "dtype": (list(DTYPES), {"default": "fp32", "tooltip": "Weights dtype for T5 and the adapter."}),
            }
        }

    RETURN_TYPES = ("T5_ADAPTER",)
    OUTPUT_TOOLTIPS = ("T5 encoder + TextAdapter for LongAlign Text Encode.",)
    FUNCTION = "load"
    CATEGORY = "LongAlign/loaders"
    DESCRIPTION = (
        "Loads LongSD's T5 branch from models/text_encoders: a T5 encoder (T5-large for LongSD) and the "
        "TextAdapter folder (s28750_adapter/). Connect it to LongAlign Text Encode's t5_adapter input "
        "(positive and negative) to get the CLIP + T5 conditioning of 2 x token_length tokens."
    )

    def load(self, t5_name, adapter_name, dtype):
        entries = text_encoder_entries()
        t5 = t5_choices(entries).get(t5_name)
        adapter = entries["adapter"].get(adapter_name)
        if t5 is None or adapter is None:
            raise ValueError(
                f"T5 Adapter Loader: {t5_name!r} / {adapter_name!r} not found in models/text_encoders; expected a T5 "
                "folder or safetensors file and a TextAdapter folder (config.json + diffusion_pytorch_model.safetensors)"
            )
        t5 = confined(t5, "T5 Adapter Loader: t5_name", t5_name)
        adapter = confined(adapter, "T5 Adapter Loader: adapter_name", adapter_name)
        return (load_t5_branch(t5, adapter, DTYPES[dtype]),)
