"""Tiny models with the real classes and on-disk formats, built with fixed seeds (no download).

* :func:`tiny_clip_text_model`: a transformers ``CLIPTextModel`` with CLIP-L widths (768) and few
  layers, the real CLIP BPE vocabulary size.
* :func:`build_tiny_sd15_checkpoint`: a single-file SD1.5-format checkpoint (LDM keys, fp16) that
  ComfyUI's stock ``CheckpointLoaderSimple`` detects as SD1.5: a one-level 320-channel diffusers
  ``UNet2DConditionModel`` mapped to LDM names with ComfyUI's own key map, the full ViT-L/14 text
  encoder (ComfyUI needs all its layers), and a TAESD-format VAE.
* :func:`build_trainable_sd15_checkpoint`: a tiny SD1.5 single file both ComfyUI and the trainer
  load (the same UNet and CLIP, a full-size KL-VAE), with its component configs beside it.
* :func:`build_tiny_sdxl_checkpoint`: its SDXL twin (SPEC §9): a UNet with the structure ComfyUI's
  detection requires of SDXL (:data:`DETECTED_SDXL_UNET_CONFIG`, ~134 M parameters), the full-size
  CLIP-L and bigG text encoders (random, ~1.6 GB in fp16), and a TAESD-format VAE.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import open_clip
import torch
from safetensors.torch import save_file
from transformers import CLIPModel, CLIPTextModel, CLIPTextModelWithProjection

from training.safe_io import save_tensors, write_atomically
from training.tiny import TINY_UNET_CONFIG, tiny_clip_model, tiny_clip_text_model, tiny_unet  # noqa: F401  (re-exported)


def clip_ldm_state_dict(model: CLIPTextModel) -> dict[str, torch.Tensor]:
    """The text encoder's weights under the ``text_model.`` names of SD checkpoints and ComfyUI
    (transformers 5 drops that prefix from ``CLIPTextModel.state_dict()``); a
    ``CLIPTextModelWithProjection``'s ``text_projection`` keeps its own name, as in ComfyUI's bigG."""
    return {
        (k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v.contiguous()
        for k, v in model.state_dict().items()
    }


SD15_LDM_UNET = {"num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1],
                 "transformer_depth_output": [1, 1], "transformer_depth_middle": 1}


def _ldm_unet_state_dict(unet, unet_config: dict = SD15_LDM_UNET) -> dict[str, torch.Tensor]:
    import comfy.utils

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


SD15_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "training", "configs", "sd15")


def _ldm_vae_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """A random diffusers ``AutoencoderKL`` of SD1.5's shipped VAE config (the only KL-VAE layout
    ComfyUI's loader builds: 128 channels, [1, 2, 4, 4], 2 res blocks) under ``first_stage_model.*``
    LDM names, converted with ComfyUI's own diffusers-to-LDM map."""
    import comfy.diffusers_convert
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(os.path.join(SD15_CONFIGS, "vae")))
    ldm = comfy.diffusers_convert.convert_vae_state_dict(vae.state_dict())
    return {"first_stage_model." + k: v for k, v in ldm.items()}


def build_trainable_sd15_checkpoint(path: str, seed: int = 0) -> str:
    """Write a tiny SD1.5 single file that both ComfyUI's ``CheckpointLoaderSimple`` (as SD1.5) and the
    trainer load, with its component configs beside it, and return the file's path.

    The file (LDM keys, fp16, ~450 MB): the one-level UNet of :func:`build_tiny_sd15_checkpoint`, the
    full ViT-L/14 text encoder, and a full-size SD1.5 KL-VAE (random weights; ComfyUI builds no other
    KL-VAE size). Beside it, ``<name>.config/`` holds the diffusers configs of what the file contains
    (:data:`training.job_request.CONFIG_SIDECAR`): SD1.5's shipped ones with this UNet's config, the
    convention by which any single file with a non-standard UNet trains from the graph."""
    from training.job_request import sidecar_config_dir

    sd = _ldm_unet_state_dict(tiny_unet(seed))
    clip = tiny_clip_text_model(num_layers=12, seed=seed)
    sd.update({"cond_stage_model.transformer." + k: v for k, v in clip_ldm_state_dict(clip).items()})
    sd.update(_ldm_vae_state_dict(seed))
    sd = {k: v.to(torch.float16).contiguous() for k, v in sd.items()}
    configs = sidecar_config_dir(path)
    tmp_configs = tempfile.mkdtemp(prefix=".configs.", dir=os.path.dirname(os.path.abspath(path)))
    shutil.copytree(SD15_CONFIGS, tmp_configs, dirs_exist_ok=True)
    with open(os.path.join(tmp_configs, "unet", "config.json"), "w", encoding="utf-8") as f:
        json.dump({"_class_name": "UNet2DConditionModel", **TINY_UNET_CONFIG}, f, indent=1)
    shutil.rmtree(configs, ignore_errors=True)
    os.replace(tmp_configs, configs)
    tmp = path + ".tmp"
    save_file(sd, tmp)
    os.replace(tmp, path)
    return path


DETECTED_SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 320, 320),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("UpBlock2D",) * 3,
    mid_block_type="UNetMidBlock2D", transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
    attention_head_dim=(5, 5, 5), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
"""The smallest diffusers UNet ComfyUI detects as SDXL (SPEC §9): model_channels 320, linear proj_in,
context 2048, ADM 2816, input transformer depths [0, 0, 2, 2, 10, 10] (5 heads of 64), channel_mult
[1, 1, 1], no output or middle transformers."""
DETECTED_SDXL_LDM_UNET = {"num_res_blocks": [2, 2, 2], "channel_mult": [1, 1, 1],
                          "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_output": [0] * 9,
                          "transformer_depth_middle": -1}
SDXL_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                   projection_dim=768, hidden_act="quick_gelu")
SDXL_CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                   projection_dim=1280, hidden_act="gelu")
"""The full-size text encoders ComfyUI's SDXL loader always builds (fewer layers give NaN conditioning)."""


def detected_sdxl_unet(seed: int = 0):
    """A diffusers ``UNet2DConditionModel`` of :data:`DETECTED_SDXL_UNET_CONFIG` (fp32, diffusers' init)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**DETECTED_SDXL_UNET_CONFIG).eval()


def _random_fp16_clip(cls, widths: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The parameters of ``cls(config)`` drawn straight in fp16 (the model is built on the meta device,
    so no fp32 copy exists): weights N(0, 0.02) as transformers initialises CLIP, LayerNorms 1 and 0."""
    from transformers import CLIPTextConfig

    config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                            eos_token_id=49407, pad_token_id=49407, **widths)
    with torch.device("meta"):
        model = cls(config)
    out = {}
    for name, p in model.named_parameters():
        if p.ndim == 1 and ("norm" in name or name.endswith("bias")):
            t = torch.ones(p.shape, dtype=torch.float16) if "norm" in name and name.endswith("weight") \
                else torch.zeros(p.shape, dtype=torch.float16)
        else:
            t = torch.empty(p.shape, dtype=torch.float16).normal_(0.0, 0.02, generator=generator)
        out[name if name.startswith(("text_model.", "text_projection.")) else "text_model." + name] = t
    return out


def build_tiny_sdxl_checkpoint(path: str, seed: int = 0) -> str:
    """Write an SDXL-format single file that ComfyUI's ``CheckpointLoaderSimple`` detects as SDXL to
    ``path`` (atomically; fp16, ~1.9 GB) and return it: the UNet of :func:`detected_sdxl_unet` under
    ``model.diffusion_model.*``, random full-size CLIP-L and bigG written with ComfyUI's own SDXL
    converter (``conditioner.embedders.{0,1}.*``), a TAESD-format VAE."""
    import comfy.supported_models

    sd = {k: v.half() for k, v in _ldm_unet_state_dict(detected_sdxl_unet(seed), DETECTED_SDXL_LDM_UNET).items()}
    generator = torch.Generator().manual_seed(seed)
    clip = {}
    for key, cls, widths in (("clip_l", CLIPTextModel, SDXL_CLIP_L), ("clip_g", CLIPTextModelWithProjection, SDXL_CLIP_G)):
        clip.update({f"{key}.transformer.{k}": v for k, v in _random_fp16_clip(cls, widths, generator).items()})
    sd.update(comfy.supported_models.SDXL(dict(DETECTED_SDXL_LDM_UNET)).process_clip_state_dict_for_saving(clip))
    del clip
    sd.update({k: v.half() for k, v in _taesd_state_dict(seed).items()})
    tmp = path + ".tmp"
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp)
    os.replace(tmp, path)
    return path


REFERENCE_LORA_CLASSES = {"ResnetBlock2D", "Attention", "CrossAttention", "GEGLU"}


def reference_lora_targets(unet) -> list[tuple[str, torch.nn.Module]]:
    """The reference's own walk (LongAlign ``modules/lora.py``), written independently of
    ``training.lora_format``: ancestors of a target class in ``unet.modules()`` order, then every
    Linear/Conv2d in each ancestor's ``named_modules()`` order."""
    names = {id(m): n for n, m in unet.named_modules()}
    return [
        (f"{names[id(ancestor)]}.{child_name}", child)
        for ancestor in unet.modules() if ancestor.__class__.__name__ in REFERENCE_LORA_CLASSES
        for child_name, child in ancestor.named_modules()
        if child.__class__ in (torch.nn.Linear, torch.nn.Conv2d)
    ]


def reference_lora_list(unet, rank: int = 4, seed: int = 0, up_std: float = 0.05) -> list[torch.Tensor]:
    """A random LoRA as the reference saves it: fp16 ``[up_0, down_0, ...]`` in its layer order
    (down ``normal(1/r)`` as the reference initialises it; up non-zero so the LoRA changes the model)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _, layer in reference_lora_targets(unet):
        if isinstance(layer, torch.nn.Conv2d):
            up_shape, down_shape = (layer.out_channels, rank, 1, 1), (rank, layer.in_channels, *layer.kernel_size)
        else:
            up_shape, down_shape = (layer.out_features, rank), (rank, layer.in_features)
        out.append((torch.randn(up_shape, generator=g) * up_std).half())
        out.append((torch.randn(down_shape, generator=g) / rank).half())
    return out


def tiny_t5_encoder(d_model: int = 64, seed: int = 0):
    """A 2-layer transformers ``T5EncoderModel`` with the real T5 vocabulary size (32128)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=32128, d_model=d_model, d_ff=2 * d_model, d_kv=16, num_layers=2,
                      num_heads=d_model // 16, feed_forward_proj="relu", is_encoder_decoder=False)
    return T5EncoderModel(config).eval()


def tiny_text_adapter(in_dim: int = 64, int_dim: int = 48, out_dim: int = 768, seed: int = 0):
    """A small ``training.adapter.TextAdapter`` with perturbed LayerNorms (so they matter), eval mode."""
    from training.adapter import TextAdapter

    torch.manual_seed(seed)
    adapter = TextAdapter(in_dim=in_dim, int_dim=int_dim, out_dim=out_dim).eval()
    with torch.no_grad():
        for p in adapter.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return adapter


TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
PROMPTS = [
    "A red fox sits in the snow. The sky is grey; a pine forest stands behind it.",
    "A bowl of ramen on a wooden table! Steam rises from the broth.",
    "An astronaut floats inside a space station",
]


def build_tiny_clipmodel(folder: str, seed: int = 0) -> CLIPModel:
    """A tiny transformers CLIPModel (real vocabulary, 32x32 images) saved with save_pretrained."""
    model = tiny_clip_model(seed)
    model.save_pretrained(folder)
    return model


def build_tiny_open_clip(folder: str, seed: int = 0) -> tuple[open_clip.CLIP, dict[str, str]]:
    """A tiny open_clip model saved three ways: hub folder (open_clip_config.json + safetensors), an
    HPSv2-style ``{"state_dict": {"module.*": ...}}`` .pt file, and a bare .safetensors + JSON config."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_OPEN_CLIP).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hub = os.path.join(folder, "tiny_open_clip")
    os.makedirs(hub, exist_ok=True)
    write_atomically(os.path.join(hub, "open_clip_config.json"),
                     lambda tmp: json.dump({"model_cfg": TINY_OPEN_CLIP}, open(tmp, "w")))
    save_tensors(state, os.path.join(hub, "open_clip_model.safetensors"))
    pt = os.path.join(folder, "tiny_hps.pt")
    write_atomically(pt, lambda tmp: torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, tmp))
    single = save_tensors(state, os.path.join(folder, "tiny_clip.safetensors"))
    config = os.path.join(folder, "tiny_clip.json")
    write_atomically(config, lambda tmp: json.dump(TINY_OPEN_CLIP, open(tmp, "w")))
    return model, {"hub": hub, "pt": pt, "safetensors": single, "config": config}


SD15_KEYS = ["model.diffusion_model.input_blocks.1.1.proj_in.", "cond_stage_model.transformer.text_model.embeddings.",
             "first_stage_model.decoder.conv_in."]
SDXL_KEYS = ["model.diffusion_model.label_emb.0.0.", "conditioner.embedders.0.transformer.text_model.embeddings.",
             "conditioner.embedders.1.model.transformer.resblocks.0.attn.", "first_stage_model.decoder.conv_in."]
"""LDM key prefixes by which a single file is told SD1.x or SDXL (for family-detection tests)."""


def ldm_key_checkpoint(path, prefixes: list[str], ckpt: bool = False) -> str:
    """A single file with one tiny tensor under each LDM key prefix (``ckpt``: a weights-only pickle)."""
    tensors = {p + "weight": torch.zeros(2) for p in prefixes}
    if ckpt:
        torch.save({"state_dict": tensors}, path)
    else:
        save_file(tensors, path)
    return str(path)
