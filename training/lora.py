"""LoRA on the UNet through peft, saved in the key format ComfyUI's stock ``LoraLoader`` applies.

Targets (SPEC §4): every ``nn.Linear`` / ``nn.Conv2d`` inside ``ResnetBlock2D``, ``Attention`` and
``GEGLU`` modules (:func:`.lora_format.lora_layers`; 224 layers on SD1.5). Initialisation as the
reference: ``down ~ N(0, 1/r)``, ``up = 0`` (peft's ``init_lora_weights="gaussian"``); the layer
computes ``W x + (alpha / r) up(down(x))``.

Saved names are kohya's (``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``):
peft's own names are ignored by ComfyUI for SD1.x UNets.
"""
from __future__ import annotations

from typing import Mapping

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model_state_dict, inject_adapter_in_model

from .lora_format import LoraLayer, lora_layers

ADAPTER = "default"


def unet_lora_layers(unet: torch.nn.Module) -> tuple[LoraLayer, ...]:
    """The target layers of this UNet (from its config), in reference order."""
    return lora_layers({k: v for k, v in dict(unet.config).items() if not k.startswith("_")})


def add_lora(unet: torch.nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> list[torch.nn.Parameter]:
    """Inject trainable LoRA layers into ``unet`` (in place) and return their parameters."""
    if rank < 1:
        raise ValueError(f"lora.rank must be >= 1, got {rank}")
    config = PeftLoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
        target_modules=[layer.name for layer in unet_lora_layers(unet)],
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
    for layer in unet_lora_layers(unet):
        down = peft_sd[f"{layer.name}.lora_A.weight"]
        up = peft_sd[f"{layer.name}.lora_B.weight"]
        out[f"{layer.kohya_name}.lora_down.weight"] = down.detach().to("cpu", dtype).contiguous()
        out[f"{layer.kohya_name}.lora_up.weight"] = up.detach().to("cpu", dtype).contiguous()
        out[f"{layer.kohya_name}.alpha"] = torch.tensor(float(alpha))
    return out


@torch.no_grad()
def merge_kohya_lora(unet: torch.nn.Module, named: Mapping[str, torch.Tensor], strength: float = 1.0) -> int:
    """``W <- W + strength * (alpha / r) up @ down`` for every layer ``named`` covers; returns the
    number of layers merged. Used to start the reward stage from the merged alignment LoRA."""
    modules = dict(unet.named_modules())
    merged = 0
    for layer in unet_lora_layers(unet):
        up = named.get(f"{layer.kohya_name}.lora_up.weight")
        down = named.get(f"{layer.kohya_name}.lora_down.weight")
        if up is None or down is None:
            continue
        alpha = named.get(f"{layer.kohya_name}.alpha")
        scale = strength * (1.0 if alpha is None else float(alpha) / down.shape[0])
        weight = modules[layer.name].weight
        delta = (up.flatten(1).float() @ down.flatten(1).float()).reshape(weight.shape)
        weight.add_((scale * delta).to(weight.dtype))
        merged += 1
    if merged == 0:
        raise ValueError("the LoRA has no weights for this UNet's target layers (wrong architecture or format)")
    return merged
