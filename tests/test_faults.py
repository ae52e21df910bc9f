"""Interrupted writers and runs lose nothing: atomic files under SIGKILL, a run killed inside a
checkpoint save resumes to the same weights, a full disk and non-finite losses stop cleanly with
the last good checkpoint kept, a tampered checkpoint or LoRA runs no code.

The trainer runs in-process where it can (accelerate's state is a process singleton: every run
here uses the same settings, CPU and mixed precision "no") and as a subprocess where it must die.
"""
from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import random
import re
import signal
import subprocess
import time

import pytest
import torch

from comfy_inprocess import REPO
from test_safety import RunsCode
from trainer_helpers import SMALL_ARGS, make_image_folder, metrics, stage_command
from training import config as config_mod
from training import trainer as trainer_mod
from training.safe_io import ModelFileError, atomic_open, load_tensors, save_tensors
from training.cli import DESCRIPTIONS
from training.stages import build_align
from training.trainer import CHECKPOINTS, LORA_FILE, STATE_FILE, TrainingError, latest_checkpoint, train

RUN_ARGS = ["--data.batch_size", "2", "--data.resolution", "32", "--run.grad_accum", "1", "--optim.lr", "1e-3",
            "--run.log_with", "none", "--run.device", "cpu", "--run.mixed_precision", "no"]


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# -- atomic writes under SIGKILL ---------------------------------------------------------------

def _versions(folder, n: int = 3):
    """``n`` versions of a large safetensors file and of a text table, with their hashes."""
    tensors = [{"w": torch.full((1_000_000,), float(v)), "b": torch.arange(1000.0) + v} for v in range(n)]
    texts = [f"version,{v}\n" + f"{v}," * 200_000 + "\n" for v in range(n)]
    hashes, text_hashes = set(), set()
    for v in range(n):
        hashes.add(sha256(save_tensors(tensors[v], str(folder / "ref.safetensors"), {"version": v})))
        with atomic_open(str(folder / "ref.csv")) as f:
            f.write(texts[v])
        text_hashes.add(sha256(str(folder / "ref.csv")))
    return tensors, texts, hashes, text_hashes


def test_sigkilled_writers_leave_the_old_or_the_new_file_never_a_partial_one(tmp_path):
    scratch, out = tmp_path / "scratch", tmp_path / "out"
    scratch.mkdir()
    out.mkdir()
    tensors, texts, hashes, text_hashes = _versions(scratch)
    dest, table = str(out / "lora.safetensors"), str(out / "scores.csv")
    save_tensors(tensors[0], dest, {"version": 0})
    with atomic_open(table) as f:
        f.write(texts[0])
    # ours: .<name>.<random>.tmp; safetensors' own writer (inside ours): .tmp<random>
    temp_name = re.compile(r"^\.(lora\.safetensors|scores\.csv)\.[^/]+\.tmp$|^\.tmp\w+$")
    rng = random.Random(0)
    killed_mid_write = changed = 0
    for trial in range(20):
        before = sha256(dest)
        current = int(load_tensors(dest)["b"][0])
        pid = os.fork()
        if pid == 0:  # the writer: rewrites both files with the next versions over and over until killed
            try:
                for i in itertools.count(1):
                    v = (current + i) % len(tensors)
                    save_tensors(tensors[v], dest, {"version": v})
                    with atomic_open(table) as f:
                        f.write(texts[v])
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.02, 0.5))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert sha256(dest) in hashes, f"trial {trial}: {dest} is not a complete version"
        assert sha256(table) in text_hashes, f"trial {trial}: {table} is not a complete version"
        assert load_tensors(dest)["w"].numel() == 1_000_000
        leftovers = sorted(set(os.listdir(out)) - {"lora.safetensors", "scores.csv"})
        assert all(temp_name.match(n) for n in leftovers), leftovers  # hidden temp files only
        killed_mid_write += bool(leftovers)
        changed += sha256(dest) != before
        for name in leftovers:
            os.remove(out / name)
    assert killed_mid_write >= 5 and changed >= 3, (killed_mid_write, changed)  # the kills did land mid-write


# -- the trainer ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("pairs")), n=8, size=32)


def config(images: str, out: str, *args: str):
    """The tiny align config exactly as ``python -m training.align --tiny <SMALL_ARGS> <RUN_ARGS> args``."""
    parser = config_mod.build_parser("align", DESCRIPTIONS["align"])
    argv = ["--tiny", *SMALL_ARGS, *RUN_ARGS, "--data.path", images, "--run.output_dir", out, *args]
    return config_mod.resolve("align", parser.parse_args(argv))


def lora(out: str) -> dict[str, torch.Tensor]:
    return load_tensors(os.path.join(out, LORA_FILE))


def checkpoint_step(folder: str) -> int:
    with open(os.path.join(folder, STATE_FILE), encoding="utf-8") as f:
        return json.load(f)["step"]


@pytest.fixture(scope="module")
def uninterrupted(images, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("straight"))
    train(config(images, out, "--run.max_steps", "4", "--run.save_every", "2"), build_align)
    return lora(out)


DIE_IN_SECOND_SAVE = """
import os, signal, sys
import training.safe_io as safe_io
real, calls = safe_io.save_file, []
def save_file(tensors, path, metadata=None):
    real(tensors, path, metadata=metadata)
    calls.append(path)
    if len(calls) == 2:  # the 2nd checkpoint's trainable.safetensors: half of it on disk, then SIGKILL
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
safe_io.save_file = save_file
from training.cli import main
sys.exit(main("align", sys.argv[1:]))
"""


def test_sigkill_inside_a_checkpoint_save_then_resume_gives_the_uninterrupted_weights(images, tmp_path, uninterrupted):
    out = str(tmp_path / "killed")
    args = [*RUN_ARGS, "--data.path", images, "--run.output_dir", out, "--run.max_steps", "4", "--run.save_every", "2"]
    cmd = stage_command("align", *args)
    assert cmd[1:3] == ["-m", "training.align"]
    cmd[1:3] = ["-c", DIE_IN_SECOND_SAVE]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    root = os.path.join(out, CHECKPOINTS)
    assert sorted(os.listdir(root)) == ["step-0000002", "step-0000004.tmp"]  # the killed save never committed
    assert latest_checkpoint(out) == os.path.join(root, "step-0000002")
    assert not os.path.exists(os.path.join(out, LORA_FILE))

    train(config(images, out, "--run.max_steps", "4", "--run.save_every", "2", "--resume"), build_align)
    assert sorted(os.listdir(root)) == ["step-0000002", "step-0000004"]
    resumed = lora(out)
    assert resumed.keys() == uninterrupted.keys()
    for k in resumed:
        torch.testing.assert_close(resumed[k], uninterrupted[k], atol=1e-4, rtol=1e-4, msg=k)
    assert any(float(v.abs().max()) > 0 for k, v in resumed.items() if k.endswith("lora_up.weight"))


def _disk_full_in_our_writer(monkeypatch):
    calls = []

    def save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return save_tensors(tensors, path, metadata)

    monkeypatch.setattr(trainer_mod, "save_tensors", save)


def _disk_full_in_accelerate(monkeypatch):
    import accelerate.checkpointing

    real, calls = accelerate.checkpointing.save, []

    def save(obj, path, *args, **kwargs):  # torch.save reports ENOSPC as a RuntimeError
        calls.append(path)
        if str(path).endswith("optimizer.bin") and len([c for c in calls if str(c).endswith("optimizer.bin")]) == 2:
            raise RuntimeError(f"[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file "
                               f"data/0: file write failed ({path})")
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(accelerate.checkpointing, "save", save)


@pytest.mark.parametrize("fail", [_disk_full_in_our_writer, _disk_full_in_accelerate])
def test_disk_full_at_the_second_checkpoint_stops_with_a_clear_error_and_keeps_the_first(
        images, tmp_path, monkeypatch, fail):
    out = str(tmp_path / "full")
    fail(monkeypatch)
    with pytest.raises(TrainingError, match=r"could not write the checkpoint .*step-0000002 at step 2 \(disk full\?\)"
                                            r".*the last complete checkpoint .*step-0000001 is kept") as e:
        train(config(images, out, "--run.max_steps", "3", "--run.save_every", "1"), build_align)
    assert "step-0000001" in str(e.value)
    root = os.path.join(out, CHECKPOINTS)
    assert os.listdir(root) == ["step-0000001"]  # the failed save left no temporary folder
    kept = os.path.join(root, "step-0000001")
    assert checkpoint_step(kept) == 1
    assert load_tensors(os.path.join(kept, "trainable.safetensors"), "checkpoint")
    assert not os.path.exists(os.path.join(out, LORA_FILE))
    monkeypatch.undo()
    if fail is _disk_full_in_our_writer:  # space is back: --resume finishes the run from the kept checkpoint
        train(config(images, out, "--run.max_steps", "3", "--run.save_every", "1", "--resume"), build_align)
        assert [m["step"] for m in metrics(out)] == [1, 2, 2, 3]  # step 2 redone after the failed save
        assert sorted(os.listdir(root)) == ["step-0000002", "step-0000003"]


def nonfinite_at(bad: dict[int, float]):
    """A builder whose objective returns ``loss * value`` (NaN, inf) on the calls numbered in ``bad``."""
    def build(cfg, *args):
        run = build_align(cfg, *args)
        real, calls = run.objective.loss, itertools.count(1)

        def loss(batch, generator):
            value, logs = real(batch, generator)
            n = next(calls)
            return (value * bad[n] if n in bad else value), logs

        run.objective.loss = loss
        return run
    return build


def test_nonfinite_losses_are_skipped_and_counted(images, tmp_path):
    out = str(tmp_path / "nan")
    train(config(images, out, "--run.max_steps", "3", "--run.save_every", "0"),
          nonfinite_at({2: float("nan"), 3: float("inf")}))
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["nonfinite_losses"] for r in rows] == [0, 2, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    weights = lora(out)
    assert all(bool(torch.isfinite(v).all()) for v in weights.values())  # no NaN step reached the weights


def test_nonfinite_losses_in_a_row_stop_the_run_keeping_the_last_checkpoint(images, tmp_path):
    out = str(tmp_path / "nan_stop")
    n = trainer_mod.MAX_NONFINITE_IN_A_ROW
    with pytest.raises(TrainingError, match=rf"{n} non-finite \(NaN/inf\) losses in a row at step 2: stopping .*"
                                            r"last complete checkpoint is .*step-0000002"):
        train(config(images, out, "--run.max_steps", "6", "--run.save_every", "2"),
              nonfinite_at({k: float("nan") for k in range(3, 3 + n)}))
    kept = latest_checkpoint(out)
    assert checkpoint_step(kept) == 2
    state = load_tensors(os.path.join(kept, "trainable.safetensors"), "checkpoint")
    assert all(bool(torch.isfinite(v).all()) for v in state.values())
    assert not os.path.exists(os.path.join(out, LORA_FILE))


# -- hostile files reaching the trainer: an init LoRA and a tampered checkpoint ------------------

def test_trainer_refuses_code_in_init_lora_and_in_a_checkpoint(images, tmp_path):
    sentinel = str(tmp_path / "PWNED")
    evil = str(tmp_path / "init.pt")
    torch.save([torch.zeros(2), RunsCode(sentinel)], evil)
    with pytest.raises(ModelFileError, match=r"LongSD LoRA list: .*init\.pt' could not be loaded as a weights-only"):
        train(config(images, str(tmp_path / "init"), "--model.init_lora", evil, "--run.max_steps", "1"), build_align)

    out = str(tmp_path / "tampered")
    train(config(images, out, "--run.max_steps", "1", "--run.save_every", "0"), build_align)
    ckpt = latest_checkpoint(out)
    torch.save({"state": {}, "param_groups": RunsCode(sentinel)}, os.path.join(ckpt, "optimizer.bin"))
    with pytest.raises(TrainingError, match=r"--resume: checkpoint .*step-0000001 cannot be loaded"):
        train(config(images, out, "--run.max_steps", "2", "--resume"), build_align)
    assert not os.path.exists(sentinel)
