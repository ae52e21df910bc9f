"""SDXL in the trainer (issue #17): the conditioning equals the node's on the same weights, the UNet
reads the pooled embedding and the time ids of the training resolution, every stage trains on the
tiny SDXL, the LoRA files map onto ComfyUI's SDXL model key for key, the example configs resolve, and
an SDXL single-file checkpoint loads."""
import pytest
import torch
from safetensors.torch import save_file

from training.config import ModelConfig
from training.conditioning import split_pooled
from training.encode import SegmentOptions, encode_long_prompts
from training.families import SDXL
from training.models import load_components
from training.tiny import TINY_SDXL_G, TINY_SDXL_L, TINY_SDXL_UNET_CONFIG

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


# -- the stages on SDXL (tiny, CPU, fp32): the same objectives, the family's context -------------------

CAPTIONS = ["A red cat sleeps on a sofa. The room is warm.", "A blue car on a road.", "Two dogs in the snow.",
            "A lighthouse on a cliff. Waves crash below it."]


def _sdxl_setup(rank: int = 4, targets: str = "reference", up_std: float = 0.0):
    """Tiny SDXL components, frozen, with a UNet LoRA (``up_std`` > 0: non-zero up weights, so every
    LoRA tensor gets a gradient)."""
    from training.lora import add_lora

    c = load_components(ModelConfig(tiny=True, family="sdxl"))
    for m in c.frozen_modules():
        m.requires_grad_(False)
    params = add_lora(c.unet, rank, float(rank), targets=targets)
    if up_std:
        _perturb_lora(c.unet, up_std)
    return c, params, c.conditioner(77)


@torch.no_grad()
def _perturb_lora(unet, up_std: float) -> None:
    g = torch.Generator().manual_seed(7)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=g) * up_std)


def _train(objective, params, batch: dict, steps: int, lr: float, key: str | None = None) -> list[float]:
    """``steps`` Adam steps on one fixed batch (same generator seed each step); the loss (or ``logs[key]``)
    of each step."""
    optimizer = torch.optim.Adam(params, lr=lr)
    values = []
    for _ in range(steps):
        loss, logs = objective.loss(batch, torch.Generator().manual_seed(3))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        values.append(float(logs[key] if key else loss.detach()))
    return values


class RecordingConditioner:
    """The conditioner, recording the captions it encodes."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def __call__(self, captions):
        self.seen.append(list(captions))
        return self.inner(captions)


def test_align_on_sdxl_lowers_the_diffusion_loss_with_caption_dropout():
    from training.objectives.align import AlignObjective

    torch.manual_seed(0)
    c, params, conditioner = _sdxl_setup()
    recorder = RecordingConditioner(conditioner)
    objective = AlignObjective(c.unet, c.vae, c.scheduler, recorder, 0.1, torch.float32)
    pixels = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    losses = _train(objective, params, {"pixel_values": pixels, "caption": CAPTIONS, "index": list(range(4))}, 8, 3e-3)
    print("align losses", [round(x, 4) for x in losses])
    assert losses[-1] < 0.8 * losses[0]
    # caption dropout (p = 0.1; this generator drops two of the four): the empty prompt, encoded for real
    assert recorder.seen[0] == ["", CAPTIONS[1], CAPTIONS[2], ""]


def test_lcm_distillation_on_sdxl_lowers_its_loss():
    """Optional in #17: the LCM student on SDXL (teacher = the UNet with the LoRA off, same context)."""
    from training.objectives.lcm import LCMDistillObjective

    torch.manual_seed(0)
    c, params, conditioner = _sdxl_setup()
    objective = LCMDistillObjective(c.unet, c.vae, c.scheduler, conditioner, 50, 3.0, 15.0, 0.001, 0.5, 10.0,
                                    torch.float32)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    losses = _train(objective, params, {"pixel_values": pixels, "caption": CAPTIONS[:2]}, 5, 3e-3)
    print("lcm losses", [round(x, 5) for x in losses])
    assert losses[-1] < losses[0]


def _reward_loss_and_grads(fast: bool, decode_chunk: int):
    from training.denoisers import CheckpointedUNet, MergedShadowUNet
    from training.objectives.reward import RewardObjective
    from training.tiny import tiny_reward_model

    torch.manual_seed(0)
    c, params, conditioner = _sdxl_setup(up_std=0.01)
    denoiser = MergedShadowUNet(c.unet) if fast else CheckpointedUNet(c.unet, "unet")
    objective = RewardObjective(denoiser, c.vae, c.scheduler, conditioner, tiny_reward_model(), (4, 8, 8), steps=6,
                                guidance=7.5, grad_steps=2, w=0.3, gather=None, weight_dtype=torch.float32,
                                decode_chunk=decode_chunk, reference_encodes_images=not fast)
    loss, logs = objective.loss({"caption": CAPTIONS}, torch.Generator().manual_seed(1234))
    loss.backward()
    return loss.detach(), logs, torch.cat([p.grad.flatten() for p in params])


def test_reward_on_sdxl_fast_mode_equals_reference_mode():
    ref_loss, ref_logs, ref = _reward_loss_and_grads(fast=False, decode_chunk=0)
    loss, logs, ours = _reward_loss_and_grads(fast=True, decode_chunk=1)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
    for k in ref_logs:
        torch.testing.assert_close(logs[k], ref_logs[k], atol=1e-6, rtol=1e-5)
    assert ref.norm() > 0
    assert float((ours - ref).norm() / ref.norm()) < 1e-4


def test_reward_on_sdxl_rises_on_a_fixed_batch():
    from training.denoisers import MergedShadowUNet
    from training.objectives.reward import RewardObjective
    from training.tiny import tiny_reward_model

    torch.manual_seed(0)
    c, params, conditioner = _sdxl_setup()
    objective = RewardObjective(MergedShadowUNet(c.unet), c.vae, c.scheduler, conditioner, tiny_reward_model(),
                                (4, 8, 8), steps=4, guidance=7.5, grad_steps=2, w=0.3, gather=None,
                                weight_dtype=torch.float32, decode_chunk=1)
    rewards = _train(objective, params, {"caption": CAPTIONS[:2]}, 5, 1e-2, key="reward")
    print("rewards", [round(x, 5) for x in rewards])
    assert rewards[-1] > rewards[0]


def test_comat_on_sdxl_captures_mid_and_up_maps_trains_the_concentration_and_runs_its_discriminator():
    """CoMat-SDXL's structure on the tiny model: attention LoRA, maps from the mid block and the up
    blocks (SDXL: mid_16, up_16, up_32 at 512 px), the discriminator = the model's own UNet on the
    encoded empty prompt (pooled) and the time ids; the token loss falls on a fixed batch."""
    from training.attention_maps import AttentionStore, install_capture
    from training.denoisers import CheckpointedUNet
    from training.discriminator import DiscriminatorTrainer, LatentDiscriminator
    from training.objectives.comat import CoMatObjective, RealLatents
    from training.sampling import DDIM

    torch.manual_seed(0)
    c, params, conditioner = _sdxl_setup(targets="attention")
    ddim = DDIM(c.scheduler.alphas_cumprod)
    with torch.no_grad():
        empty = conditioner([""])
    d = DiscriminatorTrainer(LatentDiscriminator(c.unet, empty, ddim.timesteps(4)[-1]), lr=1e-3)
    _perturb_lora(c.unet, 0.05)  # non-uniform attention maps, so the concentration has something to do
    store = AttentionStore()
    names = install_capture(c.unet, store)
    assert names and all(n.startswith(("mid_block", "up_blocks.0")) for n in names)  # no attention at the top level
    objective = CoMatObjective(CheckpointedUNet(c.unet), c.vae, c.scheduler, conditioner, (4, 8, 8), 4, 7.5, 2,
                               torch.float32, captioner=None, w_concept=0.0, store=store, w_token=1.0, w_pixel=0.0,
                               attn_steps=1, threshold=0.95, max_group_words=3, discriminator=d,
                               real=RealLatents(c.unet, ddim, (4, 8, 8), 4, 7.5), w_adv=0.5, solver=ddim)
    batch = {"caption": ["A red circle on a blue table.", "A green square near a yellow lamp."]}
    loss, logs = objective.loss(batch, torch.Generator().manual_seed(3))
    assert {n for _, n, _ in store.maps} and all(torch.isfinite(v) for v in logs.values())
    loss.backward()
    assert all(p.grad is not None for p in params)
    objective.d, objective.w_adv = None, 0.0  # the token loss alone must fall
    tokens = _train(objective, params, batch, 5, 3e-2, key="token")
    print("token losses", [round(x, 5) for x in tokens])
    assert tokens[-1] < 0.5 * tokens[0]


def test_textcraftor_on_sdxl_trains_lora_on_both_text_encoders_and_saves_te1_te2(tmp_path):
    from safetensors import safe_open

    from training.config import TextCraftorConfig
    from training.denoisers import CheckpointedUNet
    from training.lora import add_text_encoder_lora
    from training.objectives.textcraftor import TextCraftorObjective, TrainableTextEncoder, load_reward_terms

    torch.manual_seed(0)
    c, _, conditioner = _sdxl_setup()
    c.unet.requires_grad_(False)
    params = [p for te in c.text_encoders for p in add_text_encoder_lora(te, 4, 4.0)]
    encoder = TrainableTextEncoder(conditioner, "lora", 4.0, SDXL.lora_metadata(), SDXL.lora_te_prefixes)
    terms = load_reward_terms(TextCraftorConfig(), True, torch.device("cpu"), torch.float32)
    objective = TextCraftorObjective(CheckpointedUNet(c.unet), c.vae, c.scheduler, encoder, terms, (4, 4, 4), 3, 7.5,
                                     1, torch.float32)
    rewards = _train(objective, params, {"caption": CAPTIONS[:2]}, 4, 1e-2, key="reward")
    print("rewards", [round(x, 4) for x in rewards])
    assert rewards[-1] > rewards[0]
    for te in c.text_encoders:  # both encoders train (CLIP-L's last layer feeds nothing: SDXL reads its penultimate)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in te.named_parameters() if "lora_A" in n)
    path = encoder.save_pretrained(str(tmp_path))
    with safe_open(path, "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert {k.split("text_model")[0] for k in keys} == {"lora_te1_", "lora_te2_"}
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


# -- LoRA files stock ComfyUI applies to SDXL (in-process, ComfyUI's own key maps) -------------------

def comfy_tiny_sdxl_unet_config() -> dict:
    """The tiny SDXL UNet's structure in ComfyUI's (LDM) terms (the full-size one differs only in sizes)."""
    from training.tiny import TINY_SDXL_UNET_CONFIG as D

    return {
        "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
        "use_spatial_transformer": True, "legacy": False, "num_classes": "sequential",
        "adm_in_channels": D["projection_class_embeddings_input_dim"], "context_dim": D["cross_attention_dim"],
        "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [0, 1],
        "transformer_depth_middle": 1, "transformer_depth_output": [0, 0, 1, 1], "use_linear_in_transformer": True,
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }


def comfy_tiny_sdxl_model():
    """ComfyUI's SDXL model class (``supported_models.SDXL``, ``model_base.SDXL``) with the tiny SDXL
    UNet's structure."""
    import comfy.supported_models

    model_config = comfy.supported_models.SDXL(comfy_tiny_sdxl_unet_config())
    model_config.unet_config["num_head_channels"] = 16
    return model_config.get_model({})


def _loaded_by_comfy(lora: dict, key_map: dict, caplog) -> dict:
    """``comfy.lora.load_lora``'s patches; fails on any "lora key not loaded"."""
    import logging

    import comfy.lora

    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(lora, key_map)
    assert "lora key not loaded" not in caplog.text, caplog.text
    return patches


@pytest.mark.parametrize("targets", ["reference", "attention"])
def test_unet_lora_keys_all_map_onto_comfyui_sdxl(comfy, targets, caplog):
    import comfy.lora

    from training.lora import add_lora, kohya_state_dict
    from training.tiny import tiny_sdxl_unet

    model = comfy_tiny_sdxl_model()
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    unet = tiny_sdxl_unet()
    add_lora(unet, 4, 4.0, targets=targets)
    lora = kohya_state_dict(unet, 4.0)
    stems = {k.rsplit(".", 2)[0] if ".lora_" in k else k.rsplit(".", 1)[0] for k in lora}
    assert stems and all(s.startswith("lora_unet_") for s in stems)
    patches = _loaded_by_comfy(lora, key_map, caplog)
    assert len(patches) == len(stems)
    weights = model.state_dict()
    for stem in stems:  # each onto a weight of the layer's shape
        assert weights[key_map[stem]].shape[0] == lora[f"{stem}.lora_up.weight"].shape[0], stem


def test_text_encoder_lora_keys_te1_te2_all_map_onto_comfyui_sdxl_clip(comfy, caplog):
    import comfy.lora

    from training.lora import add_text_encoder_lora, text_encoder_kohya_state_dict
    from training.tiny import tiny_sdxl_text_encoders

    clip_l, clip_g = tiny_sdxl_text_encoders()
    clip = comfy_sdxl_clip(clip_l, clip_g)
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    lora = {}
    for encoder, prefix in zip((clip_l, clip_g), SDXL.lora_te_prefixes):
        add_text_encoder_lora(encoder, 4, 4.0)
        lora.update(text_encoder_kohya_state_dict(encoder, 4.0, prefix=prefix))
    patches = _loaded_by_comfy(lora, key_map, caplog)
    assert len(patches) == len(lora) // 3
    assert {key_map[k.rsplit(".", 2)[0]].split(".")[0] for k in lora if k.endswith("lora_up.weight")} == {"clip_l", "clip_g"}


# -- example configs and CoMat-SDXL defaults ---------------------------------------------------------

def _resolve(stage: str, *argv: str):
    from training.config import build_parser, resolve

    return resolve(stage, build_parser(stage, "").parse_args(list(argv)))


@pytest.mark.parametrize("name, stage", [("sdxl_align", "align"), ("sdxl_reward", "reward"), ("sdxl_comat", "reward")])
def test_sdxl_example_configs_resolve(name, stage):
    import os

    from comfy_inprocess import REPO

    cfg = _resolve(stage, "--config", os.path.join(REPO, "training", "configs", "examples", f"{name}.yaml"))
    assert cfg.stage == stage and cfg.model.family == "sdxl" and not cfg.model.t5
    if name == "sdxl_comat":
        assert (cfg.data.resolution, cfg.lora.rank, cfg.lora.targets, cfg.optim.lr, cfg.data.batch_size,
                cfg.comat.w_adv, cfg.comat.disc_lr) == (512, 128, "attention", 2e-5, 6, 0.5, 5e-5)
    elif name == "sdxl_reward":
        assert (cfg.data.resolution, cfg.sampling.steps, cfg.sampling.grad_steps, cfg.sampling.w) == (512, 50, 5, 0.3)
    else:
        assert (cfg.data.caption_dropout, cfg.lora.rank, cfg.optim.lr) == (0.1, 32, 3e-5)


def test_comat_defaults_follow_the_model_family():
    sdxl = _resolve("reward", "--objective", "comat", "--model.family", "sdxl")
    assert (sdxl.data.resolution, sdxl.optim.lr, sdxl.data.batch_size, sdxl.comat.w_adv, sdxl.comat.disc_lr,
            sdxl.lora.rank, sdxl.lora.targets, sdxl.optim.max_grad_norm) == (512, 2e-5, 6, 0.5, 5e-5, 128, "attention", 0.1)
    sd15 = _resolve("reward", "--objective", "comat")
    assert (sd15.optim.lr, sd15.data.batch_size, sd15.comat.w_adv) == (5e-5, 4, 1.0)
    assert _resolve("reward", "--objective", "comat", "--model.family", "sdxl", "--optim.lr", "1e-5").optim.lr == 1e-5


# -- an SDXL single-file checkpoint (LDM keys, as ComfyUI users have it) ------------------------------

def build_tiny_sdxl_checkpoint(folder):
    """The tiny SDXL components written as one SDXL-format file with ComfyUI's own converters (UNet
    ``model.diffusion_model.*``, CLIP-L ``conditioner.embedders.0.transformer.*``, bigG in open_clip
    names ``conditioner.embedders.1.model.*``, VAE ``first_stage_model.*``), and a config folder laid
    out as ``training/configs/sdxl`` with the tiny sizes. Returns ``(file, config folder, components)``."""
    import json
    import os
    import shutil

    import comfy.diffusers_convert
    import comfy.supported_models
    import comfy.utils

    from tiny_models import clip_ldm_state_dict

    c = load_components(ModelConfig(tiny=True, family="sdxl"))
    unet_config = comfy_tiny_sdxl_unet_config()
    sd = {}
    unet_sd = c.unet.state_dict()
    for name, ldm in comfy.utils.unet_to_diffusers(unet_config).items():
        if name in unet_sd:
            sd["model.diffusion_model." + ldm] = unet_sd.pop(name)
    assert not unet_sd, sorted(unet_sd)[:5]
    clip = {f"{key}.transformer.{k}": v for key, model in (("clip_l", c.text_encoder), ("clip_g", c.text_encoder_2))
            for k, v in clip_ldm_state_dict(model).items()}
    sd.update(comfy.supported_models.SDXL(unet_config).process_clip_state_dict_for_saving(clip))
    sd.update({"first_stage_model." + k: v for k, v in
               comfy.diffusers_convert.convert_vae_state_dict(c.vae.state_dict()).items()})
    path = os.path.join(folder, "tiny_sdxl.safetensors")
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    configs = os.path.join(folder, "configs")
    shutil.copytree(SDXL.configs, configs)
    c.unet.save_config(os.path.join(configs, "unet"))
    c.vae.save_config(os.path.join(configs, "vae"))
    for sub, model in (("text_encoder", c.text_encoder), ("text_encoder_2", c.text_encoder_2)):
        with open(os.path.join(configs, sub, "config.json"), "w") as f:
            json.dump(model.config.to_dict(), f)
    return path, configs, c


def test_sdxl_single_file_loads_every_component_with_the_shipped_layout(comfy, tmp_path):
    path, configs, original = build_tiny_sdxl_checkpoint(str(tmp_path))
    loaded = load_components(ModelConfig(pretrained=path, config=configs))
    assert loaded.family is SDXL
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(loaded, name).state_dict(), getattr(original, name).state_dict()
        shared = [k for k in theirs if "position_ids" not in k]
        assert shared and all(torch.equal(ours[k], theirs[k]) for k in shared), name
    with torch.no_grad():  # the hook is installed: the loaded UNet reads the SDXL context
        context = loaded.conditioner(77)(["a red car"])
        loaded.unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), context)


def test_export_merged_writes_the_sdxl_unet_with_the_lora_merged(tmp_path):
    from diffusers import UNet2DConditionModel

    from training.export_merged import export_merged
    from training.lora import add_lora, kohya_state_dict
    from training.safe_io import save_tensors
    from training.tiny import tiny_sdxl_unet

    trained = tiny_sdxl_unet()
    add_lora(trained, 4, 4.0)
    _perturb_lora(trained, 0.05)
    lora = save_tensors(kohya_state_dict(trained, 4.0, torch.float32), str(tmp_path / "sdxl_lora.safetensors"),
                        metadata=SDXL.lora_metadata())
    out = export_merged(ModelConfig(tiny=True, family="sdxl"), [(lora, 1.0)], str(tmp_path / "merged"), "fp32")
    merged = UNet2DConditionModel.from_pretrained(out).eval()
    assert merged.config.addition_embed_type == "text_time"
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([10])
    added = {"text_embeds": torch.randn(1, TINY_SDXL_G["projection_dim"]), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    context = torch.randn(1, 5, TINY_SDXL_UNET_CONFIG["cross_attention_dim"])
    with torch.no_grad():  # the merged UNet computes what the UNet with the LoRA computes
        torch.testing.assert_close(merged(x, t, context, added_cond_kwargs=added).sample,
                                   trained(x, t, context, added_cond_kwargs=added).sample, atol=1e-4, rtol=1e-4)


def test_align_stage_on_tiny_sdxl_writes_a_lora_comfyui_maps_key_for_key(comfy, tmp_path, caplog):
    """``python -m training.align --tiny --model.family sdxl``: the trainer's LoRA file records the family
    (modelspec.architecture, ss_base_model_version) and every key maps onto ComfyUI's SDXL model."""
    import comfy.lora
    from safetensors import safe_open

    from trainer_helpers import make_image_folder, run_stage
    from training.safe_io import load_tensors

    out = str(tmp_path / "run")
    run_stage("align", "--model.family", "sdxl", "--data.path", make_image_folder(str(tmp_path / "images"), n=2),
              "--data.batch_size", "2", "--run.max_steps", "2", "--run.save_every", "0", "--run.output_dir", out)
    path = f"{out}/lora_weights.safetensors"
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert (meta["modelspec.architecture"], meta["ss_base_model_version"]) == ("stable-diffusion-xl-v1-base/lora",
                                                                                "sdxl_base_v1-0")
    lora = load_tensors(path)
    patches = _loaded_by_comfy(lora, comfy.lora.model_lora_keys_unet(comfy_tiny_sdxl_model(), {}), caplog)
    assert len(patches) == len(lora) // 3 > 0
