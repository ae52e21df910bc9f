"""What a checkpoint belongs to, and where a run starts: decided from small JSON files before any
model is loaded.

Every checkpoint's ``trainer_state.json`` holds its step and the run's identity (:func:`identity`:
stage, objective, sampler, model family and base-model hash, LoRA rank/alpha/targets, T5 branch,
precision). ``--resume`` (the latest complete checkpoint) or ``--resume PATH`` (a chosen one)
continues only a run with the same identity; a mismatch is refused naming each differing key. A new
run never mixes its checkpoints with another run's: a folder holding other checkpoints is refused
unless ``run.overwrite`` is set, and then only those ``step-*`` folders are removed.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any

from .config import TrainConfig
from .models import model_family

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"


class TrainingError(RuntimeError):
    """A run that cannot go on (no data, repeated non-finite losses, bad resume state)."""


@functools.lru_cache(maxsize=8)
def _file_hash(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def base_model_hash(cfg: TrainConfig) -> str:
    """sha256 (first 16 hex) of the base checkpoint file, or of the UNet weights of a folder."""
    path = cfg.model.pretrained
    if cfg.model.tiny or not path:
        return "tiny"
    if os.path.isdir(path):
        for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
            candidate = os.path.join(path, "unet", name)
            if os.path.isfile(candidate):
                path = candidate
                break
    return _file_hash(os.path.abspath(path))


def _name(path: str | None) -> str | None:
    return os.path.basename(os.path.normpath(path)) if path else None


def identity(cfg: TrainConfig) -> dict[str, Any]:
    """What a checkpoint of ``cfg`` belongs to: a run with other values here cannot continue it.
    ``cfg`` is the run as it actually runs (its ``run.mixed_precision`` the precision used)."""
    reward = cfg.stage == "reward"
    ident: dict[str, Any] = {
        "stage": cfg.stage,
        "objective": cfg.sampling.objective if reward else None,
        "sampler": cfg.sampling.sampler if reward else None,
        "model.family": model_family(cfg.model).name,
        "model.base_hash": base_model_hash(cfg),
        "lora.rank": cfg.lora.rank,
        "lora.alpha": cfg.lora.alpha,
        "lora.targets": cfg.lora.targets,
        "model.t5": _name(cfg.model.t5),
        "model.adapter": (_name(cfg.model.adapter) or "new") if cfg.model.t5 else None,
        "precision": cfg.run.mixed_precision,
    }
    if reward and cfg.sampling.objective == "textcraftor":
        tc = cfg.textcraftor
        ident.update({"textcraftor.train": tc.train, "textcraftor.rank": tc.rank, "textcraftor.alpha": tc.alpha})
    return json.loads(json.dumps(ident))  # as it reads back from trainer_state.json


def step_folders(output_dir: str) -> list[str]:
    """The ``checkpoints/step-*`` folders of ``output_dir`` (complete or not; ``.tmp`` ones excluded), oldest first."""
    root = os.path.join(output_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    return [os.path.join(root, d) for d in sorted(os.listdir(root))
            if d.startswith("step-") and not d.endswith(".tmp") and os.path.isdir(os.path.join(root, d))]


def latest_checkpoint(output_dir: str) -> str | None:
    done = [d for d in step_folders(output_dir) if os.path.isfile(os.path.join(d, STATE_FILE))]
    return done[-1] if done else None


def read_state(folder: str) -> dict[str, Any]:
    """A checkpoint's ``trainer_state.json``; a clear error if ``folder`` is not a checkpoint."""
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        raise TrainingError(f"--resume {folder!r}: not a checkpoint folder (expected a checkpoints/step-NNNNNNN "
                            f"folder holding {STATE_FILE})")
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TrainingError(f"--resume: {path!r} is damaged ({type(e).__name__}: {e}); expected a JSON object "
                            "with the step") from e
    return state


def check_identity(state: dict[str, Any], current: dict[str, Any], folder: str) -> None:
    """Refuse to continue ``folder`` (its ``state``) with a run whose :func:`identity` is ``current``."""
    saved = state.get("run")
    if saved is None:  # written before checkpoints recorded their run: only the stage is known
        saved = {"stage": state.get("stage", current["stage"])}
        print(f"[train] --resume: {folder} records only its stage; its model, LoRA and precision are not checked",
              file=sys.stderr)
    diffs = [f"{key}: checkpoint {saved[key]!r}, this run {value!r}"
             for key, value in current.items() if key in saved and saved[key] != value]
    if diffs:
        raise TrainingError(
            f"--resume: checkpoint {folder} belongs to another run; differing: " + "; ".join(diffs) + ". Run with the "
            "checkpoint's settings to continue it, or start a new run in another run.output_dir"
        )


@dataclass
class StartPoint:
    """Where a run starts: the checkpoint it resumes (None: step 0), and the other run's checkpoints
    ``run.overwrite`` allowed to remove."""

    checkpoint: str | None = None
    step: int = 0
    replaced: list[str] = field(default_factory=list)


def resume_source(cfg: TrainConfig) -> str | None:
    """The checkpoint ``run.resume`` names: the latest complete one for true, the folder for a path."""
    resume = cfg.run.resume
    if resume is True:
        latest = latest_checkpoint(cfg.run.output_dir)
        if latest is None:
            print(f"[train] --resume: no complete checkpoint in {cfg.run.output_dir}; starting from step 0",
                  file=sys.stderr)
        return latest
    return os.path.normpath(resume) if resume else None


def _conflicts(output_dir: str, source: str | None, step: int) -> list[str]:
    """Checkpoints in ``output_dir`` that are not of the line the run continues: all for a new run (or
    one resumed from elsewhere); those after ``source`` when it is one of them."""
    own_root = os.path.realpath(os.path.join(output_dir, CHECKPOINTS))
    from_here = source is not None and os.path.realpath(os.path.dirname(source)) == own_root
    found = step_folders(output_dir)
    if not from_here:
        return found
    return [f for f in found if os.path.basename(f) > f"step-{step:07d}"]


def start_point(cfg: TrainConfig, current: dict[str, Any]) -> StartPoint:
    """Read and check, before any model is loaded, where ``cfg`` starts (see the module docstring)."""
    source = resume_source(cfg)
    step = 0
    if source is not None:
        state = read_state(source)
        check_identity(state, current, source)
        step = int(state["step"])
    conflicts = _conflicts(cfg.run.output_dir, source, step)
    if conflicts and not cfg.run.overwrite:
        names = ", ".join(os.path.basename(c) for c in conflicts)
        if source is None:
            raise TrainingError(
                f"run.output_dir {cfg.run.output_dir!r} holds another run's checkpoints ({names}): continue that run "
                "with --resume, choose another run.output_dir, or pass --run.overwrite true to delete those "
                "checkpoints and start over"
            )
        raise TrainingError(
            f"run.output_dir {cfg.run.output_dir!r} holds checkpoints that are not of the line resumed from {source} "
            f"({names}); a later --resume would take them: pass --run.overwrite true to delete them, or choose "
            "another run.output_dir"
        )
    return StartPoint(source, step, conflicts if cfg.run.overwrite else [])


def remove_replaced(start: StartPoint) -> None:
    """Delete the checkpoints ``run.overwrite`` replaces (main process only)."""
    for folder in start.replaced:
        shutil.rmtree(folder)
    if start.replaced:
        print(f"[train] run.overwrite: removed {len(start.replaced)} checkpoint(s) of the previous run: "
              f"{', '.join(os.path.basename(f) for f in start.replaced)}", file=sys.stderr)
