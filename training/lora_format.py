"""The LongSD reference LoRA list format <-> named LoRA weights ComfyUI's stock loader reads (SPEC §2).

LongSD's ``s28750_lora_vis.pt`` and ``sd15-reward-3750.pt`` are each ``torch.save`` of a plain list
of fp16 tensors ``[up_0, down_0, up_1, down_1, ...]`` with no names. The order is the order in which
the reference meets its target layers:

    for module in unet.modules():                          # registration order, not forward order
        if type(module).__name__ in {ResnetBlock2D, Attention, CrossAttention, GEGLU}:
            for child in module.named_modules():           # again registration order
                if child is nn.Linear or nn.Conv2d: yield child

On SD1.5 that is 224 layers (80 in the 22 ResnetBlock2D: conv1, time_emb_proj, conv2 and the 14
conv_shortcuts; 144 in the 16 transformer blocks: to_q, to_k, to_v, to_out.0 of attn1 and attn2 and
the GEGLU's proj). Because diffusers registers ``down_blocks``, ``up_blocks`` and then ``mid_block``,
and inside a block its ``attentions`` before its ``resnets``, the order is not the forward order:
it can only be rebuilt from the architecture, which is why the diffusers UNet is built here from its
config on the meta device (no weights, no download). For SD1.5, the only architecture LongSD's files
are made for, the order is not left to the installed diffusers: it is shipped as a fixed table,
``assets/sd15_lora_order.json`` (224 names and weight shapes), and the rebuild is checked against
it: same layers in another order -> the table's order is used and a warning names the first
difference; a rebuild whose names and shapes are those of SD1.5 always gets the table.

Shapes, for a layer with weight ``W`` and rank ``r``:
  Linear ``W (out, in)``:        up ``(out, r)``, down ``(r, in)``
  Conv2d ``W (out, in, k, k)``:  up ``(out, r, 1, 1)``, down ``(r, in, k, k)`` (the layer's stride/padding)
and the merged weight is ``W' = W + scale * up.flatten(1) @ down.flatten(1)`` reshaped to ``W``'s
shape, with ``scale = 1`` (the reference has no alpha). In kohya/ComfyUI terms the scale is
``alpha / r``, so named weights carry ``alpha = r``.

Named weights use kohya names, ``lora_unet_<diffusers module name with '.' -> '_'>.lora_up.weight``
/ ``.lora_down.weight`` / ``.alpha``, which ComfyUI's stock ``LoraLoader`` maps onto SD1.x UNets
(peft/diffusers names do not load there).
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .safe_io import ModelFileError, load_pickle

TARGET_MODULE_CLASSES = frozenset({"ResnetBlock2D", "Attention", "CrossAttention", "GEGLU"})
"""Classes whose Linear/Conv2d descendants carry the reference LoRA (``VIS_REPLACE_MODULES``)."""
REFERENCE_RANK = 32
KOHYA_PREFIX = "lora_unet_"
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
SD15_ORDER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "sd15_lora_order.json")
SD15_LAYER_COUNT = 224


@dataclass(frozen=True)
class LoraLayer:
    """One target layer of the UNet, in reference order."""

    name: str
    """diffusers module name, e.g. ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``."""
    weight_shape: tuple[int, ...]
    """``(out, in)`` for Linear, ``(out, in, kh, kw)`` for Conv2d."""

    @property
    def is_conv(self) -> bool:
        return len(self.weight_shape) == 4

    @property
    def kohya_name(self) -> str:
        """The key stem ComfyUI's LoRA loader maps onto this layer."""
        return KOHYA_PREFIX + self.name.replace(".", "_")

    def lora_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(up shape, down shape)`` for rank ``rank`` (see the module docstring)."""
        out_ch, in_ch, *kernel = self.weight_shape
        if self.is_conv:
            return (out_ch, rank, 1, 1), (rank, in_ch, *kernel)
        return (out_ch, rank), (rank, in_ch)


def sd15_unet_config() -> dict[str, Any]:
    """The SD1.5 ``UNet2DConditionModel`` config shipped in ``training/configs/sd15/unet``."""
    with open(os.path.join(CONFIG_DIR, "sd15", "unet", "config.json"), encoding="utf-8") as f:
        return json.load(f)


def unet_config_from_ldm(ldm: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers ``UNet2DConditionModel`` config with the layer shapes of an LDM-style UNet config
    (the ``unet_config`` ComfyUI detects from a checkpoint: ``model_channels``, ``channel_mult``,
    ``num_res_blocks``, ``transformer_depth``, ``transformer_depth_middle``, ``context_dim``, ...).

    Only what decides the target layers and their shapes is carried over.
    """
    try:
        mult = list(ldm["channel_mult"])
        res_blocks = list(ldm["num_res_blocks"])
        depth = list(ldm["transformer_depth"])
        depth_middle = int(ldm.get("transformer_depth_middle", 1))
        channels = int(ldm["model_channels"])
        context_dim = ldm["context_dim"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"UNet config {dict(ldm)!r} lacks the LDM field {e}: not an SD-family UNet") from e
    if depth_middle < 1:
        raise ValueError(f"UNet config has transformer_depth_middle {depth_middle}: not an SD1.x-style UNet")
    starts = [sum(res_blocks[:i]) for i in range(len(mult))]
    level_depth = [depth[s] if s < len(depth) else 0 for s in starts]
    down = ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in level_depth]
    up = ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(level_depth)]
    heads = ldm.get("num_heads", -1)
    return {
        "in_channels": int(ldm.get("in_channels", 4)),
        "out_channels": int(ldm.get("out_channels", 4)),
        "block_out_channels": [channels * m for m in mult],
        "layers_per_block": res_blocks if len(set(res_blocks)) > 1 else res_blocks[0],
        "down_block_types": down,
        "up_block_types": up,
        "transformer_layers_per_block": [max(d, 1) for d in level_depth],
        "cross_attention_dim": int(context_dim),
        "attention_head_dim": heads if isinstance(heads, int) and heads > 0 else 8,
        "use_linear_projection": bool(ldm.get("use_linear_in_transformer", False)),
        "norm_num_groups": 32,
    }


@lru_cache(maxsize=8)
def _layers_for(config_json: str) -> tuple[LoraLayer, ...]:
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in json.loads(config_json).items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    names = {id(m): n for n, m in unet.named_modules()}
    layers = []
    for module in unet.modules():
        if type(module).__name__ in TARGET_MODULE_CLASSES:
            for child_name, child in module.named_modules():
                if isinstance(child, (nn.Linear, nn.Conv2d)):
                    layers.append(LoraLayer(f"{names[id(module)]}.{child_name}", tuple(child.weight.shape)))
    return tuple(layers)


@lru_cache(maxsize=1)
def sd15_reference_order(path: str = SD15_ORDER_FILE) -> tuple[LoraLayer, ...]:
    """The SD1.5 target layers in LongSD's order, from the shipped table (checked: 224 distinct names,
    each with a 2-d or 4-d weight shape)."""
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)["layers"]
    layers = tuple(LoraLayer(str(name), tuple(int(n) for n in shape)) for name, shape in rows)
    if len(layers) != SD15_LAYER_COUNT or len({layer.name for layer in layers}) != SD15_LAYER_COUNT or any(
        len(layer.weight_shape) not in (2, 4) for layer in layers
    ):
        raise RuntimeError(f"{path}: expected {SD15_LAYER_COUNT} distinct layers with 2-d or 4-d weight shapes, "
                           f"found {len(layers)} rows ({len({layer.name for layer in layers})} distinct names); "
                           "the pack's files are damaged: reinstall it")
    return layers


def checked_against_sd15(rebuilt: Sequence[LoraLayer]) -> tuple[LoraLayer, ...]:
    """``rebuilt`` itself, or the shipped SD1.5 table when ``rebuilt`` holds exactly its layers (names
    and shapes); a rebuild that holds them in another order (a diffusers release that registers
    modules differently) is warned about, since the shape checks cannot see a swap of equal shapes."""
    table = sd15_reference_order()
    if {layer.name: layer.weight_shape for layer in rebuilt} != {layer.name: layer.weight_shape for layer in table}:
        return tuple(rebuilt)
    if tuple(rebuilt) != table:
        i = next(i for i, (a, b) in enumerate(zip(rebuilt, table)) if a != b)
        warnings.warn(
            f"the installed diffusers registers the SD1.5 UNet's LoRA layers in another order than LongSD's "
            f"(layer {i}: {rebuilt[i].name}, expected {table[i].name}); using the shipped order "
            f"({os.path.basename(SD15_ORDER_FILE)})", stacklevel=3)
    return table


def lora_layers(unet_config: Mapping[str, Any] | None = None) -> tuple[LoraLayer, ...]:
    """The target layers of a diffusers UNet config (default SD1.5), in reference order (cached);
    SD1.5's order comes from the shipped table (:func:`checked_against_sd15`)."""
    config = sd15_unet_config() if unet_config is None else dict(unet_config)
    return checked_against_sd15(_layers_for(json.dumps(config, sort_keys=True, default=list)))


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def named_from_list(
    tensors: Sequence[Any], layers: Sequence[LoraLayer], source: str = "LoRA list"
) -> dict[str, torch.Tensor]:
    """Kohya-named weights from a reference list ``[up_0, down_0, ...]``, every shape checked.

    Each layer gets ``<stem>.lora_up.weight``, ``<stem>.lora_down.weight`` and ``<stem>.alpha = r``
    (so ComfyUI's ``alpha / r`` scale is the reference's 1). Raises :class:`ModelFileError` naming
    what was expected and what was found.
    """
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in tensors):
        found = type(tensors).__name__
        if isinstance(tensors, (list, tuple)):
            found += " containing " + ", ".join(sorted({type(t).__name__ for t in tensors}))
        raise ModelFileError(f"{source}: expected a plain list of tensors [up_0, down_0, up_1, ...], found {found}")
    if len(tensors) != 2 * len(layers):
        raise ModelFileError(
            f"{source}: expected {2 * len(layers)} tensors ({len(layers)} layers x [up, down]) for this UNet, "
            f"found {len(tensors)}; the file was made for a different architecture (LongSD files are SD1.5)"
        )
    named: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        up, down = tensors[2 * i], tensors[2 * i + 1]
        rank = down.shape[0] if down.ndim > 0 else 0
        want_up, want_down = layer.lora_shapes(rank)
        if rank < 1 or _shape(up) != want_up or _shape(down) != want_down:
            raise ModelFileError(
                f"{source}: layer {i} ({layer.name}, weight {layer.weight_shape}) expects up {want_up} and "
                f"down {want_down} (rank r = down.shape[0]); found tensors {2 * i} and {2 * i + 1} with shapes "
                f"{_shape(up)} and {_shape(down)}: the file does not match this UNet"
            )
        named[f"{layer.kohya_name}.lora_up.weight"] = up
        named[f"{layer.kohya_name}.lora_down.weight"] = down
        named[f"{layer.kohya_name}.alpha"] = torch.tensor(float(rank))
    return named


def list_from_named(named: Mapping[str, torch.Tensor], layers: Sequence[LoraLayer]) -> list[torch.Tensor]:
    """The reference list from kohya-named weights, with ``up`` scaled by ``alpha / r`` so that the
    list's scale-1 merge equals ComfyUI's (inverse of :func:`named_from_list`)."""
    out: list[torch.Tensor] = []
    for layer in layers:
        try:
            up = named[f"{layer.kohya_name}.lora_up.weight"]
            down = named[f"{layer.kohya_name}.lora_down.weight"]
        except KeyError as e:
            raise ValueError(f"named LoRA weights lack {e} for layer {layer.name}") from e
        alpha = named.get(f"{layer.kohya_name}.alpha")
        scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
        out += [up * scale if scale != 1.0 else up, down]
    return out


def load_reference_lora(path: str, unet_config: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Read a reference ``.pt`` list (weights-only unpickling: nothing in the file runs) and return
    kohya-named weights for the UNet ``unet_config`` (default SD1.5)."""
    obj = load_pickle(path, "LongSD LoRA list")
    return named_from_list(obj, lora_layers(unet_config), source=f"LongSD LoRA list {path!r}")
