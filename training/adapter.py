"""LaVi-Bridge's TextAdapter (SPEC §1, T5 branch): T5 hidden states -> the UNet's context width.

    y = FF2(LayerNorm2(FF1(LayerNorm1(x))))
    FF(d -> d_out)(h) = Linear(4d -> d_out)(Dropout(0.1)(a * gelu(b))),  (a, b) = halves of Linear(d -> 2*4d)(h)

with ``FF1 = FF(in_dim -> int_dim)``, ``FF2 = FF(int_dim -> out_dim)``. Parameter names
(``norm1``, ``ff1.net.0.proj``, ``ff1.net.2``, ...) and the config keys (``in_dim``, ``int_dim``,
``out_dim``) are those of the released adapters, so LongSD's ``s28750_adapter/`` folder
(``config.json`` + ``diffusion_pytorch_model.safetensors``) loads with ``from_pretrained`` or, with
every read through :mod:`.safe_io` and clear errors, :func:`load_text_adapter`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from .safe_io import (ModelFileError, check_config_sizes, load_json_object, load_tensors, materialize, meta_model,
                      shape_problems, weight_shapes)

ADAPTER_CONFIG = "config.json"
ADAPTER_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
FF_MULT = 4


class GEGLU(nn.Module):
    """``a * gelu(b)`` with ``(a, b)`` the halves of ``proj(x)``, ``proj = Linear(d, 2 * d_inner)``."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(b)


class FeedForward(nn.Module):
    """``FF(d -> d_out)``: GEGLU to ``4d``, Dropout(0.1), ``Linear(4d, d_out)``."""

    def __init__(self, dim: int, dim_out: int, dropout: float = 0.1):
        super().__init__()
        inner = FF_MULT * dim
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class TextAdapterOutput(BaseOutput):
    """``sample``: the adapted hidden states ``(B, T, out_dim)``."""

    sample: torch.Tensor


class TextAdapter(ModelMixin, ConfigMixin):
    """``x -> FF2(LayerNorm2(FF1(LayerNorm1(x))))``; LongSD: in_dim 1024 (T5-large), int_dim 896, out_dim 768."""

    @register_to_config
    def __init__(self, in_dim: int, int_dim: int, out_dim: int):
        super().__init__()
        self.ff1 = FeedForward(in_dim, int_dim)
        self.ff2 = FeedForward(int_dim, out_dim)
        self.norm1 = nn.LayerNorm(in_dim)
        self.norm2 = nn.LayerNorm(int_dim)

    def forward(self, x: torch.Tensor) -> TextAdapterOutput:
        return TextAdapterOutput(self.ff2(self.norm2(self.ff1(self.norm1(x)))))


def is_adapter_folder(folder: str) -> bool:
    """True if ``folder`` holds a TextAdapter ``config.json`` (keys in_dim, int_dim, out_dim)."""
    path = os.path.join(folder, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {"in_dim", "int_dim", "out_dim"} <= set(config)


def load_text_adapter(folder: str) -> TextAdapter:
    """A TextAdapter from a ``save_pretrained`` folder, in eval mode, fp32; every failure names the file.

    The sizes in config.json are bounded and checked against the weight file's header on the meta
    device before anything is allocated (a 50-byte config must not cost gigabytes)."""
    config_path = os.path.join(folder, ADAPTER_CONFIG)
    if not os.path.isdir(folder):
        raise ModelFileError(f"TextAdapter: {folder!r} is not a folder (expected config.json + diffusion_pytorch_model.safetensors)")
    if not os.path.isfile(config_path):
        raise ModelFileError(
            f"TextAdapter: {config_path!r} is missing; the adapter folder needs config.json with in_dim, int_dim, "
            "out_dim beside diffusion_pytorch_model.safetensors"
        )
    config = load_json_object(config_path, "TextAdapter config")
    try:
        dims = {k: int(config[k]) for k in ("in_dim", "int_dim", "out_dim")}
    except (ValueError, KeyError, TypeError, OverflowError) as e:
        raise ModelFileError(f"TextAdapter: {config_path!r} is not a TextAdapter config (needs integer in_dim, int_dim, out_dim): {e}") from e
    weights = next((os.path.join(folder, w) for w in ADAPTER_WEIGHTS if os.path.isfile(os.path.join(folder, w))), None)
    if weights is None:
        raise ModelFileError(f"TextAdapter: no weights in {folder!r}; expected one of {', '.join(ADAPTER_WEIGHTS)}")
    what = f"TextAdapter {folder!r}"
    check_config_sizes(dims, what)
    shapes = weight_shapes(weights, "TextAdapter weights")
    expected = {k: v.shape for k, v in meta_model(lambda: TextAdapter(**dims), what).state_dict().items()}
    problems = shape_problems(expected, shapes)
    if problems:
        raise ModelFileError(f"TextAdapter: {weights!r} does not match config {dims}: "
                             f"{len(problems)} problems, e.g. {problems[:4]}")
    state = load_tensors(weights, "TextAdapter weights")
    return materialize(lambda: TextAdapter(**dims), state, torch.float32, what).eval()
