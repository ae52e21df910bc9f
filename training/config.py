"""The trainer's configuration: one dataclass tree, read from YAML/TOML, overridden from the
command line, printed resolved.

Every field carries its help text; ``--help`` lists the sections the stage reads (:data:`STAGE_SECTIONS`),
one group each, as ``--section.field`` options. A config file or override with a key that does not
exist, or of a section the run does not read, is refused with the key's name. Standard library only:
the command line answers before torch is imported.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A config field with its help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    pretrained: str | None = opt(None, "SD1.5 or SDXL as a diffusers folder or a single .safetensors/.ckpt file (local)")
    tiny: bool = opt(False, "build tiny random models from configs instead (demo/tests; no files needed)")
    family: Literal["auto", "sd15", "sdxl"] = opt("auto", "model family: auto = detected from model.pretrained "
                                                  "(SD1.x or SDXL; SD2.x is refused), sd15 with --tiny; sdxl: the tiny "
                                                  "SDXL with --tiny, or a check of what model.pretrained is")
    config: str | None = opt(None, "component configs for a single-file checkpoint (a folder like training/configs/sd15: model_index.json, unet/, vae/, text_encoder/, scheduler/); default: the detected family's, shipped (training/configs/sd15 or sdxl)")
    t5: str | None = opt(None, "T5 encoder folder (transformers) for the ct5f branch; omit for CLIP only")
    t5_tokenizer: str | None = opt(None, "folder with the T5 tokenizer (tokenizer.json or spiece.model); default: the t5 folder")
    adapter: str | None = opt(None, "TextAdapter folder (LongSD's s28750_adapter/); a new one (d_t5 -> 896 -> 768) if t5 is set and this is not")
    init_lora: list = opt([], "LoRAs merged into the UNet before training, in order (reward: the alignment LoRA; "
                              "reward_lcm: the alignment LoRA, then the LCM student); comma-separated on the command line")
    reward_model: str | None = opt(None, "preference model file/folder for the reward stage")
    reward_kind: Literal["denscore", "pickscore", "hpsv2", "clip"] = opt("denscore", "kind of reward_model")
    reward_arch: str = opt("ViT-H-14", "open_clip architecture name for hpsv2/clip reward models")
    token_length: int = opt(240, "L: rows of the CLIP segment conditioning (and T5 tokens)")


@dataclass
class LoraConfig:
    rank: int = opt(32, "LoRA rank r (reference 32)")
    alpha: float = opt(32.0, "LoRA alpha; scale = alpha / rank (reference: scale 1)")
    dropout: float = opt(0.0, "dropout on the LoRA branch (reference trains with 0.1)")
    targets: Literal["reference", "attention"] = opt(
        "reference", "reference: every Linear/Conv2d in ResnetBlock2D, Attention and GEGLU; attention: to_q, to_k, "
        "to_v, to_out of every attention (CoMat)")


@dataclass
class OptimConfig:
    lr: float = opt(3e-5, "AdamW learning rate (reference 3e-5)")
    betas: list = opt([0.9, 0.999], "AdamW betas")
    weight_decay: float = opt(1e-2, "AdamW weight decay")
    eps: float = opt(1e-8, "AdamW epsilon")
    warmup_steps: int = opt(2000, "linear warm-up steps, then constant (reference 2000)")
    scale_warmup_by_processes: bool = opt(True, "multiply warm-up by the process count, as the reference does")
    max_grad_norm: float = opt(0.3, "gradient-norm clip (reference 0.3); 0 disables")
    use_8bit_adam: bool = opt(False, "bitsandbytes 8-bit AdamW when installed")


@dataclass
class DataConfig:
    path: str | None = opt(None, "images folder (+ .txt captions), .jsonl/.csv/.parquet with path,caption, or a prompts file (.txt, one per line)")
    batch_size: int = opt(16, "samples per process and step")
    resolution: int = opt(512, "training resolution (square)")
    caption_dropout: float = opt(0.1, "probability of replacing a caption by the empty prompt (align)")
    num_workers: int = opt(0, "data loader workers")
    max_image_pixels: int = opt(89_478_485, "images with more pixels (width x height) are skipped and counted, never "
                                            "decoded (PIL's decompression-bomb guard; default: PIL's limit)")


@dataclass
class SamplingConfig:
    steps: int = opt(50, "DDIM steps of the differentiable sampling loop (t = 999, 979, ..., 19)")
    guidance: float = opt(7.5, "classifier-free guidance scale")
    grad_steps: int = opt(5, "K: UNet calls with gradient (every steps/K-th step, random offset)")
    w: float = opt(0.3, "reweighting of the text-irrelevant score part (reference 0.3; 1 = plain score)")
    decode_chunk: int = opt(1, "fast mode: images decoded and back-propagated into x0 at a time (memory); 0 = whole batch")
    checkpoint_calls: bool = opt(False, "fast mode: also one activation checkpoint around each gradient UNet call, so "
                                        "only the calls' inputs are held until the backward pass (lower peak memory, "
                                        "one more UNet forward per gradient call)")
    objective: Literal["longalign", "textcraftor", "comat"] = opt(
        "longalign", "reward-stage objective: longalign (decomposed preference, SPEC §4), textcraftor (text-encoder "
        "fine-tuning on rewards, SPEC §5) or comat (concept matching, attribute concentration, fidelity, SPEC §6); "
        "sets that objective's defaults")
    sampler: Literal["ddim", "lcm"] = opt(
        "ddim", "solver of the differentiable loop: ddim, or lcm (reward_lcm: 4 LCM steps, no CFG; give the LCM "
        "student as the last model.init_lora); sets that sampler's defaults")


@dataclass
class TextCraftorConfig:
    """TextCraftor (Li et al., CVPR 2024; SPEC §5). Loss = -100 w_clip mean(cos) - w_pick mean(logit_scale
    diag) - 100 w_hps mean(diag) - 3 w_aes mean(aesthetic); a term with weight 0 is off."""

    train: Literal["lora", "full"] = opt("lora", "text encoder: lora (peft on every attention/MLP Linear, saved as "
                                         "lora_te_* for LoraLoader) or full fine-tune (saved as weight diffs)")
    rank: int = opt(32, "text-encoder LoRA rank (ours; the paper fine-tunes the whole encoder)")
    alpha: float = opt(32.0, "text-encoder LoRA alpha (scale alpha / rank)")
    w_clip: float = opt(0.5, "CLIP-score weight (TextCraftor script: 0.5, times 100)")
    w_pick: float = opt(1.0, "PickScore weight (script: 1; ours takes the diagonal, the script the whole B x B matrix)")
    w_hps: float = opt(1.0, "HPSv2 weight (script: 1, times 100)")
    w_aes: float = opt(1.0, "aesthetic weight (script: 1, times 3)")
    clip_model: str | None = opt(None, "CLIP model for the CLIP-score term (paper: OpenCLIP ViT-g-14)")
    clip_kind: Literal["denscore", "pickscore", "hpsv2", "clip"] = opt("clip", "kind of clip_model")
    clip_arch: str = opt("ViT-g-14", "open_clip architecture of clip_model")
    pick_model: str | None = opt(None, "PickScore folder (transformers CLIPModel)")
    hps_model: str | None = opt(None, "HPSv2 checkpoint (open_clip ViT-H-14)")
    hps_arch: str = opt("ViT-H-14", "open_clip architecture of hps_model")
    aesthetic_head: str | None = opt(None, "aesthetic predictor head (.safetensors: Linear layers on normalised "
                                     "CLIP image features, e.g. the LAION aesthetic MLP)")
    aesthetic_clip: str | None = opt(None, "CLIP model whose image features the head reads (paper: OpenAI ViT-L/14)")
    aesthetic_kind: Literal["denscore", "pickscore", "hpsv2", "clip"] = opt("clip", "kind of aesthetic_clip")
    aesthetic_arch: str = opt("ViT-L-14", "open_clip architecture of aesthetic_clip")


@dataclass
class CoMatConfig:
    """CoMat (Jiang et al., NeurIPS 2024; SPEC §6). Loss = -w_concept r + w_adv G_adv + w_token L_token +
    w_pixel L_pixel; a term with weight 0 is off (nothing of it is loaded or computed)."""

    captioner: str | None = opt(None, "BLIP captioner folder (transformers BlipForConditionalGeneration, e.g. a "
                                "local blip-image-captioning-large: config.json, model.safetensors, tokenizer files)")
    w_concept: float = opt(1.0, "concept-matching weight (paper: 1; r = minus BLIP's mean token cross-entropy)")
    w_adv: float = opt(1.0, "adversarial (fidelity preservation) weight (paper, SD1.5: 1)")
    w_token: float = opt(1e-3, "attribute-concentration token-loss weight (paper: 1e-3)")
    w_pixel: float = opt(5e-5, "attribute-concentration pixel-loss weight (paper: 5e-5; needs noun masks, which the "
                         "prompts-only data does not carry: off in practice)")
    attn_steps: int = opt(2, "gradient calls whose cross-attention maps enter the concentration losses (paper: 2 of 5)")
    threshold: float = opt(0.5, "mask-free concentration: a noun's region is where its map is >= threshold x its max (ours)")
    max_group_words: int = opt(3, "noun-modifier groups with more words are dropped (reference: 4+ dropped)")
    disc_lr: float = opt(2e-5, "discriminator AdamW learning rate (paper 2e-5)")
    disc_betas: list = opt([0.0, 0.999], "discriminator AdamW betas (paper (0, 0.999))")
    disc_max_grad_norm: float = opt(1.0, "discriminator gradient-norm clip (paper 1)")


@dataclass
class LcmConfig:
    """Latent consistency distillation (Luo et al. 2023; SPEC §4 ``lcm``)."""

    num_ddim_timesteps: int = opt(50, "N: DDIM solver steps of the skipping-step schedule (k = 1000 / N)")
    w_min: float = opt(3.0, "teacher guidance w ~ U[w_min, w_max], eps = eps_c + w (eps_c - eps_u) (diffusers LCM-LoRA script)")
    w_max: float = opt(15.0, "upper end of the teacher guidance range")
    huber_c: float = opt(0.001, "c of the pseudo-Huber loss sqrt(d^2 + c^2) - c")
    sigma_data: float = opt(0.5, "sigma_data of the boundary scalings c_skip / c_out")
    timestep_scaling: float = opt(10.0, "timestep scaling s of the boundary scalings (c_skip, c_out at s t)")


@dataclass
class RunConfig:
    output_dir: str = opt("runs/longalign", "where checkpoints, logs, samples and the LoRA go")
    max_steps: int = opt(0, "optimizer steps; 0 = run the configured epochs")
    epochs: int = opt(2, "passes over the data when max_steps is 0")
    grad_accum: int = opt(1, "gradient accumulation steps")
    seed: int = opt(0, "random seed (data order, noise, dropout)")
    mixed_precision: Literal["no", "fp16", "bf16"] = opt("bf16", "accelerate mixed precision; frozen weights use this dtype")
    gradient_checkpointing: bool = opt(False, "diffusers gradient checkpointing in the UNet")
    save_every: int = opt(500, "checkpoint (accelerate save_state) every N steps")
    keep_checkpoints: int = opt(2, "complete checkpoints kept on disk")
    validate_every: int | Literal["auto"] = opt(
        "auto", "validation images (fixed prompts and seeds) every N steps; 0 disables; auto: every 150 steps on a "
        "GPU, none on the CPU")
    validation_prompts: list = opt([], "prompts for validation images (default: the first captions of the data)")
    log_every: int = opt(10, "scalars to TensorBoard every N steps")
    log_with: Literal["tensorboard", "none"] = opt("tensorboard", "experiment tracker")
    resume: bool | str = opt(False, "true: continue from the latest complete checkpoint in output_dir; a path: from "
                                    "that checkpoint folder (checkpoints/step-N); refused if it belongs to another run")
    overwrite: bool = opt(False, "a new run into an output_dir holding another run's checkpoints deletes them "
                                 "(checkpoints/step-*; nothing else) instead of being refused")
    device: Literal["auto", "cpu"] = opt("auto", "cpu forces the CPU even with a GPU present")
    mode: Literal["fast", "reference"] = opt("fast", "fast: merged-weight no-grad calls, per-block checkpointing, chunked decode, fused AdamW; reference: the reference's own way (for comparison; same method, same numbers)")
    cache_gb: float = opt(4.0, "fast mode, align: memory for cached VAE latents and text conditionings (frozen encoders run once per image/caption)")
    compile: Literal["auto", "on", "off"] = opt("auto", "torch.compile the fast mode's UNet calls (auto: on with CUDA)")


@dataclass
class TrainConfig:
    stage: Literal["align", "reward", "lcm"] = opt("align", "which stage this config runs")
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    textcraftor: TextCraftorConfig = field(default_factory=TextCraftorConfig)
    comat: CoMatConfig = field(default_factory=CoMatConfig)
    lcm: LcmConfig = field(default_factory=LcmConfig)
    run: RunConfig = field(default_factory=RunConfig)


STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "align": {"data.batch_size": 16, "run.grad_accum": 2, "run.epochs": 2, "run.save_every": 1250},
    "reward": {"data.batch_size": 8, "run.epochs": 1, "run.save_every": 500},
    "lcm": {"data.batch_size": 16, "run.epochs": 1, "run.save_every": 500, "run.validate_every": 0,
            "data.caption_dropout": 0.0},
}
"""The reference's per-stage settings (SPEC §4), applied before the file and the command line. SPEC gives
no batch size for ``lcm``: 16 as ``align``; the teacher's unconditional branch replaces caption dropout."""

OBJECTIVE_DEFAULTS: dict[str, dict[str, Any]] = {
    "longalign": {},
    "textcraftor": {"sampling.steps": 25, "sampling.guidance": 7.5, "sampling.grad_steps": 5, "optim.lr": 1e-6,
                    "optim.max_grad_norm": 0.0, "optim.warmup_steps": 0, "data.batch_size": 4},
    "comat": {"sampling.steps": 50, "sampling.guidance": 7.5, "sampling.grad_steps": 5, "optim.lr": 5e-5,
              "optim.weight_decay": 1e-2, "optim.max_grad_norm": 0.1, "optim.warmup_steps": 0, "data.batch_size": 4,
              "run.max_steps": 2000, "lora.rank": 128, "lora.alpha": 128.0, "lora.targets": "attention"},
}
"""Each objective's paper settings (SPEC §5 TextCraftor: DDIM 25, CFG 7.5, the last 5 steps with the
fine-tuned encoder, AdamW 1e-6 without clipping, batch 4 per GPU; no warm-up is given: constant LR.
SPEC §6 CoMat, SD1.5: 50 steps, CFG 7.5, K = 5, AdamW lr 5e-5, wd 1e-2, constant LR, clip 0.1, batch 4 per GPU,
2000 steps, LoRA rank 128 (scale 1) on to_q/to_k/to_v/to_out of every attention. The paper trains in fp16;
ours keeps bf16 (no loss scaling for the discriminator's own step))."""

FAMILY_OBJECTIVE_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("sdxl", "comat"): {"data.resolution": 512, "optim.lr": 2e-5, "data.batch_size": 6, "comat.w_adv": 0.5,
                        "comat.disc_lr": 5e-5},
}
"""Settings of an objective that differ by model family, applied over :data:`OBJECTIVE_DEFAULTS` when
``model.family`` names the family, or is ``auto`` and ``model.pretrained`` is of it (:func:`detected_family`).
CoMat-SDXL (SPEC §9, CaraJ7/CoMat ``scripts/sdxl.sh``): 512 x 512, lr 2e-5, batch 6 per GPU, w_adv 0.5,
discriminator lr 5e-5; rank-128 attention LoRA, 50 steps, K = 5, clip 0.1 as SD1.5's."""

SAMPLER_DEFAULTS: dict[str, dict[str, Any]] = {
    "ddim": {},
    "lcm": {"sampling.steps": 4, "sampling.guidance": 0.0, "sampling.grad_steps": 4},
}
"""``lcm``: 4 LCM steps without guidance (SPEC §4 ``reward_lcm``); K = 4 = every step with gradient (ours:
SPEC gives no K for 4 steps)."""

TINY_PRESET: dict[str, Any] = {"model.tiny": True, "data.resolution": 64, "model.token_length": 77}
"""``--tiny``: tiny random models at 64x64 (8x8 latents), a 77-token context: a CPU demo in a minute."""


class ConfigError(ValueError):
    """A config key or value that does not fit the schema."""


def _sections(cfg: Any, prefix: str = "") -> typing.Iterator[tuple[str, Any, dataclasses.Field]]:
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from _sections(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hints[f.name], f


def _coerce(key: str, hint: Any, value: Any) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if value is None and type(None) in args:
        return None
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        for member in inner[:-1]:  # the first member the value fits (bool | str: "true" is True, a path a str)
            try:
                return _coerce(key, member, value)
            except ConfigError:
                pass
        return _coerce(key, inner[-1], value)
    if hint is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return bool(value)
    if hint is list or origin is list:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return value
    try:
        return hint(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}: expected {getattr(hint, '__name__', hint)}, got {value!r}") from e


def set_value(cfg: TrainConfig, key: str, value: Any) -> None:
    """Set ``section.field`` on ``cfg``, checked against the schema."""
    fields = {k: (hint, f) for k, hint, f in _sections(cfg)}
    if key not in fields:
        close = [k for k in fields if k.split(".")[-1] == key.split(".")[-1]]
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"unknown config key {key!r}{hint}")
    target: Any = cfg
    *path, last = key.split(".")
    for part in path:
        target = getattr(target, part)
    setattr(target, last, _coerce(key, fields[key][0], value))


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and f"{prefix}{k}" in {f.name for f in dataclasses.fields(TrainConfig)}:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_config_file(path: str) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or TOML (.toml) file as flat ``section.field`` keys."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".toml"):
        import tomllib

        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path!r} is not valid TOML: {e}") from e
    elif path.endswith((".yaml", ".yml")):
        import yaml

        try:
            data = yaml.safe_load(raw) or {}
        except yaml.YAMLError as e:  # includes the !!python tags safe_load refuses
            raise ConfigError(f"config file {path!r} is not valid YAML (or uses tags that are refused): {e}") from e
    else:
        raise ConfigError(f"config file {path!r}: expected .yaml, .yml or .toml")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r}: expected a mapping at the top level")
    return _flatten(data)


SECTION_HELP: dict[str, str] = {
    "model": "models, from local paths only",
    "lora": "the UNet LoRA that trains",
    "optim": "optimizer (AdamW) and learning-rate schedule",
    "data": "training data",
    "sampling": "the differentiable sampling loop",
    "textcraftor": "TextCraftor: used with --objective textcraftor",
    "comat": "CoMat: used with --objective comat",
    "lcm": "latent consistency: the lcm stage, and reward with --sampler lcm",
    "run": "output folder, length, precision, checkpoints, validation, logging",
}
"""The title line of each section's group in ``--help``."""

STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "align": ("model", "lora", "optim", "data", "run"),
    "reward": ("model", "lora", "optim", "data", "sampling", "textcraftor", "comat", "lcm", "run"),
    "lcm": ("model", "lora", "optim", "data", "lcm", "run"),
}
"""The sections each stage reads, and its ``--help`` lists. ``reward`` reads ``textcraftor`` and
``comat`` only with that objective, and ``lcm`` only with ``--sampler lcm`` (:func:`used_sections`)."""

OBJECTIVE_SECTIONS = {"textcraftor": "textcraftor", "comat": "comat"}
SAMPLER_SECTIONS = {"lcm": "lcm"}


def used_sections(stage: str, objective: str = "longalign", sampler: str = "ddim") -> tuple[str, ...]:
    """The config sections a run of ``stage`` with this objective and sampler reads."""
    unused = {s for name, s in OBJECTIVE_SECTIONS.items() if name != objective}
    unused |= {s for name, s in SAMPLER_SECTIONS.items() if name != sampler}
    return tuple(s for s in STAGE_SECTIONS[stage] if stage != "reward" or s not in unused)


def check_sections(stage: str, keys: typing.Iterable[str], objective: str, sampler: str) -> None:
    """Refuse a setting (file or command line) of a section this run does not read, naming it."""
    used = used_sections(stage, objective, sampler)
    for key in keys:
        section = key.split(".")[0]
        if "." not in key or section in used or section not in SECTION_HELP:
            continue
        if section in STAGE_SECTIONS[stage]:
            when = next((f"--objective {o}" for o, s in OBJECTIVE_SECTIONS.items() if s == section), None)
            when = when or next(f"--sampler {n}" for n, s in SAMPLER_SECTIONS.items() if s == section)
            raise ConfigError(f"{key}: the {section} section is read only with {when} (this run: objective "
                              f"{objective!r}, sampler {sampler!r})")
        raise ConfigError(f"{key}: `training.{stage}` does not use the {section} section (it reads "
                          f"{', '.join(used)})")


def build_parser(stage: str, description: str) -> argparse.ArgumentParser:
    """The stage's command line: general options, then one group per section the stage reads.
    Options of the other sections are accepted but hidden, for :func:`resolve` to refuse by name."""
    parser = argparse.ArgumentParser(
        prog=f"python -m training.{stage}", description=description,
        usage="%(prog)s [-h] [--config FILE] [--tiny] [--resume [PATH]] [--SECTION.OPTION V ...]",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", help="YAML or TOML config file; command-line options override it")
    parser.add_argument("--tiny", action="store_true", help=f"tiny random models, CPU demo: {TINY_PRESET}")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                        help="continue from the latest complete checkpoint in run.output_dir, or from the "
                             "checkpoint folder PATH (checkpoints/step-N)")
    parser.add_argument("--mode", choices=["fast", "reference"], help="shorthand for --run.mode")
    if stage == "reward":
        parser.add_argument("--objective", choices=list(OBJECTIVE_DEFAULTS), help="shorthand for --sampling.objective")
        parser.add_argument("--sampler", choices=list(SAMPLER_DEFAULTS), help="shorthand for --sampling.sampler")
        parser.add_argument("--captioner", help="shorthand for --comat.captioner")
    defaults = TrainConfig(stage=stage)
    for key, value in STAGE_DEFAULTS[stage].items():
        set_value(defaults, key, value)
    groups = {s: parser.add_argument_group(s, SECTION_HELP[s]) for s in STAGE_SECTIONS[stage]}
    for key, hint, f in _sections(defaults):
        if key == "stage":
            continue
        current = defaults
        for part in key.split("."):
            current = getattr(current, part)
        choices = list(get_args(hint)) if get_origin(hint) is Literal else None
        group = groups.get(key.split(".")[0])
        (group or parser).add_argument(
            f"--{key}", default=argparse.SUPPRESS, metavar="V" if not choices else None, choices=choices,
            help=f"{f.metadata['help']} (default: {current!r})" if group else argparse.SUPPRESS)
    return parser


def detected_family(pretrained: str | None, objective: str | None) -> str | None:
    """The family of ``model.pretrained`` for :data:`FAMILY_OBJECTIVE_DEFAULTS` under ``model.family auto``,
    read with the standard library (:func:`.family_detect.family_name`). None when there is nothing to
    read yet: no path, a missing or unsupported model (the trainer's own detection then refuses it by
    name), an objective whose defaults do not depend on the family, or a pickled ``.ckpt``, which needs
    torch: then the objective's SD1.5 defaults apply, with a warning."""
    from .family_detect import DetectionError, family_name

    if not pretrained or not os.path.exists(pretrained) or all(o != objective for _, o in FAMILY_OBJECTIVE_DEFAULTS):
        return None
    try:
        family = family_name(pretrained)
    except DetectionError:
        return None
    if family is None:
        warnings.warn(f"model.pretrained {pretrained!r}: the family of a pickled checkpoint is known only once it "
                      f"loads, so --objective {objective}'s defaults are SD1.5's; for an SDXL checkpoint set "
                      "--model.family sdxl (or use its .safetensors) to get that family's defaults", stacklevel=3)
    return family


SHORTHANDS = {"objective": "sampling.objective", "sampler": "sampling.sampler", "captioner": "comat.captioner"}


def resolve(stage: str, args: argparse.Namespace) -> TrainConfig:
    """Stage defaults, the objective's and the sampler's defaults, then the config file, then the
    ``--tiny`` preset, then the command line."""
    file_values: dict[str, Any] = {}
    if getattr(args, "config", None):
        file_values = read_config_file(args.config)
        file_stage = file_values.pop("stage", stage)
        if file_stage != stage:
            raise ConfigError(f"config file is for stage {file_stage!r}, this is `training.{stage}`")
    cli = {k: v for k, v in vars(args).items() if k not in ("config", "tiny", "resume", "mode", *SHORTHANDS)}
    cli.update({SHORTHANDS[k]: v for k, v in vars(args).items() if k in SHORTHANDS and v is not None})
    cfg = TrainConfig(stage=stage)
    for key, value in STAGE_DEFAULTS[stage].items():
        set_value(cfg, key, value)
    for key, table in (("sampling.objective", OBJECTIVE_DEFAULTS), ("sampling.sampler", SAMPLER_DEFAULTS)):
        name = cli.get(key, file_values.get(key))
        if name is None:
            continue
        if name not in table:
            raise ConfigError(f"{key}: {name!r} is not one of {list(table)}")
        if stage != "reward" and name != next(iter(table)):
            raise ConfigError(f"{key} = {name!r} belongs to the reward stage, this is `training.{stage}`")
        for k, v in table[name].items():
            set_value(cfg, k, v)
    objective = cli.get("sampling.objective", file_values.get("sampling.objective"))
    family = cli.get("model.family", file_values.get("model.family", "auto"))
    if family == "auto" and not getattr(args, "tiny", False):
        family = detected_family(cli.get("model.pretrained", file_values.get("model.pretrained")), objective)
    for k, v in FAMILY_OBJECTIVE_DEFAULTS.get((family, objective), {}).items():
        set_value(cfg, k, v)
    chosen = {**file_values, **cli}
    check_sections(stage, chosen, chosen.get("sampling.objective", "longalign"), chosen.get("sampling.sampler", "ddim"))
    for key, value in file_values.items():
        set_value(cfg, key, value)
    if getattr(args, "tiny", False):
        for key, value in TINY_PRESET.items():
            set_value(cfg, key, value)
    for key, value in cli.items():
        set_value(cfg, key, value)
    if getattr(args, "resume", None) not in (None, False):  # --resume: True (the latest) or a checkpoint path
        cfg.run.resume = args.resume
    if getattr(args, "mode", None):
        cfg.run.mode = args.mode
    return cfg


def as_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def describe(cfg: TrainConfig) -> str:
    """The resolved config, as printed at start and stored with every output."""
    return json.dumps(as_dict(cfg), indent=2, sort_keys=False)
