"""SDXL in the trainer (issue #17): the conditioning equals the node's on the same weights, the UNet
reads the pooled embedding and the time ids of the training resolution, and the LoRA files map onto
ComfyUI's SDXL model key for key."""
import pytest
import torch

from training.config import ModelConfig
from training.conditioning import split_pooled
from training.encode import SegmentOptions, encode_long_prompts
from training.families import SDXL
from training.models import load_components
from training.tiny import TINY_SDXL_G, TINY_SDXL_L

LONG = (
    "A weathered lighthouse stands on a cliff above a stormy sea. Waves crash against black rocks, spray "
    "rising high! Seagulls circle the lamp; its beam cuts through fog. A small red fishing boat rocks by the pier."
)


@pytest.fixture(scope="module")
def sdxl():
    components = load_components(ModelConfig(tiny=True, family="sdxl"))
    assert components.family is SDXL
    return components


def comfy_sdxl_clip(clip_l, clip_g):
    """ComfyUI's SDXL CLIP object (``SDXLClipModel``) with exactly these transformers weights: CLIP-L
    and bigG built from ComfyUI's own configs with the tiny widths and layer counts."""
    import comfy.sd
    import comfy.sdxl_clip
    import comfy.supported_models_base

    from tiny_models import clip_ldm_state_dict

    def overrides(model, widths):
        return {**{k: v for k, v in widths.items() if k != "hidden_act"},
                "num_hidden_layers": model.config.num_hidden_layers}

    target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    clip = comfy.sd.CLIP(target, model_options={"clip_l_model_config": overrides(clip_l, TINY_SDXL_L),
                                                "clip_g_model_config": overrides(clip_g, TINY_SDXL_G),
                                                "dtype": torch.float32})
    for name, model in (("clip_l", clip_l), ("clip_g", clip_g)):
        missing, unexpected = getattr(clip.cond_stage_model, name).load_sd(clip_ldm_state_dict(model))
        missing = [k for k in missing if "logit_scale" not in k and not (name == "clip_l" and "text_projection" in k)]
        if missing or unexpected:
            raise RuntimeError(f"{name}: weights not loaded into ComfyUI: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return clip


@pytest.fixture(scope="module")
def comfy_clip(comfy, sdxl):
    return comfy_sdxl_clip(sdxl.text_encoder, sdxl.text_encoder_2)


@pytest.mark.parametrize("options", [SegmentOptions(), SegmentOptions(token_length=77),
                                     SegmentOptions(token_length=0, pad="none")])
def test_node_and_trainer_give_the_same_sdxl_conditioning(pack, comfy_clip, sdxl, options):
    """LongAlign Text Encode on ComfyUI's SDXL CLIP == the trainer's conditioner: cond ([L | G] rows)
    and pooled output (bigG's text_embeds of the first segment)."""
    node = pack.NODE_CLASS_MAPPINGS["LongAlignTextEncode"]()
    (ours,) = node.encode(comfy_clip, LONG, options.split, options.token_length, options.pad, options.keep_bos)
    cond, extras = ours[0]
    assert cond.shape[-1] == TINY_SDXL_L["hidden_size"] + TINY_SDXL_G["hidden_size"]
    with torch.no_grad():
        library = encode_long_prompts([LONG], sdxl.text_backend(), options)
    torch.testing.assert_close(cond, library.cond, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(extras["pooled_output"], library.pooled, atol=1e-4, rtol=1e-4)
    if options.token_length:  # the training conditioner: the same rows, and the pooled output as its last row
        with torch.no_grad():
            trained, pooled = split_pooled(sdxl.conditioner(options.token_length)([LONG]),
                                           TINY_SDXL_G["projection_dim"])
        torch.testing.assert_close(trained, cond, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(pooled, extras["pooled_output"], atol=1e-4, rtol=1e-4)


def test_each_caption_of_a_batch_gets_its_own_pooled_output_and_the_empty_prompt_is_encoded(pack, comfy_clip, sdxl):
    node = pack.NODE_CLASS_MAPPINGS["LongAlignTextEncode"]()
    captions = [LONG, "a cat on a mat", ""]
    with torch.no_grad():
        _, pooled = split_pooled(sdxl.conditioner(77)(captions), TINY_SDXL_G["projection_dim"])
    for caption, row in zip(captions, pooled):
        (ours,) = node.encode(comfy_clip, caption, "sentences", 77, "mean", True)
        torch.testing.assert_close(row[None], ours[0][1]["pooled_output"], atol=1e-4, rtol=1e-4)
    assert pooled[2].abs().sum() > 0  # the empty prompt's real embedding, not zeros (CoMat-SDXL)


def test_the_unet_reads_the_pooled_row_and_the_time_ids_of_the_latent_size(sdxl):
    """The hook's call equals diffusers' own call with ``added_cond_kwargs`` (text_embeds, time ids
    (8h, 8w, 0, 0, 8h, 8w)); another pooled embedding changes the output."""
    unet = sdxl.unet
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 12, generator=g), torch.tensor([10, 500])
    with torch.no_grad():
        context = sdxl.conditioner(77)(["a red car", LONG])
        rows, pooled = split_pooled(context, TINY_SDXL_G["projection_dim"])
        ids = torch.tensor([[64.0, 96, 0, 0, 64, 96]] * 2)
        ours = unet(x, t, context).sample
        direct = unet(x, t, rows, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        other = unet(x, t, rows, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids * 2}).sample
    torch.testing.assert_close(ours, direct)
    assert (ours - other).abs().max() > 1e-4
