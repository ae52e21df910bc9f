"""SIGTERM and Ctrl-C stop a run cleanly: the step in progress finishes, a checkpoint is written and
named with the command that continues it, the process exits 0, and the resumed run ends on the
uninterrupted run's weights. A signal while the models load stops there; a second signal exits at
once; on two processes both stop together."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from comfy_inprocess import REPO
from trainer_helpers import (accelerate_launch, make_image_folder, metrics, run_stage, stage_command,
                             train_in_process)
from training.safe_io import load_tensors
from training.trainer import CHECKPOINTS, LORA_FILE

ARGS = ["--data.batch_size", "2", "--data.resolution", "32", "--run.grad_accum", "1", "--optim.lr", "1e-3",
        "--run.max_steps", "5", "--run.save_every", "0", "--run.log_with", "none", "--run.device", "cpu",
        "--run.mixed_precision", "no"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("pairs")), n=8, size=32)


@pytest.fixture(scope="module")
def straight(images, tmp_path_factory):
    """The uninterrupted run's LoRA."""
    out = str(tmp_path_factory.mktemp("straight"))
    return load_tensors(train_in_process("align", *ARGS, "--data.path", images, "--run.output_dir", out))


def _wait_for_progress(proc: subprocess.Popen, out: str, rows: int = 1, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if os.path.isfile(os.path.join(out, "metrics.jsonl")) and len(metrics(out)) >= rows:
            return
        time.sleep(0.05)
    raise AssertionError(f"no progress to interrupt (exit status {proc.poll()})")


@pytest.mark.parametrize("sig, resume", [(signal.SIGTERM, True), (signal.SIGINT, False)])  # one handler: resumed once
def test_a_signal_mid_run_checkpoints_exits_0_and_resume_equals_the_uninterrupted_run(images, straight, tmp_path, sig,
                                                                                      resume):
    out = str(tmp_path / "stopped")
    args = [*ARGS, "--data.path", images, "--run.output_dir", out]
    with open(tmp_path / "stderr.txt", "w+", encoding="utf-8") as err:
        proc = subprocess.Popen(stage_command("align", *args), cwd=REPO, stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        _wait_for_progress(proc, out)
        proc.send_signal(sig)
        assert proc.wait(timeout=300) == 0
        err.seek(0)
        stderr = err.read()
    assert "Traceback" not in stderr
    stopped_at = metrics(out)[-1]["step"]
    assert 1 <= stopped_at < 5, "the run ended before the signal"
    ckpt = os.path.join(out, CHECKPOINTS, f"step-{stopped_at:07d}")
    assert sorted(os.listdir(os.path.join(out, CHECKPOINTS))) == [os.path.basename(ckpt)]
    assert f"stopped ({sig.name}) after step {stopped_at} of 5; checkpoint: {ckpt}" in stderr
    command = stderr.split("[train] to continue: ")[1].splitlines()[0]
    assert command.startswith("python -m training.align --tiny ") and command.endswith(" --resume")
    assert not os.path.exists(os.path.join(out, LORA_FILE))  # a LoRA file means a finished run
    if not resume:
        return
    resumed = run_stage("align", *args, "--resume")
    assert f"resumed from {ckpt} at step {stopped_at}" in resumed.stderr
    a, b = straight, load_tensors(os.path.join(out, LORA_FILE))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4, msg=k)


def test_a_signal_while_the_models_load_stops_at_once(images, tmp_path, capsys):
    """Before the first step a single process has nothing new to save: the signal ends setup there."""
    def build(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("setup went on after the signal")

    before = signal.getsignal(signal.SIGTERM)
    out = str(tmp_path / "setup")
    assert train_in_process("align", *ARGS, "--data.path", images, "--run.output_dir", out, build_run=build) == out
    assert not os.path.exists(os.path.join(out, CHECKPOINTS))
    err = capsys.readouterr().err
    assert "stopped (SIGTERM) before the first step: nothing new to save; latest checkpoint: (none)" in err
    assert signal.getsignal(signal.SIGTERM) is before  # the run's handlers are gone


SECOND_SIGNAL = """
import os, signal, time
from training.interrupts import StopRequest
with StopRequest() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.received == "SIGTERM"
    print("asked to stop", flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)
    print("still running", flush=True)
"""


def test_a_second_signal_exits_at_once():
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", SECOND_SIGNAL], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr[-2000:]
    assert proc.stdout.strip() == "asked to stop"
    assert "second signal (SIGINT): exiting now" in proc.stderr
    assert time.monotonic() - started < 25


def test_handlers_are_restored_after_the_run():
    from training.interrupts import StopRequest

    before = signal.getsignal(signal.SIGTERM)
    with StopRequest():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


AGREE = """
import os, signal
from accelerate import Accelerator
from training.interrupts import StopRequest
acc = Accelerator(cpu=True)
with StopRequest() as stop:
    first = stop.agreed(acc)
    if acc.process_index == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    second = stop.agreed(acc)
print(f"rank {acc.process_index}: {first} {second}", flush=True)
"""


def test_on_two_processes_a_signal_to_one_stops_both(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    proc = subprocess.run([*accelerate_launch(), str(script)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the two processes share stdout: their lines may interleave, so each report is matched where it stands
    assert sorted(re.findall(r"rank (\d): (True|False) (True|False)", proc.stdout)) == [("0", "False", "True"),
                                                                          ("1", "False", "True")]
