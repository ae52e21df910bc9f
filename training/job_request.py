"""A training job's request (for the ComfyUI node): its inputs, their checks and the config the trainer runs.

:class:`JobRequest` holds the node's inputs; :func:`check_request` refuses bad input by name
(:class:`JobInputError`) before anything is written or started; :func:`settings` turns a request into
the flat settings of ``python -m training.<reward|align> --config`` and :func:`write_config` writes
them (atomically). :mod:`.graph_job` runs the job.

Stages (the paper's settings come from :mod:`.config`; :func:`stage_defaults` shows them):

* ``reward``: LongAlign's decomposed preference optimisation (``training.reward``), from prompts;
  needs a preference model (:attr:`JobRequest.reward_model`).
* ``align``: long-text alignment (``training.align``), from an image folder with same-named ``.txt``
  captions (:attr:`JobRequest.image_folder`).
* ``comat``: CoMat (``training.reward --objective comat``), from prompts; needs a local BLIP
  captioner folder (:attr:`JobRequest.captioner`) for its concept-matching term.

A single-file checkpoint whose UNet or VAE is not the family's standard layout (a pruned or tiny
model) trains when its diffusers component configs lie beside it in ``<file name without
extension>.config/`` (the layout of ``training/configs/sd15``): passed to the trainer as
``model.config``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import config as config_mod
from .family_detect import DetectionError, family_name

if TYPE_CHECKING:
    from .reward_models import RewardSource

STAGES = ("reward", "align", "comat")
STAGE_RUNS: dict[str, tuple[str, str | None]] = {"reward": ("reward", "longalign"), "align": ("align", None),
                                                 "comat": ("reward", "comat")}
"""Each stage's trainer module (``python -m training.<module>``) and reward-stage objective."""
STAGE_SUMMARIES = {
    "reward": "LongAlign decomposed preference optimisation through the differentiable sampler; prompts and a "
              "reward model",
    "align": "long-text alignment (diffusion loss on segment-encoded captions); an image folder with .txt captions",
    "comat": "CoMat: concept matching with a BLIP captioner, attribute concentration, fidelity; prompts and a captioner",
}
CONFIG_SIDECAR = ".config"
"""Suffix of the folder beside a checkpoint holding its own diffusers component configs."""
PROMPTS_FILE = "prompts.txt"
JOB_FILE = "job.json"
VALIDATIONS_PER_RUN = 4
"""A run shows about this many validation grids (``run.validate_every`` = steps // 4, at least 1)."""
WARMUP_SHARE = 10
"""``warmup_steps`` None: the paper's warm-up, but at most a tenth of the run (the reference's 2000 warm-up
steps belong to its long runs: a shorter run would never reach its learning rate)."""
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
"""The single files the trainer reads (:func:`.models.model_family`)."""
NAME_FORBIDDEN = set('/\\:*?"<>|')
RESUME_INPUTS = ("checkpoint", "stage", "prompts", "image_folder", "reward_model", "captioner", "rank", "lr",
                 "resolution", "batch_size", "sampling_steps", "warmup_steps", "seed")
"""Inputs a resumed run must share with the run it continues (``steps`` may grow: the run goes on)."""


class JobInputError(ValueError):
    """Bad input to a job, found before anything is written or started. ``input`` names the
    :class:`JobRequest` field (the node input of the same name)."""

    def __init__(self, input: str, message: str):
        super().__init__(f"{input}: {message}")
        self.input = input


@dataclass
class JobRequest:
    """One training job. Numbers left at 0 (``warmup_steps``: None) take the stage's paper setting
    (:func:`stage_defaults`); ``steps`` 0 is the stage's own length (its epochs over the data)."""

    checkpoint: str
    """A single-file SD1.5 or SDXL checkpoint (``.safetensors``/``.ckpt``) or a diffusers folder."""
    stage: str
    """``reward``, ``align`` or ``comat``."""
    name: str
    """The LoRA's name: ``loras_dir/<name>.safetensors`` and the run folder ``run_root/<name>``."""
    run_root: str
    """The folder holding run folders (the node: ``<ComfyUI output>/longalign_runs``)."""
    loras_dir: str
    """Where the finished LoRA goes (ComfyUI's ``models/loras``)."""
    prompts: list[str] = field(default_factory=list)
    """Training prompts, one per entry (reward, comat); align: validation prompts (optional)."""
    image_folder: str | None = None
    """align: images with same-named ``.txt`` captions."""
    reward_model: "RewardSource | None" = None
    """reward: the preference model's source (``REWARD_MODEL.source``: path, kind, architecture)."""
    captioner: str | None = None
    """comat: a local BLIP captioner folder (transformers ``BlipForConditionalGeneration``)."""
    steps: int = 0
    rank: int = 0
    """LoRA rank; alpha = rank (scale 1, as the paper's)."""
    lr: float = 0.0
    resolution: int = 0
    batch_size: int = 0
    sampling_steps: int = 0
    """reward, comat: DDIM steps of the differentiable sampling loop."""
    warmup_steps: int | None = None
    """None: the paper's, at most steps // 10 (:data:`WARMUP_SHARE`)."""
    validate_every: int = 0
    """Validation grid every this many steps; 0: about :data:`VALIDATIONS_PER_RUN` per run (steps // 4, at least 1)."""
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    device: str = "auto"
    """``auto`` (a GPU when there is one) or ``cpu``."""

    @property
    def run_dir(self) -> str:
        return os.path.join(self.run_root, self.name)

    @property
    def lora_path(self) -> str:
        return os.path.join(self.loras_dir, self.name + ".safetensors")


# -- the paper's settings ------------------------------------------------------------------------


def _stage_config(stage: str) -> config_mod.TrainConfig:
    """The config ``python -m training.<module>`` resolves for ``stage`` with no file and no option."""
    module, objective = STAGE_RUNS[stage]
    parser = config_mod.build_parser(module, "")
    argv = ["--objective", objective] if module == "reward" else []
    return config_mod.resolve(module, parser.parse_args(argv))


def stage_defaults(stage: str) -> dict[str, Any]:
    """What ``stage`` trains with when a number is left at 0, read from :mod:`.config` (the paper's
    settings): ``summary``, ``needs`` (the request fields it requires), ``steps`` (None: its epochs over
    the data), ``epochs``, ``rank``, ``lr``, ``resolution``, ``batch_size``, ``grad_accum``,
    ``warmup_steps``, ``sampling_steps`` and ``guidance`` (None for align)."""
    check_stage(stage)
    cfg = _stage_config(stage)
    sampled = stage != "align"
    return {
        "summary": STAGE_SUMMARIES[stage],
        "needs": {"reward": ["prompts", "reward_model"], "align": ["image_folder"],
                  "comat": ["prompts", "captioner"]}[stage],
        "steps": cfg.run.max_steps or None, "epochs": cfg.run.epochs, "rank": cfg.lora.rank, "lr": cfg.optim.lr,
        "resolution": cfg.data.resolution, "batch_size": cfg.data.batch_size, "grad_accum": cfg.run.grad_accum,
        "warmup_steps": cfg.optim.warmup_steps, "sampling_steps": cfg.sampling.steps if sampled else None,
        "guidance": cfg.sampling.guidance if sampled else None,
    }


def check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise JobInputError("stage", f"{stage!r} is not one of {', '.join(STAGES)}")


# -- checking a request (touches nothing) ---------------------------------------------------------


def sidecar_config_dir(checkpoint: str) -> str:
    """``<checkpoint without extension>.config``: where a single file's own component configs lie."""
    return os.path.splitext(checkpoint)[0] + CONFIG_SIDECAR


def check_name(name: str) -> None:
    """A LoRA name that is one plain file name on every system: no path separators, no ``:*?"<>|``,
    no control characters, not hidden, no leading or trailing space or dot."""
    if not isinstance(name, str) or not name.strip():
        raise JobInputError("name", "is empty; expected a name for the LoRA file, e.g. my_reward_lora")
    bad = sorted({c for c in name if c in NAME_FORBIDDEN or ord(c) < 32})
    if bad or name.startswith(".") or name != name.strip() or name.endswith(".") or len(name) > 120:
        why = f"holds {''.join(bad)!r}" if bad else "starts with a dot, ends with a dot or space, or is over 120 characters"
        raise JobInputError("name", f"{name!r} {why}; expected a plain file name without path separators "
                                    "(letters, digits, spaces, - _ . ( ) ...), saved as <name>.safetensors in models/loras")


def _positive(value: float, what: str, integer: bool = True) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) if integer else isinstance(value, (int, float))
    if not ok or not math.isfinite(value) or value < 0:
        raise JobInputError(what, f"{value!r}; expected {'a whole number' if integer else 'a number'} >= 0 "
                                  "(0: the stage's paper setting)")


def _check_checkpoint(path: str) -> None:
    if not path or not os.path.exists(path):
        raise JobInputError("checkpoint", f"{path!r} does not exist; expected an SD1.5 or SDXL checkpoint in "
                                          "models/checkpoints")
    if os.path.isfile(path) and not path.lower().endswith(CHECKPOINT_SUFFIXES):
        raise JobInputError("checkpoint", f"{path!r} is not a checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)})")
    try:
        family_name(path)
    except DetectionError as e:
        raise JobInputError("checkpoint", str(e)) from None


def _check_prompts(req: JobRequest) -> None:
    for prompt in req.prompts:
        if not isinstance(prompt, str) or "\n" in prompt or "\r" in prompt:
            raise JobInputError("prompts", f"{str(prompt)[:60]!r}: each prompt must be one line of text")
    if req.stage != "align" and not request_prompts(req):
        raise JobInputError("prompts", f"no prompts; the {req.stage} stage trains from prompts: give one per line "
                                       "(or a text file in the input folder)")


def request_prompts(req: JobRequest) -> list[str]:
    """The request's prompts, stripped, empty ones dropped."""
    return [p.strip() for p in req.prompts if p.strip()]


def _check_sources(req: JobRequest) -> None:
    """The stage's own inputs: reward model (reward), image folder (align), captioner (comat)."""
    if req.stage == "reward":
        source = req.reward_model
        if source is None:
            raise JobInputError("reward_model", "the reward stage needs a preference model: connect a Reward Model "
                                                "Loader (Denscore, PickScore, HPSv2 or CLIP)")
        if not getattr(source, "path", None) or not os.path.exists(source.path):
            raise JobInputError("reward_model", f"{getattr(source, 'path', None)!r} is not a model on disk; the "
                                                "trainer loads it from its file: use a Reward Model Loader's model")
    if req.stage == "align":
        if not req.image_folder or not os.path.isdir(req.image_folder):
            raise JobInputError("image_folder", f"{req.image_folder!r} is not a folder; the align stage trains on "
                                                "images with same-named .txt captions (cat.png + cat.txt) in a "
                                                "folder of the input folder")
        from .data import DataError, read_records

        try:
            read_records(req.image_folder, need_images=True)
        except DataError as e:
            raise JobInputError("image_folder", str(e)) from None
    if req.stage == "comat":
        if not req.captioner or not os.path.isfile(os.path.join(req.captioner, "config.json")):
            raise JobInputError("captioner", f"{req.captioner!r} is not a captioner folder; CoMat's concept matching "
                                             "needs a local BLIP captioner (transformers BlipForConditionalGeneration: "
                                             "config.json, model.safetensors, tokenizer files)")


def recorded_inputs(req: JobRequest) -> dict[str, Any]:
    """The request's inputs as recorded in the run folder (:data:`JOB_FILE`) and compared on resume."""
    source, prompts = req.reward_model, request_prompts(req)
    digest = hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()[:16]
    return {
        "checkpoint": os.path.abspath(req.checkpoint), "stage": req.stage,
        "prompts": f"{len(prompts)} prompts, sha256 {digest}" if req.stage != "align" else None,  # align: validation only
        "image_folder": os.path.abspath(req.image_folder) if req.image_folder and req.stage == "align" else None,
        "reward_model": ([os.path.abspath(source.path), source.kind, source.architecture]
                         if source is not None and req.stage == "reward" else None),
        "captioner": os.path.abspath(req.captioner) if req.captioner and req.stage == "comat" else None,
        "rank": req.rank, "lr": req.lr, "resolution": req.resolution, "batch_size": req.batch_size,
        "sampling_steps": req.sampling_steps, "warmup_steps": req.warmup_steps, "seed": req.seed, "steps": req.steps,
    }


def _check_run_folder(req: JobRequest) -> None:
    """The name's LoRA file and run folder against ``resume`` / ``overwrite``; a resume must repeat the
    inputs of the run it continues."""
    from .run_state import latest_checkpoint

    run_dir = req.run_dir
    checkpoint = latest_checkpoint(run_dir) if os.path.isdir(run_dir) else None
    lora_exists = os.path.lexists(req.lora_path)
    if req.overwrite:
        return
    if not req.resume:
        if lora_exists:
            raise JobInputError("name", f"{req.lora_path!r} already exists; choose another name, turn on resume to "
                                        "continue its run, or overwrite to replace it")
        if checkpoint is not None:
            raise JobInputError("name", f"a run named {req.name!r} exists ({checkpoint}); turn on resume to continue "
                                        "it, or overwrite to start it over")
        return
    if checkpoint is None:
        if lora_exists:
            raise JobInputError("name", f"resume: there is no run named {req.name!r} to continue (no checkpoint in "
                                        f"{run_dir}), and {req.lora_path!r} exists; choose another name, or turn on "
                                        "overwrite to replace it")
        return
    recorded = _read_job(run_dir)
    if recorded is None:
        return  # a run folder of the trainer's own: its checkpoint's identity is checked by the trainer
    current = recorded_inputs(req)
    for key in RESUME_INPUTS:
        if key in recorded and recorded[key] != current[key]:
            raise JobInputError(key, f"resume: the run {req.name!r} was trained with {key} = {recorded[key]!r}, this "
                                     f"request has {current[key]!r}; set it back to continue the run, or turn on "
                                     "overwrite to start it over")


def _read_job(run_dir: str) -> dict | None:
    try:
        with open(os.path.join(run_dir, JOB_FILE), encoding="utf-8") as f:
            return json.load(f)["inputs"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_request(req: JobRequest) -> None:
    """Raise :class:`JobInputError` naming the first bad input; reads, never writes or starts anything."""
    from .job_lock import lock_holder  # here, not at the top: job_lock imports this module (JobInputError)

    check_stage(req.stage)
    check_name(req.name)
    _check_checkpoint(req.checkpoint)
    _check_prompts(req)
    for key in ("steps", "rank", "resolution", "batch_size", "sampling_steps", "validate_every", "seed"):
        _positive(getattr(req, key), key)
    _positive(req.lr, "lr", integer=False)
    if req.warmup_steps is not None:
        _positive(req.warmup_steps, "warmup_steps")
    if req.resolution % 8:
        raise JobInputError("resolution", f"{req.resolution}; expected a multiple of 8 (the VAE's factor; 64 for "
                                          "SD1.5's and SDXL's UNets)")
    if req.device not in ("auto", "cpu"):
        raise JobInputError("device", f"{req.device!r}; expected auto or cpu")
    _check_sources(req)
    if req.resume and req.overwrite:
        raise JobInputError("overwrite", "resume and overwrite are both on; resume continues the run, overwrite "
                                         "starts it over: choose one")
    _check_run_folder(req)
    probe = lock_holder(req.run_dir)
    if probe is not None:
        raise JobInputError("name", f"a training job is already running on {req.run_dir} ({probe}); wait for it "
                                    "or cancel it")
    cfg = _stage_config(req.stage)
    try:
        for key, value in settings(req).items():
            config_mod.set_value(cfg, key, value)
    except config_mod.ConfigError as e:
        raise JobInputError(_input_of(str(e)), str(e)) from None


def _input_of(message: str) -> str:
    """The request field behind a config error (its message starts with the config key)."""
    key = message.split(":")[0].strip()
    return {"data.resolution": "resolution", "lora.rank": "rank", "optim.lr": "lr", "model.reward_kind": "reward_model",
            "model.reward_arch": "reward_model", "run.max_steps": "steps"}.get(key, "stage")


# -- the config the child runs ----------------------------------------------------------------------


def default_steps(req: JobRequest) -> int:
    """``steps`` 0: the stage's paper length: ``run.max_steps`` if it has one (CoMat), else its epochs
    over the data, as the trainer counts them (batches of ``data.batch_size``, ``run.grad_accum`` per step)."""
    cfg = _stage_config(req.stage)
    if cfg.run.max_steps:
        return cfg.run.max_steps
    if req.stage == "align":
        from .data import read_records

        count = len(read_records(req.image_folder, need_images=True))
    else:
        count = len(request_prompts(req))
    batches = math.ceil(count / (req.batch_size or cfg.data.batch_size))
    return cfg.run.epochs * max(1, math.ceil(batches / cfg.run.grad_accum))


def settings(req: JobRequest) -> dict[str, Any]:
    """The flat ``section.key`` settings of the generated config: the stage's module and objective
    defaults stay (the paper's), the request's non-zero numbers override them."""
    module, objective = STAGE_RUNS[req.stage]
    steps = req.steps or default_steps(req)
    out: dict[str, Any] = {"stage": module, "model.pretrained": os.path.abspath(req.checkpoint)}
    sidecar = sidecar_config_dir(req.checkpoint)
    if os.path.isfile(req.checkpoint) and os.path.isdir(sidecar):
        out["model.config"] = os.path.abspath(sidecar)
    if module == "reward":
        out["sampling.objective"] = objective
    if req.stage == "reward":
        source = req.reward_model
        out.update({"model.reward_model": os.path.abspath(source.path), "model.reward_kind": source.kind})
        if source.architecture:
            out["model.reward_arch"] = source.architecture
    if req.stage == "comat":
        out["comat.captioner"] = os.path.abspath(req.captioner)
    if req.stage == "align":
        out["data.path"] = os.path.abspath(req.image_folder)
        if request_prompts(req):
            out["run.validation_prompts"] = request_prompts(req)[:4]
    else:
        out["data.path"] = os.path.join(os.path.abspath(req.run_dir), PROMPTS_FILE)
    if req.rank:
        out.update({"lora.rank": req.rank, "lora.alpha": float(req.rank)})
    for key, value in (("optim.lr", req.lr), ("data.resolution", req.resolution), ("data.batch_size", req.batch_size),
                       ("sampling.steps", req.sampling_steps if module == "reward" else 0)):
        if value:
            out[key] = value
    grad_steps = _stage_config(req.stage).sampling.grad_steps
    if module == "reward" and req.sampling_steps and req.sampling_steps < grad_steps:
        out["sampling.grad_steps"] = req.sampling_steps  # K gradient calls cannot outnumber the steps: all of them
    paper_warmup = _stage_config(req.stage).optim.warmup_steps
    if req.warmup_steps is not None:
        out["optim.warmup_steps"] = req.warmup_steps
    elif paper_warmup > steps // WARMUP_SHARE:
        out["optim.warmup_steps"] = steps // WARMUP_SHARE
    out.update({
        "run.output_dir": os.path.abspath(req.run_dir), "run.max_steps": steps, "run.seed": req.seed,
        "run.log_every": 1, "run.validate_every": req.validate_every or max(1, steps // VALIDATIONS_PER_RUN),
        "run.log_with": "tensorboard" if importlib.util.find_spec("tensorboard") else "none",
        "run.resume": bool(req.resume), "run.overwrite": bool(req.overwrite),
    })
    if req.device == "cpu":
        out["run.device"] = "cpu"
    return out


def write_config(path: str, values: dict[str, Any]) -> str:
    """The settings as a YAML file (JSON is YAML), written atomically."""
    from .safe_io import atomic_open

    with atomic_open(path) as f:
        f.write("# written by LongAlign Train LoRA (training/job_request.py); python -m training.<stage> --config this\n")
        json.dump(values, f, indent=1)
        f.write("\n")
    return path
