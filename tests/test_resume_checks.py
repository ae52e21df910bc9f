"""What a checkpoint belongs to is checked before any model loads; ``--resume PATH`` picks a checkpoint;
a new run never mixes its checkpoints with another run's. Tiny align runs in-process (a step or two)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from trainer_helpers import make_image_folder, make_prompt_file, resolve_stage, run_stage, train_in_process
from training import trainer as trainer_mod
from training.safe_io import load_tensors
from training.trainer import CHECKPOINTS, LORA_FILE, STATE_FILE, TrainingError, train

ARGS = ["--data.batch_size", "2", "--data.resolution", "32", "--run.grad_accum", "1", "--optim.lr", "1e-3"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("pairs")), n=4, size=32)


@pytest.fixture(scope="module")
def align_two_steps(images, tmp_path_factory):
    """A finished 2-step align run with checkpoints at steps 1 and 2."""
    out = str(tmp_path_factory.mktemp("align"))
    train_in_process("align", *ARGS, "--data.path", images, "--run.output_dir", out, "--run.max_steps", "2",
                     "--run.save_every", "1")
    return out


def _checkpoints(out: str) -> list[str]:
    return sorted(os.listdir(os.path.join(out, CHECKPOINTS)))


def _copy_run(src: str, dest) -> str:
    import shutil

    shutil.copytree(src, dest)
    return str(dest)


def test_checkpoint_records_what_it_belongs_to(align_two_steps):
    with open(os.path.join(align_two_steps, CHECKPOINTS, "step-0000002", STATE_FILE), encoding="utf-8") as f:
        state = json.load(f)
    assert state["step"] == 2
    assert state["run"] == {
        "stage": "align", "objective": None, "sampler": None, "model.family": "sd15", "model.base_hash": "tiny",
        "lora.rank": 4, "lora.alpha": 4.0, "lora.targets": "reference", "model.t5": None, "model.adapter": None,
        "precision": "no"}


def test_reward_resume_on_an_align_folder_is_refused(align_two_steps, tmp_path):
    out = _copy_run(align_two_steps, tmp_path / "run")
    before = _checkpoints(out)
    prompts = make_prompt_file(str(tmp_path / "prompts.txt"))
    proc = run_stage("reward", *ARGS, "--data.path", prompts, "--run.output_dir", out, "--run.max_steps", "3",
                     "--resume", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "belongs to another run" in proc.stderr and "step-0000002" in proc.stderr
    assert "stage: checkpoint 'align', this run 'reward'" in proc.stderr
    assert "objective: checkpoint None, this run 'longalign'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _checkpoints(out) == before


def test_a_changed_rank_is_refused_before_any_model_loads(align_two_steps, tmp_path, monkeypatch):
    out = _copy_run(align_two_steps, tmp_path / "run")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the checkpoint was checked")

    monkeypatch.setattr(trainer_mod, "load_components", no_model)
    cfg = resolve_stage("align", *ARGS, "--data.path", "unused", "--run.output_dir", out, "--run.max_steps", "3",
                        "--lora.rank", "8", "--resume")
    with pytest.raises(TrainingError, match=r"step-0000002 belongs to another run; differing: "
                                            r"lora\.rank: checkpoint 4, this run 8\. "):
        train(cfg, lambda *a: None)


def test_resume_path_continues_from_the_chosen_checkpoint(align_two_steps, images, tmp_path):
    out = _copy_run(align_two_steps, tmp_path / "run")
    first = os.path.join(out, CHECKPOINTS, "step-0000001")
    common = [*ARGS, "--data.path", images, "--run.output_dir", out, "--run.max_steps", "2", "--run.save_every", "1",
              "--run.resume", first]
    with pytest.raises(TrainingError, match=r"holds checkpoints that are not of the line resumed from .*step-0000001 "
                                            r"\(step-0000002\).*--run.overwrite true"):
        train_in_process("align", *common)
    assert _checkpoints(out) == ["step-0000001", "step-0000002"]

    os.remove(os.path.join(out, LORA_FILE))
    train_in_process("align", *common, "--run.overwrite", "true")  # step 2 redone from step 1
    assert _checkpoints(out) == ["step-0000001", "step-0000002"]
    redone = load_tensors(os.path.join(out, LORA_FILE))
    original = load_tensors(os.path.join(align_two_steps, LORA_FILE))
    assert redone.keys() == original.keys()
    for k in redone:
        torch.testing.assert_close(redone[k], original[k], atol=1e-4, rtol=1e-4, msg=k)

    with pytest.raises(TrainingError, match=r"--resume .*nowhere.*not a checkpoint folder"):
        train_in_process("align", *ARGS, "--data.path", images, "--run.output_dir", out, "--run.resume",
                         str(tmp_path / "nowhere"))


def test_a_new_run_into_another_runs_folder_is_refused_unless_overwrite(align_two_steps, images, tmp_path):
    out = _copy_run(align_two_steps, tmp_path / "run")
    with open(os.path.join(out, "notes.txt"), "w", encoding="utf-8") as f:
        f.write("the user's own file")
    config_before = open(os.path.join(out, "config.json"), encoding="utf-8").read()
    common = [*ARGS, "--data.path", images, "--run.output_dir", out, "--run.max_steps", "1", "--run.save_every", "0"]
    with pytest.raises(TrainingError, match=r"holds another run's checkpoints \(step-0000001, step-0000002\).*"
                                            r"--resume.*--run.overwrite true"):
        train_in_process("align", *common)
    assert _checkpoints(out) == ["step-0000001", "step-0000002"]
    assert open(os.path.join(out, "config.json"), encoding="utf-8").read() == config_before  # nothing written

    train_in_process("align", *common, "--run.overwrite", "true")
    assert _checkpoints(out) == ["step-0000001"]  # the new run's own, not the old step 2 kept over it
    with open(os.path.join(out, CHECKPOINTS, "step-0000001", STATE_FILE), encoding="utf-8") as f:
        assert json.load(f)["step"] == 1
    assert open(os.path.join(out, "notes.txt"), encoding="utf-8").read() == "the user's own file"


def test_the_resume_flag_takes_an_optional_checkpoint_path():
    """``--resume`` alone: the latest checkpoint (True); ``--resume PATH``: that folder; absent: no resume."""
    from training import config as config_mod
    from training.cli import DESCRIPTIONS

    parser = config_mod.build_parser("align", DESCRIPTIONS["align"])
    chosen = os.path.join("runs", "a", CHECKPOINTS, "step-0000500")
    assert config_mod.resolve("align", parser.parse_args(["--resume"])).run.resume is True
    assert config_mod.resolve("align", parser.parse_args(["--resume", chosen])).run.resume == chosen
    assert config_mod.resolve("align", parser.parse_args([])).run.resume is False
    assert "--resume [PATH]" in parser.format_help()
