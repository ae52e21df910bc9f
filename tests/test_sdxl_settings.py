"""SDXL settings (issue #17 items 3 and 6): with ``model.family auto`` an SDXL ``model.pretrained`` (a
diffusers folder or a single .safetensors) resolves ``--objective comat`` to CoMat-SDXL's defaults before
torch is imported; an explicit option still wins; a pickled .ckpt keeps SD1.5's with a warning. The
24 GiB example configs resolve with their memory settings."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from comfy_inprocess import REPO
from tiny_models import SD15_KEYS, SDXL_KEYS, ldm_key_checkpoint
from training.config import FAMILY_OBJECTIVE_DEFAULTS, OBJECTIVE_DEFAULTS, build_parser, resolve

HEAVY = ("torch", "diffusers", "transformers", "accelerate", "numpy", "PIL", "safetensors")
CONFIGS = os.path.join(REPO, "training", "configs")
EXAMPLES = os.path.join(CONFIGS, "examples")
COMAT_SDXL = {"optim.lr": 2e-5, "data.batch_size": 6, "comat.w_adv": 0.5, "data.resolution": 512,
              "comat.disc_lr": 5e-5, "lora.rank": 128, "sampling.steps": 50, "sampling.grad_steps": 5}

# What the resolve script prints: the keys above, read off the resolved config.
RESOLVE = """
import json, sys
from training.config import build_parser, resolve
cfg = resolve("reward", build_parser("reward", "").parse_args(sys.argv[1:]))
keys = {keys!r}
print(json.dumps({{k: getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k in keys}}))
"""


def _sdxl_folder(tmp_path) -> str:
    """An SDXL diffusers folder of configs only (detection reads no weight): the shipped configs."""
    folder = str(tmp_path / "sdxl_folder")
    shutil.copytree(os.path.join(CONFIGS, "sdxl"), folder)
    return folder


def _resolve_without_torch(*argv: str) -> dict:
    """Resolve in a fresh ``python -X importtime`` process; assert nothing heavy was imported."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", RESOLVE.format(keys=sorted(COMAT_SDXL)), *argv],
                         cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr[-2000:]
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in out.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "json" in imported  # the report is there, so an empty intersection means something
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("model", ["folder", "safetensors"])
def test_auto_family_sdxl_model_gets_comat_sdxl_defaults_before_torch_is_imported(tmp_path, model):
    path = _sdxl_folder(tmp_path) if model == "folder" else ldm_key_checkpoint(tmp_path / "xl.safetensors", SDXL_KEYS)
    resolved = _resolve_without_torch("--objective", "comat", "--model.pretrained", path)
    assert resolved == COMAT_SDXL
    assert FAMILY_OBJECTIVE_DEFAULTS[("sdxl", "comat")]["optim.lr"] != OBJECTIVE_DEFAULTS["comat"]["optim.lr"]
    explicit = _resolve_without_torch("--objective", "comat", "--model.pretrained", path, "--optim.lr", "3e-5",
                                      "--data.batch_size", "2")
    assert explicit == {**COMAT_SDXL, "optim.lr": 3e-5, "data.batch_size": 2}


def test_auto_family_from_a_config_file_too(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"stage: reward\nmodel:\n  pretrained: {ldm_key_checkpoint(tmp_path / 'xl.safetensors', SDXL_KEYS)}\n"
                      "sampling:\n  objective: comat\ndata:\n  resolution: 768\n")
    cfg = resolve("reward", build_parser("reward", "").parse_args(["--config", str(config)]))
    assert (cfg.optim.lr, cfg.data.batch_size, cfg.comat.w_adv, cfg.data.resolution) == (2e-5, 6, 0.5, 768)


def test_sd15_and_unreadable_models_keep_the_sd15_defaults(tmp_path):
    sd15 = ldm_key_checkpoint(tmp_path / "sd15.safetensors", SD15_KEYS)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x01")
    for path in (sd15, str(broken), str(tmp_path / "missing.safetensors")):
        cfg = resolve("reward", build_parser("reward", "").parse_args(["--objective", "comat", "--model.pretrained",
                                                                       path]))
        assert (cfg.optim.lr, cfg.data.batch_size, cfg.comat.w_adv) == (5e-5, 4, 1.0), path


def test_pickled_checkpoint_keeps_sd15_defaults_with_a_warning(tmp_path):
    ckpt = ldm_key_checkpoint(tmp_path / "xl.ckpt", SDXL_KEYS, ckpt=True)
    with pytest.warns(UserWarning, match=r"xl\.ckpt'.*known only once it loads.*--model\.family sdxl"):
        cfg = resolve("reward", build_parser("reward", "").parse_args(["--objective", "comat", "--model.pretrained",
                                                                       ckpt]))
    assert (cfg.optim.lr, cfg.data.batch_size) == (5e-5, 4)
    explicit = resolve("reward", build_parser("reward", "").parse_args(
        ["--objective", "comat", "--model.pretrained", ckpt, "--model.family", "sdxl"]))
    assert (explicit.optim.lr, explicit.data.batch_size) == (2e-5, 6)


@pytest.mark.parametrize("name, objective", [("sdxl_reward_24gb", "longalign"), ("sdxl_comat_24gb", "comat")])
def test_24gb_example_configs_resolve_with_their_memory_settings(name, objective):
    path = os.path.join(EXAMPLES, f"{name}.yaml")
    cfg = resolve("reward", build_parser("reward", "").parse_args(["--config", path]))
    assert (cfg.stage, cfg.sampling.objective, cfg.model.family) == ("reward", objective, "sdxl")
    assert (cfg.data.resolution, cfg.data.batch_size) == (512, 1)
    assert cfg.sampling.checkpoint_calls and cfg.run.gradient_checkpointing
    assert (cfg.sampling.decode_chunk, cfg.run.mixed_precision, cfg.run.mode) == (1, "bf16", "fast")
    with open(path, encoding="utf-8") as f:
        header = f.read().split("\nstage:")[0]
    assert "not measured" in header and "GiB" in header
