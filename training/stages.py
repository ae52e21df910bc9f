"""What each stage trains: the builders the trainer loop runs (the command lines are in :mod:`.cli`)."""
from __future__ import annotations

import torch

from . import config as config_mod
from .config import TrainConfig
from .data import read_records
from .feature_cache import FeatureCache
from .denoisers import CheckpointedUNet, MergedShadowUNet
from .objectives.align import AlignObjective
from .objectives.reward import RewardObjective
from .safe_io import ModelFileError
from .sampling import DDIM, LCM
from .trainer import Run, base_model_hash
from .validation import validation_images

def build_align(cfg: TrainConfig, components, accelerator, dtype, conditioner) -> Run:
    if cfg.run.gradient_checkpointing:
        accelerator.unwrap_model(components.unet).enable_gradient_checkpointing()
    t5 = conditioner.t5  # with a T5 branch, align trains its TextAdapter beside the UNet LoRA (reference)

    def adopt(modules):
        if t5 is not None:
            t5.adapter = modules[0]

    fast = cfg.run.mode == "fast"
    cache = FeatureCache(int(cfg.run.cache_gb * 2**30)) if fast and cfg.run.cache_gb > 0 else None
    unet = torch.compile(components.unet, dynamic=False) if fast and _compiled(cfg, accelerator) else components.unet
    return Run(AlignObjective(unet, components.vae, components.scheduler, conditioner,
                              cfg.data.caption_dropout, dtype, cache),
               extra_modules=[t5.adapter] if t5 else [], adopt=adopt,
               **_validation(cfg, components, accelerator, dtype, conditioner))


def _validation(cfg: TrainConfig, components, accelerator, dtype, conditioner) -> dict:
    """The :class:`Run`'s ``validate`` and ``validation_prompts`` (none when ``run.validate_every`` is 0):
    ``run.validation_prompts`` or the first four captions, from noise seeded by ``run.seed`` every time.
    The reward stages sample as they train (``sampling``: solver, steps, guidance); align with DDIM 25, CFG 7.5."""
    if not cfg.run.validate_every:
        return {}
    prompts = cfg.run.validation_prompts or [
        r.caption for r in read_records(cfg.data.path, need_images=cfg.stage != "reward")[:4]]
    own = {}
    if cfg.stage == "reward":
        own = dict(solver=_solver(cfg, components.scheduler), steps=cfg.sampling.steps, guidance=cfg.sampling.guidance)

    def validate():
        return validation_images(accelerator.unwrap_model(components.unet), components.vae, components.scheduler,
                                 conditioner, prompts, cfg.data.resolution, dtype, cfg.run.seed, **own)

    return {"validate": validate, "validation_prompts": prompts}


def _latent_shape(cfg: TrainConfig, components, accelerator) -> tuple[int, int, int]:
    resolution = cfg.data.resolution
    factor = 2 ** (len(components.vae.config.block_out_channels) - 1)
    return (accelerator.unwrap_model(components.unet).config.in_channels, resolution // factor, resolution // factor)


def _compiled(cfg: TrainConfig, accelerator) -> bool:
    """Whether the fast mode ``torch.compile``s its UNet calls (``run.compile``; auto: with CUDA)."""
    return cfg.run.compile == "on" or (cfg.run.compile == "auto" and accelerator.device.type == "cuda")


def _denoiser(cfg: TrainConfig, components, accelerator):
    if cfg.run.mode == "fast":
        return MergedShadowUNet(components.unet, compile=_compiled(cfg, accelerator),
                                checkpoint_calls=cfg.sampling.checkpoint_calls)
    return CheckpointedUNet(components.unet, "unet")


def _solver(cfg: TrainConfig, scheduler) -> DDIM:
    """The loop's solver: DDIM, or LCM (``--sampler lcm``) with the distillation's boundary settings."""
    args = (scheduler.alphas_cumprod, scheduler.config.num_train_timesteps)
    if cfg.sampling.sampler == "lcm":
        return LCM(*args, origin_steps=cfg.lcm.num_ddim_timesteps, sigma_data=cfg.lcm.sigma_data,
                   timestep_scaling=cfg.lcm.timestep_scaling)
    return DDIM(*args)


def build_reward(cfg: TrainConfig, components, accelerator, dtype, conditioner) -> Run:
    if cfg.sampling.objective == "textcraftor":
        return build_textcraftor(cfg, components, accelerator, dtype, conditioner)
    if cfg.sampling.objective == "comat":
        return build_comat(cfg, components, accelerator, dtype, conditioner)
    from .reward_models import load_reward_model
    from .tiny import tiny_reward_model

    if cfg.model.tiny and not cfg.model.reward_model:
        scorer = tiny_reward_model()
        scorer.model.to(accelerator.device)
    elif not cfg.model.reward_model:
        raise ModelFileError("model.reward_model is not set: the reward stage needs a preference model (Denscore, ...)")
    else:
        scorer = load_reward_model(cfg.model.reward_model, cfg.model.reward_kind, accelerator.device, dtype,
                                   cfg.model.reward_arch)
    gather = accelerator.gather if accelerator.num_processes > 1 else None
    fast = cfg.run.mode == "fast"
    return Run(RewardObjective(_denoiser(cfg, components, accelerator), components.vae, components.scheduler,
                               conditioner, scorer, _latent_shape(cfg, components, accelerator),
                               cfg.sampling.steps, cfg.sampling.guidance, cfg.sampling.grad_steps, cfg.sampling.w,
                               gather, dtype, decode_chunk=cfg.sampling.decode_chunk if fast else 0,
                               reference_encodes_images=not fast, solver=_solver(cfg, components.scheduler)),
               **_validation(cfg, components, accelerator, dtype, conditioner))


def build_textcraftor(cfg: TrainConfig, components, accelerator, dtype, conditioner) -> Run:
    """TextCraftor (SPEC §5): the UNet (and its LoRA) frozen, the text encoder trained."""
    from .lora import add_text_encoder_lora
    from .objectives.textcraftor import TextCraftorObjective, TrainableTextEncoder, load_reward_terms

    tc = cfg.textcraftor
    accelerator.unwrap_model(components.unet).requires_grad_(False)
    for text_encoder in components.text_encoders:  # SDXL: CLIP-L and bigG
        if tc.train == "full":
            text_encoder.float().requires_grad_(True)
        else:
            add_text_encoder_lora(text_encoder, tc.rank, tc.alpha)
    encoder = TrainableTextEncoder(conditioner, tc.train, tc.alpha, {
        **components.family.lora_metadata(), "longalign.base_model_hash": base_model_hash(cfg), "longalign.rank": str(tc.rank),
        "longalign.alpha": str(tc.alpha), "longalign.config": config_mod.describe(cfg)}, components.family.lora_te_prefixes)
    terms = load_reward_terms(tc, cfg.model.tiny, accelerator.device, dtype)
    objective = TextCraftorObjective(_denoiser(cfg, components, accelerator), components.vae, components.scheduler,
                                     encoder, terms, _latent_shape(cfg, components, accelerator), cfg.sampling.steps,
                                     cfg.sampling.guidance, cfg.sampling.grad_steps, dtype,
                                     solver=_solver(cfg, components.scheduler))
    return Run(objective, extra_modules=[encoder], adopt=objective.adopt,
               **_validation(cfg, components, accelerator, dtype, conditioner))


def build_comat(cfg: TrainConfig, components, accelerator, dtype, conditioner) -> Run:
    """CoMat (SPEC §6): the UNet LoRA trained on concept matching, attribute concentration and a latent
    discriminator. The discriminator is copied from the UNet while its LoRA is still untrained, before
    the attention capture is installed."""
    from .attention_maps import AttentionStore, install_capture
    from .captioner import load_captioner
    from .discriminator import DiscriminatorTrainer, LatentDiscriminator
    from .objectives.comat import CoMatObjective, RealLatents

    cc, sc = cfg.comat, cfg.sampling
    captioner = None
    if cc.w_concept > 0:
        if not cc.captioner:
            raise ModelFileError("comat.captioner is not set: concept matching needs a local BLIP captioner folder "
                                 "(--captioner PATH), or set comat.w_concept 0")
        captioner = load_captioner(cc.captioner, accelerator.device, dtype)
    latent_shape = _latent_shape(cfg, components, accelerator)
    solver = _solver(cfg, components.scheduler)
    denoiser = _denoiser(cfg, components, accelerator)
    discriminator = real = None
    if cc.w_adv > 0:
        with torch.no_grad():
            empty = conditioner([""]).to(dtype)
        d = LatentDiscriminator(components.unet, empty, solver.timesteps(sc.steps)[-1])
        discriminator = DiscriminatorTrainer(d, cc.disc_lr, tuple(cc.disc_betas), cfg.optim.weight_decay,
                                             cc.disc_max_grad_norm)
        real = RealLatents(components.unet, solver, latent_shape, sc.steps, sc.guidance)
    store = None
    if cc.w_token > 0 or cc.w_pixel > 0:
        store = AttentionStore()
        install_capture(components.unet, store)
    return Run(CoMatObjective(denoiser, components.vae, components.scheduler, conditioner, latent_shape, sc.steps,
                              sc.guidance, sc.grad_steps, dtype, captioner=captioner, w_concept=cc.w_concept,
                              store=store, w_token=cc.w_token, w_pixel=cc.w_pixel, attn_steps=cc.attn_steps,
                              threshold=cc.threshold, max_group_words=cc.max_group_words, discriminator=discriminator,
                              real=real, w_adv=cc.w_adv, solver=solver,
                              decode_chunk=sc.decode_chunk if cfg.run.mode == "fast" else 0),
               state=discriminator.state if discriminator else None,
               load_state=discriminator.load_state if discriminator else None,
               **_validation(cfg, components, accelerator, dtype, conditioner))


def build_lcm(cfg: TrainConfig, components, accelerator, dtype, conditioner) -> Run:
    from .objectives.lcm import LCMDistillObjective

    if cfg.run.gradient_checkpointing:
        accelerator.unwrap_model(components.unet).enable_gradient_checkpointing()
    lc = cfg.lcm
    return Run(LCMDistillObjective(components.unet, components.vae, components.scheduler, conditioner,
                                   lc.num_ddim_timesteps, lc.w_min, lc.w_max, lc.huber_c, lc.sigma_data,
                                   lc.timestep_scaling, dtype))


BUILDERS = {"align": build_align, "reward": build_reward, "lcm": build_lcm}
