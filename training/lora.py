"""LoRA on the UNet through peft, saved in the key format ComfyUI's stock ``LoraLoader`` applies.

Targets (SPEC §4): every ``nn.Linear`` / ``nn.Conv2d`` inside ``ResnetBlock2D``, ``Attention`` and
``GEGLU`` modules (:func:`.lora_format.lora_layers`; 224 layers on SD1.5). Initialisation as the
reference: ``down ~ N(0, 1/r)``, ``up = 0`` (peft's ``init_lora_weights="gaussian"``); the layer
computes ``W x + (alpha / r) up(down(x))``.

Saved names are kohya's (``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``):
peft's own names are ignored by ComfyUI for SD1.x UNets.

The CLIP text encoder (TextCraftor) takes LoRA on every attention projection and MLP Linear of its
layers (``self_attn.{q,k,v,out}_proj``, ``mlp.fc1/fc2``: the layers ComfyUI's ``LORA_CLIP_MAP``
maps), saved as ``lora_te_text_model_encoder_layers_<i>_<module>`` (SDXL: ``lora_te1_`` for CLIP-L,
``lora_te2_`` for bigG); a fully fine-tuned encoder is saved as ComfyUI weight differences
``text_encoders.clip_l.transformer.<param>.diff`` / ``.diff_b`` (SDXL's bigG: ``clip_g``).
"""
from __future__ import annotations

import contextlib
import re
from typing import Iterator, Mapping

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

from .lora_format import LoraLayer, lora_layers

ADAPTER = "default"


ATTENTION_PROJECTION = re.compile(r"\.attn\d\.(?:to_q|to_k|to_v|to_out\.0)$")
"""``targets = "attention"`` (CoMat): the query, key, value and output projections of every attention."""


def unet_lora_layers(unet: torch.nn.Module, targets: str = "reference") -> tuple[LoraLayer, ...]:
    """The target layers of this UNet (from its config), in reference order: ``reference`` (SPEC §4)
    or ``attention`` (the ``to_q/to_k/to_v/to_out`` subset, SPEC §6)."""
    layers = lora_layers({k: v for k, v in dict(unet.config).items() if not k.startswith("_")})
    if targets == "attention":
        return tuple(layer for layer in layers if ATTENTION_PROJECTION.search(layer.name))
    if targets != "reference":
        raise ValueError(f"lora.targets must be 'reference' or 'attention', got {targets!r}")
    return layers


def injected_lora_layers(unet: torch.nn.Module) -> tuple[LoraLayer, ...]:
    """The target layers that carry an injected LoRA, in reference order."""
    return tuple(layer for layer in unet_lora_layers(unet)
                 if isinstance(unet.get_submodule(layer.name), BaseTunerLayer))


def add_lora(unet: torch.nn.Module, rank: int, alpha: float, dropout: float = 0.0,
             targets: str = "reference") -> list[torch.nn.Parameter]:
    """Inject trainable LoRA layers into ``unet`` (in place) on ``targets`` (:func:`unet_lora_layers`)
    and return their parameters."""
    if rank < 1:
        raise ValueError(f"lora.rank must be >= 1, got {rank}")
    config = PeftLoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
        target_modules=[layer.name for layer in unet_lora_layers(unet, targets)],
    )
    inject_adapter_in_model(config, unet, adapter_name=ADAPTER)
    params = [p for n, p in unet.named_parameters() if ".lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def kohya_state_dict(unet: torch.nn.Module, alpha: float, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The injected LoRA as kohya-named tensors (``lora_down`` = peft's A, ``lora_up`` = B)."""
    peft_sd = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    out: dict[str, torch.Tensor] = {}
    for layer in injected_lora_layers(unet):
        down = peft_sd[f"{layer.name}.lora_A.weight"]
        up = peft_sd[f"{layer.name}.lora_B.weight"]
        out[f"{layer.kohya_name}.lora_down.weight"] = down.detach().to("cpu", dtype).contiguous()
        out[f"{layer.kohya_name}.lora_up.weight"] = up.detach().to("cpu", dtype).contiguous()
        out[f"{layer.kohya_name}.alpha"] = torch.tensor(float(alpha))
    return out


@torch.no_grad()
def _merge(weights: Mapping[str, torch.Tensor], named: Mapping[str, torch.Tensor], strength: float) -> int:
    """``W <- W + strength * (alpha / r) up @ down`` for every kohya name of ``weights`` that ``named``
    covers; returns the number of layers merged."""
    merged = 0
    for kohya, weight in weights.items():
        up = named.get(f"{kohya}.lora_up.weight")
        down = named.get(f"{kohya}.lora_down.weight")
        if up is None or down is None:
            continue
        alpha = named.get(f"{kohya}.alpha")
        scale = strength * (1.0 if alpha is None else float(alpha) / down.shape[0])
        delta = (up.flatten(1).float() @ down.flatten(1).float()).reshape(weight.shape)
        weight.add_((scale * delta).to(weight.dtype))
        merged += 1
    return merged


def merge_kohya_lora(unet: torch.nn.Module, named: Mapping[str, torch.Tensor], strength: float = 1.0) -> int:
    """Merge a kohya UNet LoRA into ``unet``; returns the number of layers merged. Used to start the
    reward stage from the merged alignment LoRA."""
    modules = dict(unet.named_modules())
    merged = _merge({layer.kohya_name: modules[layer.name].weight for layer in unet_lora_layers(unet)}, named, strength)
    if merged == 0:
        raise ValueError("the LoRA has no weights for this UNet's target layers (wrong architecture or format)")
    return merged


TEXT_LORA_TARGET = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])$")


def text_encoder_lora_targets(text_encoder: torch.nn.Module, prefix: str = "lora_te_") -> dict[str, str]:
    """``{module name: kohya name}`` of the text encoder's LoRA targets (every layer's attention
    projections and MLP Linears), e.g. ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``
    (``prefix``: SDXL's ``lora_te1_`` / ``lora_te2_``)."""
    targets = {}
    for name, module in text_encoder.named_modules():
        match = TEXT_LORA_TARGET.search(name)
        if match and isinstance(module, (torch.nn.Linear, BaseTunerLayer)):
            targets[name] = f"{prefix}text_model_encoder_layers_{match[1]}_{match[2].replace('.', '_')}"
    if not targets:
        raise ValueError("the text encoder has no encoder.layers.<i>.self_attn/mlp Linear layers (not a CLIP text model)")
    return targets


def add_text_encoder_lora(text_encoder: torch.nn.Module, rank: int, alpha: float) -> list[torch.nn.Parameter]:
    """Inject trainable LoRA (float32, ``up = 0``) into the CLIP text encoder; returns its parameters."""
    if rank < 1:
        raise ValueError(f"textcraftor.rank must be >= 1, got {rank}")
    config = PeftLoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                            target_modules=list(text_encoder_lora_targets(text_encoder)))
    inject_adapter_in_model(config, text_encoder, adapter_name=ADAPTER)
    params = [p for n, p in text_encoder.named_parameters() if ".lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def text_encoder_kohya_state_dict(text_encoder: torch.nn.Module, alpha: float, dtype: torch.dtype = torch.float16,
                                  prefix: str = "lora_te_") -> dict[str, torch.Tensor]:
    """The text encoder's injected LoRA under kohya ``prefix`` names (ComfyUI's LoraLoader, CLIP side)."""
    out: dict[str, torch.Tensor] = {}
    for name, kohya in text_encoder_lora_targets(text_encoder, prefix).items():
        layer = text_encoder.get_submodule(name)
        out[f"{kohya}.lora_down.weight"] = layer.lora_A[ADAPTER].weight.detach().to("cpu", dtype).contiguous()
        out[f"{kohya}.lora_up.weight"] = layer.lora_B[ADAPTER].weight.detach().to("cpu", dtype).contiguous()
        out[f"{kohya}.alpha"] = torch.tensor(float(alpha))
    return out


def merge_text_encoder_lora(text_encoder: torch.nn.Module, named: Mapping[str, torch.Tensor],
                            strength: float = 1.0, prefix: str = "lora_te_") -> int:
    """Merge a ``prefix`` LoRA into a plain CLIP text encoder; returns the number of layers merged."""
    weights = {kohya: text_encoder.get_submodule(name).weight
               for name, kohya in text_encoder_lora_targets(text_encoder, prefix).items()}
    merged = _merge(weights, named, strength)
    if merged == 0:
        raise ValueError(f"the LoRA has no {prefix} weights for this text encoder's layers")
    return merged


def comfy_clip_name(param: str, clip: str = "clip_l") -> str:
    """A transformers ``CLIPTextModel`` parameter name as ComfyUI's CLIP state-dict key prefix
    (``clip``: ``clip_l``, SDXL's bigG ``clip_g``; transformers 5 drops ``text_model.`` from the names)."""
    name = param if param.startswith(("text_model.", "text_projection")) else "text_model." + param
    return f"text_encoders.{clip}.transformer." + name


def text_encoder_diff_state_dict(text_encoder: torch.nn.Module, original: Mapping[str, torch.Tensor],
                                 dtype: torch.dtype = torch.float16, clip: str = "clip_l") -> dict[str, torch.Tensor]:
    """A fully fine-tuned encoder as ComfyUI weight differences (``.diff`` for weights, ``.diff_b``
    for biases) against ``original`` (``named_parameters`` values before training)."""
    out: dict[str, torch.Tensor] = {}
    for name, p in text_encoder.named_parameters():
        if name not in original:
            continue
        stem, kind = name.rsplit(".", 1)
        suffix = {"weight": "diff", "bias": "diff_b"}[kind]
        delta = p.detach().float().cpu() - original[name].float().cpu()
        out[f"{comfy_clip_name(stem, clip)}.{suffix}"] = delta.to(dtype).contiguous()
    return out


@contextlib.contextmanager
def adapters_disabled(module: torch.nn.Module) -> Iterator[None]:
    """Run ``module`` without its peft adapters (the frozen original: TextCraftor's original encoder,
    LCM's teacher), restoring them afterwards."""
    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
