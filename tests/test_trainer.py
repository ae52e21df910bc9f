"""The trainer on tiny models, on the CPU: it learns, it resumes exactly, it refuses bad input."""
import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from trainer_helpers import make_image_folder, make_prompt_file, metrics, run_stage, stage_command
from comfy_inprocess import REPO


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("pairs")))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return make_prompt_file(str(tmp_path_factory.mktemp("prompts") / "prompts.txt"))


@pytest.fixture(scope="module")
def align_run(images, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("align"))
    run_stage("align", "--data.path", images, "--data.batch_size", "4", "--run.grad_accum", "1",
              "--run.max_steps", "30", "--run.save_every", "0", "--optim.lr", "1e-3", "--run.output_dir", out)
    return out


def test_align_30_steps_lowers_the_diffusion_loss(align_run):
    losses = [m["loss"] for m in metrics(align_run)]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first, (first, last)


def test_align_writes_a_kohya_lora_with_metadata(align_run):
    path = os.path.join(align_run, "lora_weights.safetensors")
    tensors = load_file(path)
    assert all(k.startswith("lora_unet_") for k in tensors)
    ups = [v for k, v in tensors.items() if k.endswith("lora_up.weight")]
    assert ups and max(float(u.abs().max()) for u in ups) > 0  # it trained (up starts at zero)
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["longalign.stage"] == "align" and meta["longalign.steps"] == "30"
    assert meta["longalign.rank"] == "4" and meta["longalign.base_model_hash"] == "tiny"


def test_resume_after_sigkill_matches_an_uninterrupted_run(images, tmp_path):
    common = ["--data.path", images, "--data.batch_size", "4", "--run.grad_accum", "2", "--run.max_steps", "6",
              "--run.save_every", "2", "--optim.lr", "1e-3", "--run.log_with", "none"]
    straight = str(tmp_path / "straight")
    run_stage("align", *common, "--run.output_dir", straight)

    killed = str(tmp_path / "killed")
    proc = subprocess.Popen(stage_command("align", *common, "--run.output_dir", killed), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = os.path.join(killed, "checkpoints", "step-0000002", "trainer_state.json")
    deadline = time.monotonic() + 300
    while not os.path.exists(first) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(killed, "lora_weights.safetensors"))
    run_stage("align", *common, "--run.output_dir", killed, "--resume")

    a = load_file(os.path.join(straight, "lora_weights.safetensors"))
    b = load_file(os.path.join(killed, "lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), atol=1e-3, rtol=1e-3, msg=k)


@pytest.mark.parametrize("case", ["missing_model", "unknown_key", "empty_data", "corrupt_images"])
def test_bad_input_gives_a_clear_error(case, tmp_path, images):
    args = ["--run.output_dir", str(tmp_path / "out"), "--run.max_steps", "1", "--data.batch_size", "2"]
    if case == "missing_model":
        out = run_stage("align", "--model.pretrained", str(tmp_path / "nope"), "--data.path", images, *args,
                        check=False, tiny=False)
        expected = "does not exist"
    elif case == "unknown_key":
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text("optim:\n  learning_rate: 0.1\n")
        out = run_stage("align", "--config", str(cfg), "--data.path", images, *args, check=False)
        expected = "unknown config key 'optim.learning_rate'"
    elif case == "empty_data":
        empty = tmp_path / "empty"
        empty.mkdir()
        out = run_stage("align", "--data.path", str(empty), *args, check=False)
        expected = "holds no usable records"
    else:
        bad = tmp_path / "bad"
        bad.mkdir()
        for i in range(3):
            (bad / f"{i}.png").write_bytes(b"not a png at all")
            (bad / f"{i}.txt").write_text("a caption.")
        out = run_stage("align", "--data.path", str(bad), *args, check=False)
        expected = "missing or unreadable"
    assert out.returncode == 2, out.stderr[-3000:]
    assert expected in out.stderr
    assert "Traceback" not in out.stderr


def test_help_explains_every_option():
    out = subprocess.run([__import__("sys").executable, "-m", "training.reward", "--help"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0
    for option in ("--sampling.grad_steps", "--sampling.w", "--sampling.guidance", "--lora.rank", "--resume",
                   "--optim.max_grad_norm", "--data.path"):
        assert option in out.stdout
