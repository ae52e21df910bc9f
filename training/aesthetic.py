"""The aesthetic predictor: a linear or MLP head on L2-normalised CLIP image features (TextCraftor's
aesthetic reward, SPEC §5; the LAION "improved aesthetic predictor" is such an MLP on OpenAI CLIP
ViT-L/14 features: Linear 768-1024-128-64-16-1 with dropout and no activations).

    aesthetic(x) = head(f_I),       f_I = E_I(x) / |E_I(x)|

The head is read from a local ``.safetensors`` (or weights-only ``.pt``) file as its Linear layers:
every 2-D ``<prefix>.weight`` (with an optional ``<prefix>.bias``), in the numeric order of the
prefixes (``layers.0``, ``layers.2``, ... ``layers.7``); the layers must chain and end in one output.
Dropout does nothing at inference and there are no activations, so nothing else is needed.
"""
from __future__ import annotations

import re

import torch

from .safe_io import ModelFileError, load_tensors


def _natural(key: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


class AestheticHead(torch.nn.Module):
    """Linear layers applied in order to the normalised image features; output ``(B,)``."""

    def __init__(self, layers: list[torch.nn.Linear]):
        super().__init__()
        self.layers = torch.nn.Sequential(*layers)
        self.requires_grad_(False).eval()

    @property
    def in_features(self) -> int:
        return self.layers[0].in_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features.to(self.layers[0].weight.dtype)).squeeze(-1).float()


def head_from_tensors(tensors: dict[str, torch.Tensor], where: str) -> AestheticHead:
    """Build the head from ``{prefix.weight, prefix.bias}`` tensors (see the module docstring)."""
    prefixes = sorted((k[: -len(".weight")] for k, v in tensors.items() if k.endswith("weight") and v.ndim == 2),
                      key=_natural)
    if not prefixes:
        raise ModelFileError(f"aesthetic head {where}: no 2-D '<name>.weight' tensors; expected the Linear layers of "
                             "a head on CLIP image features (e.g. the LAION aesthetic MLP)")
    layers = []
    for prefix in prefixes:
        weight = tensors[f"{prefix}.weight"].float()
        bias = tensors.get(f"{prefix}.bias")
        if layers and layers[-1].out_features != weight.shape[1]:
            raise ModelFileError(f"aesthetic head {where}: layer {prefix!r} takes {weight.shape[1]} inputs but the "
                                 f"layer before gives {layers[-1].out_features}; expected a chain of Linear layers")
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias.float())
        layers.append(layer)
    if layers[-1].out_features != 1:
        raise ModelFileError(f"aesthetic head {where}: the last layer has {layers[-1].out_features} outputs; "
                             "expected 1 (a score)")
    return AestheticHead(layers)


def load_aesthetic_head(path: str, feature_dim: int, device: torch.device | str = "cpu") -> AestheticHead:
    """The head in ``path``, checked against the CLIP model's image-feature width ``feature_dim``."""
    head = head_from_tensors(load_tensors(path, "aesthetic head"), repr(path))
    if head.in_features != feature_dim:
        raise ModelFileError(f"aesthetic head {path!r} reads {head.in_features}-d features but the CLIP model "
                             f"(textcraftor.aesthetic_clip) gives {feature_dim}-d; expected matching widths "
                             "(the LAION head is for OpenAI CLIP ViT-L/14, 768-d)")
    return head.to(device)
