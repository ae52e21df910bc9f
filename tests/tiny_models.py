"""Tiny models with the real classes and on-disk formats, built with fixed seeds (no download).

* :func:`tiny_clip_text_model`: a transformers ``CLIPTextModel`` with CLIP-L widths (768) and few
  layers, the real CLIP BPE vocabulary size.
* :func:`build_tiny_sd15_checkpoint`: a single-file SD1.5-format checkpoint (LDM keys, fp16) that
  ComfyUI's stock ``CheckpointLoaderSimple`` detects as SD1.5: a one-level 320-channel diffusers
  ``UNet2DConditionModel`` mapped to LDM names with ComfyUI's own key map, the full ViT-L/14 text
  encoder (ComfyUI needs all its layers), and a TAESD-format VAE.
"""
from __future__ import annotations

import os

import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

TINY_UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(320,), down_block_types=("CrossAttnDownBlock2D",),
    up_block_types=("CrossAttnUpBlock2D",), cross_attention_dim=768, attention_head_dim=8,
    norm_num_groups=32,
)
"""Passes ComfyUI's SD1.5 detection: model_channels 320, context 768, no linear proj."""


def tiny_clip_text_model(num_layers: int = 2, seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=num_layers,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    return CLIPTextModel(config).eval()


def clip_ldm_state_dict(model: CLIPTextModel) -> dict[str, torch.Tensor]:
    """The text encoder's weights under the ``text_model.`` names of SD checkpoints and ComfyUI
    (transformers 5 drops that prefix from ``CLIPTextModel.state_dict()``)."""
    return {
        (k if k.startswith("text_model.") else "text_model." + k): v.contiguous()
        for k, v in model.state_dict().items()
    }


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_UNET_CONFIG).eval()


def _ldm_unet_state_dict(unet) -> dict[str, torch.Tensor]:
    import comfy.utils

    unet_config = {
        "num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1],
        "transformer_depth_output": [1, 1], "transformer_depth_middle": 1,
    }
    diffusers_to_ldm = comfy.utils.unet_to_diffusers(unet_config)
    sd = unet.state_dict()
    out = {}
    for name, ldm in diffusers_to_ldm.items():
        if name in sd:
            out["model.diffusion_model." + ldm] = sd.pop(name)
    if sd:
        raise RuntimeError(f"UNet keys without an LDM name: {sorted(sd)[:5]}")
    return out


def _taesd_state_dict(seed: int) -> dict[str, torch.Tensor]:
    import comfy.taesd.taesd

    torch.manual_seed(seed)
    vae = comfy.taesd.taesd.TAESD()
    out = {}
    for name, tensor in vae.state_dict().items():
        if name.endswith("weight") and tensor.ndim == 4:
            fan_in = tensor.shape[1] * tensor.shape[2] * tensor.shape[3]
            tensor = torch.randn(tensor.shape) * (1.0 / fan_in) ** 0.5
        elif name.endswith("bias"):
            tensor = torch.zeros(tensor.shape)
        out["first_stage_model." + name] = tensor
    return out


def build_tiny_sd15_checkpoint(path: str, seed: int = 0) -> str:
    """Write the tiny SD1.5 checkpoint to ``path`` (atomically) and return it."""
    sd = _ldm_unet_state_dict(tiny_unet(seed))
    clip = tiny_clip_text_model(num_layers=12, seed=seed)
    sd.update({"cond_stage_model.transformer." + k: v for k, v in clip_ldm_state_dict(clip).items()})
    sd.update(_taesd_state_dict(seed))
    sd = {k: v.to(torch.float16).contiguous() for k, v in sd.items()}
    tmp = path + ".tmp"
    save_file(sd, tmp)
    os.replace(tmp, path)
    return path
