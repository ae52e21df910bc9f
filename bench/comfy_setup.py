"""In-process ComfyUI for the benchmarks (the tests' helpers, from ``tests/``)."""
from __future__ import annotations

import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")


def comfy_folder() -> str:
    """ComfyUI's folder from ``LONGALIGN_COMFYUI`` (set by scripts/bench.sh)."""
    root = os.environ.get("LONGALIGN_COMFYUI", "")
    if not os.path.isfile(os.path.join(root, "main.py")):
        raise RuntimeError("LONGALIGN_COMFYUI must point at ComfyUI's folder: run `bash scripts/bench.sh`")
    return root


def comfy_ready(quick: bool) -> None:
    """Import ComfyUI (:func:`comfy_folder`) and the pack; on the GPU when one is there and not
    ``quick`` (ComfyUI's own device management), else as ``--cpu``."""
    root = comfy_folder()
    if TESTS not in sys.path:
        sys.path.append(TESTS)
    from comfy_inprocess import import_comfy, load_pack

    import_comfy(root, cpu=quick or not torch.cuda.is_available())
    load_pack()


TINY_LDM = {"num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1],
            "transformer_depth_output": [1, 1], "transformer_depth_middle": 1}
"""The tiny test UNet's differences from SD1.5 in ComfyUI's (LDM) config terms."""


def comfy_sd15_model(quick: bool):
    """A ComfyUI SD1.5-family ModelPatcher for the SD1.5 (or tiny) UNet, on the CPU."""
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    from diffusers import UNet2DConditionModel

    from training.lora_format import sd15_unet_config

    config = {k: v for k, v in sd15_unet_config().items() if not k.startswith("_")}
    with torch.device("meta"):
        sd = UNet2DConditionModel(**config).state_dict()
    ldm = comfy.model_detection.unet_config_from_diffusers_unet(sd, dtype=torch.float16)
    if quick:
        ldm.update(TINY_LDM)
    model = comfy.supported_models.SD15(ldm).get_model({})
    device = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device), ldm
