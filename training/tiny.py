"""Tiny random models with the real classes, for the ``--tiny`` preset (demo, tests, CPU).

The UNet has the layer structure ComfyUI detects as SD1.5 (one level, 320 channels, context 768),
so a LoRA trained on it loads onto the tiny SD1.5 checkpoint the tests build; the text encoder is a
2-layer CLIP-L-width ``CLIPTextModel`` with the real vocabulary; the VAE a 4-level ``AutoencoderKL``
(8x downsampling like SD's) with 16 channels.

SDXL (``--tiny`` with ``model.family sdxl``): a UNet with SDXL's structure (no attention in the first
level, linear projections, ``addition_embed_type = "text_time"``: added embedding = pooled text
embedding + 6 time ids x ``addition_time_embed_dim``), a CLIP-L-shaped and a bigG-shaped text encoder
(penultimate layers exist; bigG with a projection, GELU), all narrow.
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

TINY_UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(320,), down_block_types=("CrossAttnDownBlock2D",),
    up_block_types=("CrossAttnUpBlock2D",), cross_attention_dim=768, attention_head_dim=8,
    norm_num_groups=32,
)
TINY_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
    block_out_channels=(16, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64, scaling_factor=0.18215,
)

TINY_SDXL_L = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, projection_dim=64,
                   hidden_act="quick_gelu")
TINY_SDXL_G = dict(hidden_size=96, intermediate_size=192, num_attention_heads=2, projection_dim=96, hidden_act="gelu")
"""bigG-shaped: the projection is square, as bigG's (1280 -> 1280) and ComfyUI's model of it."""
TINY_SDXL_TIME_DIM = 8
TINY_SDXL_UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=TINY_SDXL_L["hidden_size"] + TINY_SDXL_G["hidden_size"], attention_head_dim=(2, 4),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TINY_SDXL_TIME_DIM,
    projection_class_embeddings_input_dim=TINY_SDXL_G["projection_dim"] + 6 * TINY_SDXL_TIME_DIM, norm_num_groups=32,
)


def _clip_text_config(num_layers: int, **widths) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=49408, num_hidden_layers=num_layers, max_position_embeddings=77,
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, **widths)


def tiny_clip_text_model(num_layers: int = 2, seed: int = 0) -> CLIPTextModel:
    """CLIP-L widths (768, 12 heads), ``num_layers`` layers, the real 49408-token vocabulary."""
    torch.manual_seed(seed)
    config = _clip_text_config(num_layers, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                               hidden_act="quick_gelu", projection_dim=768)
    return CLIPTextModel(config).eval()


def tiny_sdxl_text_encoders(num_layers: int = 3, seed: int = 0) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    """SDXL's two text encoders, narrow (:data:`TINY_SDXL_L`, :data:`TINY_SDXL_G`), ``num_layers`` each (ComfyUI
    needs 3 or more for the penultimate layer)."""
    torch.manual_seed(seed)
    clip_l = CLIPTextModel(_clip_text_config(num_layers, **TINY_SDXL_L)).eval()
    clip_g = CLIPTextModelWithProjection(_clip_text_config(num_layers, **TINY_SDXL_G)).eval()
    return clip_l, clip_g


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_UNET_CONFIG).eval()


def tiny_sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_SDXL_UNET_CONFIG).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**TINY_VAE_CONFIG).eval()


def tiny_clip_model(seed: int = 0):
    """A tiny transformers ``CLIPModel`` (real vocabulary, 32x32 images): a Denscore-shaped scorer."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    return CLIPModel(config).eval()


def tiny_reward_model(seed: int = 0):
    """:func:`tiny_clip_model` as a Denscore-kind preference model (the ``--tiny`` reward stage)."""
    from .reward_models import TransformersPreferenceModel

    model = tiny_clip_model(seed)
    return TransformersPreferenceModel("denscore", "<tiny>", model, model.logit_scale.exp().item(),
                                       image_size=model.config.vision_config.image_size)
