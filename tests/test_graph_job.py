"""Train from the graph (training/graph_job.py, job_request.py, job_lock.py): a job runs the real
trainer as a child process on the tiny checkpoint ComfyUI also loads, reports every step and
validation image, publishes the LoRA into the LoRA folder, stops cleanly on cancel and continues to
the uninterrupted run's LoRA on resume; bad input is refused by name before anything is written."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from trainer_helpers import make_image_folder
from training import config as config_mod
from training.graph_job import CONFIG_FILE, LORA_FILE, JobCancelled, JobFailed, Progress, Sample, run_job
from training.job_lock import LOCK_FILE, RunLock
from training.job_request import (PROMPTS_FILE, JobInputError, JobRequest, check_request, settings, sidecar_config_dir,
                                  stage_defaults, write_config)
from training.safe_io import load_tensors

PROMPTS = ["A red fox sits in the snow. The sky is grey; a pine forest stands behind it.",
           "A bowl of ramen on a wooden table! Steam rises from the broth."]
FAST = dict(steps=3, rank=4, lr=1e-3, resolution=32, batch_size=1, sampling_steps=2, warmup_steps=0,
            validate_every=2, device="cpu")
"""Small enough for the CPU: 32 px, one image per step, 2 DDIM steps (both with gradient)."""


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    from tiny_models import build_tiny_clipmodel
    from training.reward_models import load_reward_model

    folder = str(tmp_path_factory.mktemp("denscore"))
    build_tiny_clipmodel(folder)
    return load_reward_model(folder, "denscore").source


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """A run root and a LoRA folder shared by the module's runs."""
    root = tmp_path_factory.mktemp("jobs")
    return str(root / "runs"), str(root / "loras")


def request(checkpoint: str, jobs: tuple[str, str], name: str, **kw) -> JobRequest:
    run_root, loras = jobs
    base = dict(checkpoint=checkpoint, stage="reward", name=name, run_root=run_root, loras_dir=loras,
                prompts=list(PROMPTS), **FAST)
    return JobRequest(**{**base, **kw})


class Recorder:
    """``on_event`` and ``should_cancel`` of a job: records events; cancels after ``cancel_after`` steps."""

    def __init__(self, cancel_after: int | None = None):
        self.events: list = []
        self.cancel_after = cancel_after
        self.asked = 0

    def __call__(self, event) -> None:
        self.events.append(event)

    def should_cancel(self) -> bool:
        done = [e for e in self.events if isinstance(e, Progress)]
        cancel = self.cancel_after is not None and len(done) >= self.cancel_after
        self.asked += cancel
        return cancel


@pytest.fixture(scope="module")
def straight(trainable_sd15_checkpoint, reward_model, jobs):
    """An uninterrupted reward job of 3 steps: (request, result, recorder)."""
    req = request(trainable_sd15_checkpoint, jobs, "straight", reward_model=reward_model)
    recorder = Recorder()
    return req, run_job(req, recorder, recorder.should_cancel, poll_s=0.05), recorder


# -- the checkpoint ComfyUI and the trainer share ------------------------------------------------------


def test_the_test_checkpoint_loads_in_comfyui_as_sd15_and_in_the_trainer_with_its_sidecar(trainable_sd15_checkpoint):
    import comfy.sd

    from training.config import ModelConfig
    from training.models import load_components
    from training.safe_io import ModelFileError

    model, clip, vae = comfy.sd.load_checkpoint_guess_config(trainable_sd15_checkpoint, output_vae=True,
                                                             output_clip=True)[:3]
    assert type(model.model.model_config).__name__ == "SD15"
    sidecar = sidecar_config_dir(trainable_sd15_checkpoint)
    components = load_components(ModelConfig(pretrained=trainable_sd15_checkpoint, config=sidecar))
    latent = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = (components.vae.float().decode(latent).sample.clamp(-1, 1) + 1) / 2
    torch.testing.assert_close(vae.decode(latent).float(), ours.permute(0, 2, 3, 1), atol=2e-3, rtol=0)
    with pytest.raises(ModelFileError, match="describe .* parameters but the file holds"):
        load_components(ModelConfig(pretrained=trainable_sd15_checkpoint))  # SD1.5's shipped configs: refused


# -- a real run ---------------------------------------------------------------------------------------


def test_a_reward_job_reports_every_step_and_a_sample_and_publishes_the_lora(straight):
    req, result, recorder = straight
    progress = [e for e in recorder.events if isinstance(e, Progress)]
    samples = [e for e in recorder.events if isinstance(e, Sample)]
    assert [(p.step, p.total) for p in progress] == [(1, 3), (2, 3), (3, 3)]
    assert all({"loss", "reward", "lr"} <= p.scalars.keys() for p in progress)
    assert [s.step for s in samples] == [2] and os.path.isfile(samples[0].path)
    assert recorder.events.index(samples[0]) == recorder.events.index(progress[1]) + 1  # after its step
    assert result.lora_path == os.path.join(req.loras_dir, "straight.safetensors") and result.steps == 3
    assert [row["step"] for row in result.history] == [1, 2, 3]
    published, trained = load_tensors(result.lora_path), load_tensors(os.path.join(result.run_dir, LORA_FILE))
    assert published.keys() == trained.keys() and any(k.startswith("lora_unet_") for k in published)
    assert all(torch.equal(published[k], trained[k]) for k in published)
    assert os.listdir(req.loras_dir) == ["straight.safetensors"]  # no temporary file left behind
    with open(os.path.join(result.run_dir, PROMPTS_FILE), encoding="utf-8") as f:
        assert f.read().splitlines() == PROMPTS
    with open(os.path.join(result.run_dir, "config.json"), encoding="utf-8") as f:
        ran = json.load(f)  # what the trainer resolved from the generated config
    assert (ran["run"]["max_steps"], ran["lora"]["rank"], ran["data"]["resolution"]) == (3, 4, 32)
    assert ran["model"]["config"] == sidecar_config_dir(req.checkpoint)


def test_cancel_checkpoints_and_resume_ends_on_the_uninterrupted_lora(straight, trainable_sd15_checkpoint,
                                                                         reward_model, jobs):
    req = request(trainable_sd15_checkpoint, jobs, "cancelled", reward_model=reward_model)
    recorder = Recorder(cancel_after=1)
    with pytest.raises(JobCancelled, match="resume") as stopped:
        run_job(req, recorder, recorder.should_cancel, poll_s=0.05)
    assert stopped.value.checkpoint and os.path.isfile(os.path.join(stopped.value.checkpoint, "trainer_state.json"))
    assert 1 <= stopped.value.step < 3
    assert not os.path.exists(req.lora_path)
    with pytest.raises(JobInputError, match="resume") as refused:  # the run exists: a new job must say what to do
        check_request(req)
    assert refused.value.input == "name"
    resumed = Recorder()
    req.resume = True
    result = run_job(req, resumed, resumed.should_cancel, poll_s=0.05)
    assert [e.step for e in resumed.events if isinstance(e, Progress)] == list(range(stopped.value.step + 1, 4))
    a, b = load_tensors(straight[1].lora_path), load_tensors(result.lora_path)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4, msg=k)


def test_a_comat_job_trains_the_attention_lora_with_a_blip_captioner(trainable_sd15_checkpoint, jobs, tmp_path):
    from test_comat import make_tiny_blip

    make_tiny_blip(str(tmp_path / "blip"))
    req = request(trainable_sd15_checkpoint, jobs, "comat", stage="comat", captioner=str(tmp_path / "blip"), steps=1,
                  validate_every=1)
    recorder = Recorder()
    result = run_job(req, recorder, recorder.should_cancel, poll_s=0.05)
    progress = [e for e in recorder.events if isinstance(e, Progress)]
    assert [p.step for p in progress] == [1] and {"loss", "concept", "g_adv", "token"} <= progress[0].scalars.keys()
    assert [e.step for e in recorder.events if isinstance(e, Sample)] == [1]
    lora = load_tensors(result.lora_path)
    assert lora and all("_attn" in k and "_to_" in k for k in lora)  # CoMat's LoRA: to_q/k/v/out of every attention


def test_a_failing_trainer_raises_job_failed_with_its_error_and_the_log_tail(trainable_sd15_checkpoint, reward_model,
                                                                              jobs, tmp_path):
    """A checkpoint whose sidecar configs do not match its weights: the trainer refuses it and exits 2."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    link = folder / "broken.safetensors"
    os.symlink(trainable_sd15_checkpoint, link)
    shutil.copytree(os.path.join(os.path.dirname(config_mod.__file__), "configs", "sd15"), sidecar_config_dir(str(link)))
    req = request(str(link), jobs, "broken", reward_model=reward_model)
    with pytest.raises(JobFailed) as failed:
        run_job(req, Recorder(), lambda: False, poll_s=0.05)
    message = str(failed.value)
    assert failed.value.returncode == 2
    assert message.startswith("training failed: model.pretrained") and "parameters but the file holds" in message
    assert f"--- last lines of {failed.value.log_path} ---" in message
    assert not os.path.exists(req.lora_path)


# -- refusals: each names its input and writes nothing --------------------------------------------------


def _refused(req: JobRequest, input_name: str, match: str) -> None:
    before = os.path.exists(req.run_dir)
    with pytest.raises(JobInputError, match=match) as refused:
        check_request(req)
    assert refused.value.input == input_name
    assert str(refused.value).startswith(f"{input_name}: ")
    assert os.path.exists(req.run_dir) == before


@pytest.mark.parametrize("change, input_name, match", [
    (dict(checkpoint="/nowhere/model.safetensors"), "checkpoint", "does not exist"),
    (dict(prompts=[]), "prompts", "no prompts"),
    (dict(prompts=["   "]), "prompts", "no prompts"),
    (dict(prompts=["two\nlines"]), "prompts", "one line"),
    (dict(name="sub/dir"), "name", "path separators"),
    (dict(name="..\\up"), "name", "path separators"),
    (dict(name=".hidden"), "name", "plain file name"),
    (dict(name=""), "name", "empty"),
    (dict(reward_model=None), "reward_model", "needs a preference model"),
    (dict(stage="align"), "image_folder", "not a folder"),
    (dict(stage="comat"), "captioner", "BLIP captioner"),
    (dict(stage="lcm"), "stage", "not one of"),
    (dict(steps=-1), "steps", ">= 0"),
    (dict(lr=float("nan")), "lr", ">= 0"),
    (dict(resolution=33), "resolution", "multiple of 8"),
    (dict(resume=True, overwrite=True), "overwrite", "choose one"),
])
def test_bad_input_is_refused_by_name(trainable_sd15_checkpoint, reward_model, tmp_path, change, input_name, match):
    req = request(trainable_sd15_checkpoint, (str(tmp_path / "runs"), str(tmp_path / "loras")), "job",
                  reward_model=reward_model)
    for key, value in change.items():
        setattr(req, key, value)
    _refused(req, input_name, match)


def test_an_image_folder_without_captions_is_refused(trainable_sd15_checkpoint, tmp_path):
    folder = make_image_folder(str(tmp_path / "images"), n=2, size=32)
    for name in os.listdir(folder):
        if name.endswith(".txt"):
            os.remove(os.path.join(folder, name))
    req = request(trainable_sd15_checkpoint, (str(tmp_path / "runs"), str(tmp_path / "loras")), "job", stage="align",
                  image_folder=folder)
    _refused(req, "image_folder", "no captions")


def test_an_existing_lora_is_kept_unless_resume_or_overwrite(trainable_sd15_checkpoint, reward_model, tmp_path):
    loras = tmp_path / "loras"
    loras.mkdir()
    (loras / "mine.safetensors").write_bytes(b"the user's file")
    req = request(trainable_sd15_checkpoint, (str(tmp_path / "runs"), str(loras)), "mine", reward_model=reward_model)
    _refused(req, "name", "already exists")
    req.resume = True  # nothing of ours to continue: the file is still someone else's
    _refused(req, "name", "no run named 'mine' to continue")
    req.resume, req.overwrite = False, True
    check_request(req)
    assert (loras / "mine.safetensors").read_bytes() == b"the user's file"


def _fake_run(req: JobRequest, inputs: dict) -> None:
    """A run folder as a job leaves it: a complete checkpoint and the recorded inputs."""
    step = os.path.join(req.run_dir, "checkpoints", "step-0000001")
    os.makedirs(step)
    with open(os.path.join(step, "trainer_state.json"), "w", encoding="utf-8") as f:
        json.dump({"step": 1, "stage": "reward"}, f)
    with open(os.path.join(req.run_dir, "job.json"), "w", encoding="utf-8") as f:
        json.dump({"inputs": inputs}, f)


@pytest.mark.parametrize("change, input_name", [(dict(rank=8), "rank"), (dict(prompts=["another prompt"]), "prompts"),
                                                (dict(seed=3), "seed")])
def test_a_resume_with_other_inputs_is_refused_naming_the_input(trainable_sd15_checkpoint, reward_model, tmp_path,
                                                                 change, input_name):
    from training.job_request import recorded_inputs

    req = request(trainable_sd15_checkpoint, (str(tmp_path / "runs"), str(tmp_path / "loras")), "run",
                  reward_model=reward_model, resume=True)
    _fake_run(req, recorded_inputs(req))
    check_request(req)
    req.steps = 10  # a longer run continues
    check_request(req)
    for key, value in change.items():
        setattr(req, key, value)
    _refused(req, input_name, f"resume: the run 'run' was trained with {input_name} = ")


def test_a_second_live_job_on_the_same_name_is_refused_and_a_stale_lock_is_taken_over(
        trainable_sd15_checkpoint, reward_model, tmp_path):
    req = request(trainable_sd15_checkpoint, (str(tmp_path / "runs"), str(tmp_path / "loras")), "busy",
                  reward_model=reward_model)
    os.makedirs(req.run_dir)
    with open(os.path.join(req.run_dir, LOCK_FILE), "w", encoding="utf-8") as f:
        f.write("job pid 999999999, trainer pid 999999998")  # left by processes that died: nobody holds it
    check_request(req)
    lock = RunLock(req.run_dir).acquire()
    try:
        _refused(req, "name", "already running .*job pid")
        with pytest.raises(JobInputError, match="already running") as refused:
            run_job(req, Recorder(), lambda: False)
        assert refused.value.input == "name"
        assert not os.path.exists(os.path.join(req.run_dir, CONFIG_FILE))
    finally:
        lock.release()
    check_request(req)


# -- the generated config ---------------------------------------------------------------------------------


def test_the_config_is_written_atomically(tmp_path):
    path = str(tmp_path / CONFIG_FILE)
    write_config(path, {"run.max_steps": 3})
    with pytest.raises(TypeError):
        write_config(path, {"run.max_steps": 4, "broken": object()})  # fails half-way through writing
    assert config_mod.read_config_file(path) == {"run.max_steps": 3}
    assert os.listdir(tmp_path) == [CONFIG_FILE]


@pytest.mark.parametrize("stage", ["reward", "align", "comat"])
def test_each_stage_gets_the_papers_settings_and_its_inputs(trainable_sd15_checkpoint, reward_model, tmp_path, stage):
    """The generated config, read back as the child reads it: the request's numbers where set, the
    stage's paper settings (training/config.py) elsewhere."""
    from training.cli import DESCRIPTIONS

    images = make_image_folder(str(tmp_path / "images"), n=3, size=32)
    captioner = tmp_path / "blip"
    captioner.mkdir()
    (captioner / "config.json").write_text("{}")
    req = request(trainable_sd15_checkpoint, (str(tmp_path / "runs"), str(tmp_path / "loras")), "s", stage=stage,
                  reward_model=reward_model, image_folder=images, captioner=str(captioner), rank=0, lr=0.0,
                  batch_size=0, sampling_steps=0, warmup_steps=None, steps=0, validate_every=0)
    check_request(req)
    values = settings(req)
    path = write_config(str(tmp_path / CONFIG_FILE), values)
    module = values["stage"]
    cfg = config_mod.resolve(module, config_mod.build_parser(module, DESCRIPTIONS[module]).parse_args(["--config", path]))
    defaults = stage_defaults(stage)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.optim.lr) == (defaults["rank"], defaults["rank"], defaults["lr"])
    assert cfg.optim.warmup_steps == min(defaults["warmup_steps"], cfg.run.max_steps // 10)  # at most a tenth
    assert cfg.data.batch_size == defaults["batch_size"]
    if stage == "comat":
        assert cfg.sampling.objective == "comat" and cfg.comat.captioner == str(captioner)
        assert cfg.run.max_steps == defaults["steps"] == config_mod.OBJECTIVE_DEFAULTS["comat"]["run.max_steps"]
        assert cfg.lora.rank == config_mod.OBJECTIVE_DEFAULTS["comat"]["lora.rank"]
    elif stage == "reward":
        assert (cfg.model.reward_model, cfg.model.reward_kind) == (reward_model.path, "denscore")
        assert cfg.run.max_steps == 1  # paper: one epoch; 2 prompts in batches of 8
    else:
        assert cfg.data.path == images and cfg.run.validation_prompts == PROMPTS
        assert cfg.run.max_steps == 2  # paper: two epochs; 3 images in batches of 16, accumulation 2
    assert cfg.run.validate_every == max(1, cfg.run.max_steps // 4) and cfg.run.log_every == 1
    assert cfg.model.config == sidecar_config_dir(trainable_sd15_checkpoint)


def test_a_loaded_reward_model_records_its_source(tmp_path):
    from tiny_models import build_tiny_open_clip
    from training.reward_models import RewardSource, load_reward_model

    _, files = build_tiny_open_clip(str(tmp_path))
    model = load_reward_model(files["safetensors"], "clip", architecture=files["config"])
    assert model.source == RewardSource(os.path.abspath(files["safetensors"]), "clip", os.path.abspath(files["config"]))
    assert load_reward_model(files["hub"], "hpsv2").source == RewardSource(files["hub"], "hpsv2", None)


# -- the job's handling of a child that crashes or will not stop (stand-in children, seconds) -------------


def _stand_in(monkeypatch, code: str) -> None:
    """Run ``python -c code`` as the job's child instead of the trainer."""
    import sys

    from training import graph_job

    monkeypatch.setattr(graph_job, "child_command", lambda req: [sys.executable, "-c", code])


def test_a_crashing_child_raises_job_failed_with_its_traceback(trainable_sd15_checkpoint, reward_model, tmp_path,
                                                               monkeypatch):
    _stand_in(monkeypatch, "import os\nprint('loading', os.environ['LONGALIGN_PARENT_PID'] == str(os.getppid()), "
                           "flush=True)\nraise RuntimeError('out of memory in the UNet')")
    req = request(trainable_sd15_checkpoint, (str(tmp_path / "runs"), str(tmp_path / "loras")), "crash",
                  reward_model=reward_model)
    with pytest.raises(JobFailed) as failed:
        run_job(req, Recorder(), lambda: False, poll_s=0.05)
    assert failed.value.returncode == 1
    assert str(failed.value).startswith("training failed: RuntimeError: out of memory in the UNet\n--- last lines of ")
    assert "loading True\nTraceback (most recent call last):" in str(failed.value)  # it knows whom to watch
    assert not os.path.exists(req.loras_dir) or not os.listdir(req.loras_dir)


def test_a_child_that_ignores_the_cancel_is_killed_after_the_grace_period(trainable_sd15_checkpoint, reward_model,
                                                                          tmp_path, monkeypatch):
    _stand_in(monkeypatch, "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                           "print('ignoring', 'SIGTERM', flush=True)\ntime.sleep(120)")
    req = request(trainable_sd15_checkpoint, (str(tmp_path / "runs"), str(tmp_path / "loras")), "stuck",
                  reward_model=reward_model)
    def started() -> bool:  # cancel once the stand-in ignores SIGTERM
        with open(os.path.join(req.run_dir, "train.log"), encoding="utf-8") as f:
            return "ignoring SIGTERM" in f.read()

    with pytest.raises(JobCancelled, match="did not stop in time and was killed") as stopped:
        run_job(req, Recorder(), started, poll_s=0.05, cancel_grace_s=1.0)
    assert stopped.value.checkpoint is None and stopped.value.step == 0
    check_request(req)  # the lock went with the job


def test_a_cancel_before_the_trainer_installs_its_handler_is_a_cancel(trainable_sd15_checkpoint, reward_model, tmp_path,
                                                                     monkeypatch):
    """SIGTERM while the child's interpreter still starts ends it at once: nothing was written, the job is cancelled."""
    _stand_in(monkeypatch, "import time\ntime.sleep(120)")
    req = request(trainable_sd15_checkpoint, (str(tmp_path / "runs"), str(tmp_path / "loras")), "early",
                  reward_model=reward_model)
    with pytest.raises(JobCancelled, match="training cancelled after step 0; no checkpoint yet"):
        run_job(req, Recorder(), lambda: True, poll_s=0.05)


def _writes_lora(req: JobRequest, also: str = "") -> str:
    """Stand-in code: ignore SIGTERM, write the run's LoRA (and ``also``, a path given the bytes b"user"), exit 0."""
    lora = os.path.join(req.run_dir, LORA_FILE)
    extra = f"open({also!r}, 'wb').write(b'user')\n" if also else ""
    return ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('handler', 'set', flush=True)\n"
            "import torch\nfrom safetensors.torch import save_file\ntime.sleep(0.5)\n"
            f"save_file({{'lora_unet_x.lora_up.weight': torch.ones(2, 2)}}, {lora!r})\n{extra}")


def test_a_cancel_in_the_last_step_still_publishes_the_finished_lora(trainable_sd15_checkpoint, reward_model, tmp_path,
                                                                      monkeypatch):
    req = request(trainable_sd15_checkpoint, (str(tmp_path / "runs"), str(tmp_path / "loras")), "last",
                  reward_model=reward_model)
    _stand_in(monkeypatch, _writes_lora(req))
    def started() -> bool:  # cancel once the stand-in has its handler, as the trainer once it trains
        with open(os.path.join(req.run_dir, "train.log"), encoding="utf-8") as f:
            return "handler set" in f.read()

    result = run_job(req, Recorder(), started, poll_s=0.05)  # the cancel comes in the last step: it finishes
    assert torch.equal(load_tensors(result.lora_path)["lora_unet_x.lora_up.weight"], torch.ones(2, 2))


def test_a_lora_file_that_appears_while_the_job_runs_is_left_alone(trainable_sd15_checkpoint, reward_model, tmp_path,
                                                                   monkeypatch):
    req = request(trainable_sd15_checkpoint, (str(tmp_path / "runs"), str(tmp_path / "loras")), "raced",
                  reward_model=reward_model)
    os.makedirs(req.loras_dir)
    _stand_in(monkeypatch, _writes_lora(req, also=req.lora_path))
    with pytest.raises(JobFailed, match="appeared while the job ran and is left alone"):
        run_job(req, Recorder(), lambda: False, poll_s=0.05)
    with open(req.lora_path, "rb") as f:
        assert f.read() == b"user"
    assert os.listdir(req.loras_dir) == [os.path.basename(req.lora_path)]  # no staging copy left behind


ORPHAN = """
import os, time
from training.interrupts import PARENT_PID_ENV, StopRequest, watch_parent
with StopRequest() as stop:
    watch_parent(int(os.environ[PARENT_PID_ENV]), poll_s=0.05)
    print("watching", flush=True)
    while stop.received is None:
        time.sleep(0.05)
print("stopped by", stop.received, flush=True)
"""
JOB = """
import os, subprocess, sys, time
log = open(sys.argv[1], "w")
subprocess.Popen([sys.executable, "-c", sys.argv[2]], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                 env={**os.environ, "LONGALIGN_PARENT_PID": str(os.getpid())})
while "watching" not in open(sys.argv[1]).read():
    time.sleep(0.05)
os._exit(0)  # the job's process dies (a server stopped or crashed) while its trainer runs
"""


def test_a_trainer_whose_job_dies_stops_as_on_sigterm(tmp_path):
    """The trainer's parent watch (run by every job's child): the job's process dies, the trainer gets
    the SIGTERM that makes it checkpoint and exit (here: the same handler, reporting what it received)."""
    import subprocess
    import sys
    import time

    from comfy_inprocess import REPO

    log = tmp_path / "orphan.log"
    subprocess.run([sys.executable, "-c", JOB, str(log), ORPHAN], cwd=REPO, timeout=120, check=True)
    deadline = time.monotonic() + 60
    while "stopped by" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert log.read_text().splitlines()[-1] == "stopped by SIGTERM"
