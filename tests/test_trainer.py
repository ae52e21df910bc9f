"""The trainer on tiny models, on the CPU: it learns, it resumes exactly, it refuses bad input, it
records what ran, it logs interval means and labelled validation grids."""
import json
import math
import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from trainer_helpers import (accelerate_launch, make_image_folder, make_prompt_file, metrics, resolve_stage, run_stage,
                             stage_command, train_in_process)
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
              "--run.max_steps", "30", "--run.save_every", "0", "--optim.lr", "1e-3", "--run.validate_every", "15",
              "--run.output_dir", out)
    return out


def test_align_30_steps_lowers_the_diffusion_loss(align_run):
    losses = [m["loss"] for m in metrics(align_run)]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first, (first, last)


def test_align_writes_validation_images_and_tensorboard_logs(align_run):
    from PIL import Image

    from training.validation import MIN_CELL_WIDTH, header_height

    for step in (15, 30):
        with Image.open(os.path.join(align_run, "samples", f"step-{step:07d}.png")) as im:
            assert im.width == 4 * MIN_CELL_WIDTH and im.height > header_height() + 64  # four captions, labelled
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(align_run, "logs", "longalign")).Reload()
    assert {"loss", "lr", "grad_norm"} <= set(acc.Tags()["scalars"])
    assert "validation" in " ".join(acc.Tags()["images"])


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
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["ss_base_model_version"] == "sd_v1"


def test_config_and_lora_metadata_record_the_precision_that_ran(align_run):
    """The run asked for the default bf16; on the CPU it ran in fp32, and every record says so."""
    from safetensors import safe_open

    with open(os.path.join(align_run, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["run"]["mixed_precision"] == "no"
    with safe_open(os.path.join(align_run, "lora_weights.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["longalign.mixed_precision"] == "no"
    assert json.loads(meta["longalign.config"])["run"]["mixed_precision"] == "no"
    with open(os.path.join(align_run, "checkpoints", "step-0000030", "trainer_state.json"), encoding="utf-8") as f:
        assert json.load(f)["run"]["precision"] == "no"


def test_validation_is_on_by_default_on_a_gpu_only(monkeypatch):
    from training.trainer import AUTO_VALIDATE_EVERY, as_run

    cfg = resolve_stage("reward", "--run.mixed_precision", "bf16", "--run.device", "auto")
    assert cfg.run.validate_every == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert as_run(cfg).run.validate_every == 0 and as_run(cfg).run.mixed_precision == "no"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = as_run(cfg)
    assert gpu.run.validate_every == AUTO_VALIDATE_EVERY == 150 and gpu.run.mixed_precision == "bf16"
    assert as_run(resolve_stage("reward", "--run.validate_every", "7")).run.validate_every == 7


def test_validation_grid_is_labelled_with_the_step_and_each_prompt():
    import numpy as np

    from training.validation import MAX_LABEL_LINES, header_height, labelled_grid

    images = np.full((2, 32, 32, 3), 128, np.uint8)
    long_prompt = " ".join(["a very long prompt that goes on"] * 20)
    a = labelled_grid(images, 10, ["a red cat", long_prompt])
    b = labelled_grid(images, 20, ["a red cat", long_prompt])
    c = labelled_grid(images, 10, ["a blue dog", long_prompt])
    top = header_height()
    assert (a[:top] < 100).any()  # the step is written
    assert not np.array_equal(a[:top], b[:top]) and np.array_equal(a[top:], b[top:])
    cell = a.shape[1] // 2
    assert (a[top + 32:, :cell] < 100).any() and (a[top + 32:, cell:] < 100).any()  # each image has its label
    assert not np.array_equal(a[top + 32:, :cell], c[top + 32:, :cell]) and np.array_equal(a[:, cell:], c[:, cell:])
    assert a.shape[0] < top + 32 + (MAX_LABEL_LINES + 1) * 16  # a long prompt is cut, not the grid stretched


@pytest.mark.parametrize("variant", [["--objective", "longalign"], ["--objective", "textcraftor"],
                                     ["--objective", "comat", "--comat.w_concept", "0", "--comat.attn_steps", "1"], ["--sampler", "lcm"]])
def test_reward_stages_write_validation_grids_of_fixed_prompts_and_seeds(prompts, tmp_path, variant):
    """With the learning rate at 0 the model does not change: the grids of steps 1 and 2 are the same
    images of the same prompts, only the step label differs."""
    import numpy as np
    from PIL import Image

    from training.validation import header_height

    out = str(tmp_path / "reward")
    train_in_process("reward", *variant, "--data.path", prompts, "--data.batch_size", "2", "--data.resolution", "32",
                     "--sampling.steps", "2", "--sampling.grad_steps", "1", "--run.max_steps", "2",
                     "--run.validate_every", "1", "--run.save_every", "0", "--optim.lr", "0",
                     "--run.output_dir", out)
    grids = [np.asarray(Image.open(os.path.join(out, "samples", f"step-{s:07d}.png"))) for s in (1, 2)]
    top = header_height()
    assert grids[0].shape == grids[1].shape and grids[0].shape[1] == 4 * 128  # the four prompts
    assert np.array_equal(grids[0][top:], grids[1][top:]) and not np.array_equal(grids[0][:top], grids[1][:top])
    images = grids[0][top:top + 32]
    assert images.std() > 0  # sampled images, not blank cells


def test_logged_scalars_are_means_over_the_logging_interval(prompts, tmp_path):
    """The same run logged every step and every 2 steps: each row of the second is the mean of the
    first's two rows (metrics.jsonl and TensorBoard)."""
    common = ["--data.path", prompts, "--data.batch_size", "2", "--data.resolution", "32", "--sampling.steps", "2",
              "--sampling.grad_steps", "1", "--run.max_steps", "4", "--run.save_every", "0", "--optim.lr", "3e-3"]
    every, pairs = str(tmp_path / "every"), str(tmp_path / "pairs")
    train_in_process("reward", *common, "--run.output_dir", every, "--run.log_every", "1")
    train_in_process("reward", *common, "--run.output_dir", pairs, "--run.log_every", "2",
                     "--run.log_with", "tensorboard")
    per_step, logged = metrics(every), metrics(pairs)
    assert [m["step"] for m in logged] == [2, 4]
    keys = ("loss", "reward", "score", "text_relevant", "text_irrelevant")
    for row, first, second in ((logged[0], *per_step[0:2]), (logged[1], *per_step[2:4])):
        for k in keys:
            assert first[k] != second[k]
            assert row[k] == pytest.approx((first[k] + second[k]) / 2, rel=1e-5, abs=1e-6), k
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(pairs, "logs", "longalign")).Reload()
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in acc.Scalars("loss")] == [
        (m["step"], m["loss"]) for m in logged]


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


def _tiny_reward_setup(rank: int = 4):
    """Tiny components with a LoRA whose up weights are non-zero (so every LoRA tensor gets a gradient)."""
    from training.clip_text import TransformersClipBackend
    from training.conditioning import TextConditioner
    from training.config import ModelConfig
    from training.lora import add_lora
    from training.models import load_components
    from training.tiny import tiny_reward_model

    c = load_components(ModelConfig(tiny=True))
    for m in (c.unet, c.vae, c.text_encoder):
        m.requires_grad_(False)
    params = add_lora(c.unet, rank, float(rank))
    conditioner = TextConditioner(TransformersClipBackend(c.tokenizer, c.text_encoder), 77)
    return c, params, conditioner, tiny_reward_model()


class RecordingDenoiser:
    def __init__(self, inner):
        self.inner, self.grad_calls, self.graph_in_no_grad = inner, 0, []

    def prepare(self):
        self.inner.prepare()

    def no_grad(self, x, t, context):
        out = self.inner.no_grad(x, t, context)
        self.graph_in_no_grad.append(torch.is_grad_enabled() or out.requires_grad)
        return out

    def with_grad(self, x, t, context):
        self.grad_calls += 1
        assert not x.requires_grad  # the reference: gradient calls run on a detached input
        return self.inner.with_grad(x, t, context)


@pytest.mark.parametrize("checkpointing", ["unet", "blocks"])
def test_reward_loop_gradients_reach_lora_only_and_only_k_calls_build_a_graph(checkpointing):
    from training.denoisers import CheckpointedUNet
    from training.objectives.reward import RewardObjective

    c, params, conditioner, scorer = _tiny_reward_setup()
    with torch.no_grad():
        for name, p in c.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    denoiser = RecordingDenoiser(CheckpointedUNet(c.unet, checkpointing))
    objective = RewardObjective(denoiser, c.vae, c.scheduler, conditioner, scorer, (4, 8, 8), steps=10,
                                guidance=7.5, grad_steps=2, w=0.3, gather=None, weight_dtype=torch.float32)
    loss, logs = objective.loss({"caption": ["A red cat. It sleeps.", "A blue car on a road."]},
                                torch.Generator().manual_seed(0))
    loss.backward()
    assert denoiser.grad_calls == 2 and len(denoiser.graph_in_no_grad) == 8 and not any(denoiser.graph_in_no_grad)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in params)
    lora_ids = {id(p) for p in params}
    frozen = [p for m in (c.unet, c.vae, c.text_encoder, scorer.model) for p in m.parameters() if id(p) not in lora_ids]
    assert all(p.grad is None for p in frozen)
    assert set(logs) == {"reward", "score", "text_relevant", "text_irrelevant"}


def _eval_reward(lora_path: str | None, prompts: list[str]) -> float:
    """The reweighted reward of the tiny model (+ LoRA) on a fixed batch and fixed noise."""
    from training.denoisers import CheckpointedUNet
    from training.lora import merge_kohya_lora
    from training.objectives.reward import RewardObjective
    from training.safe_io import load_tensors

    c, _, conditioner, scorer = _tiny_reward_setup()
    if lora_path:
        merge_kohya_lora(c.unet, load_tensors(lora_path))
    objective = RewardObjective(CheckpointedUNet(c.unet), c.vae, c.scheduler, conditioner, scorer, (4, 8, 8),
                                steps=4, guidance=7.5, grad_steps=0, w=0.3, gather=None, weight_dtype=torch.float32)
    with torch.no_grad():
        rewards = [float(objective.loss({"caption": prompts}, torch.Generator().manual_seed(s))[1]["reward"])
                   for s in range(3)]
    return sum(rewards) / len(rewards)


def test_reward_stage_raises_the_reward_on_a_fixed_batch(prompts, tmp_path):
    out = str(tmp_path / "reward")
    run_stage("reward", "--data.path", prompts, "--data.batch_size", "4", "--run.max_steps", "20",
              "--sampling.steps", "4", "--sampling.grad_steps", "2", "--optim.lr", "3e-3",
              "--run.save_every", "0", "--run.output_dir", out)
    texts = [line.strip() for line in open(prompts, encoding="utf-8")]
    before, after = _eval_reward(None, texts), _eval_reward(os.path.join(out, "lora_weights.safetensors"), texts)
    assert after > before, (before, after)
    logged = metrics(out)
    assert len(logged) == 20 and all("text_relevant" in m and "grad_norm" in m for m in logged)


@pytest.mark.server
def test_trained_lora_loads_with_the_stock_loraloader_and_changes_the_image(align_run, comfy_server):
    import shutil

    from workflows import load_example, shrink

    shutil.copy(os.path.join(align_run, "lora_weights.safetensors"),
                os.path.join(comfy_server.model_folder("loras"), "trained_align.safetensors"))
    base = shrink(load_example("long_prompt_sd15_api.json"), "tiny_sd15.safetensors", prefix="no_lora")
    with_lora = shrink(base, "tiny_sd15.safetensors", prefix="with_lora")
    with_lora["10"] = {"class_type": "LoraLoader", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "lora_name": "trained_align.safetensors",
        "strength_model": 1.0, "strength_clip": 1.0}}
    with_lora["5"]["inputs"]["model"] = ["10", 0]
    log_before = len(comfy_server.log())
    images = [comfy_server.image(wf) for wf in (base, with_lora)]
    assert abs(images[0] - images[1]).max() > 0
    assert "lora key not loaded" not in comfy_server.log()[log_before:]


def test_two_process_reward_run_writes_once_and_resumes(prompts, tmp_path):
    out = str(tmp_path / "ddp")
    common = ["--data.path", prompts, "--data.batch_size", "2", "--sampling.steps", "2", "--sampling.grad_steps", "1",
              "--run.save_every", "1", "--run.output_dir", out]
    first = run_stage("reward", *common, "--run.max_steps", "1", launcher=accelerate_launch())
    assert "processes: 2" in first.stderr
    assert os.listdir(os.path.join(out, "checkpoints")) == ["step-0000001"]
    assert len(metrics(out)) == 1  # only the main process logs
    resumed = run_stage("reward", *common, "--run.max_steps", "2", "--resume", launcher=accelerate_launch())
    assert "resumed from" in resumed.stderr and "step-0000001" in resumed.stderr
    assert [m["step"] for m in metrics(out)] == [1, 2]
    assert os.path.isfile(os.path.join(out, "lora_weights.safetensors"))


def test_common_direction_is_gathered_over_processes(tmp_path):
    script = tmp_path / "gather_check.py"
    script.write_text(
        "import torch, torch.nn.functional as F\n"
        "from accelerate import Accelerator\n"
        "from training.scoring import resolve_direction\n"
        "from training.tiny import tiny_reward_model\n"
        "acc = Accelerator(cpu=True)\n"
        "assert acc.num_processes == 2\n"
        "f_T = F.normalize(torch.randn(6, 16, generator=torch.Generator().manual_seed(0)), dim=-1)\n"
        "mine = f_T[3 * acc.process_index: 3 * acc.process_index + 3]\n"
        "v = resolve_direction(tiny_reward_model(), 'batch', mine, gather=acc.gather).v\n"
        "expected = F.normalize(f_T.mean(0), dim=0)\n"
        "torch.testing.assert_close(v, expected)\n"
        "print('rank', acc.process_index, 'ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": REPO}
    out = subprocess.run([*accelerate_launch(), str(script)], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("ok") == 2


def test_align_with_the_t5_branch_trains_the_text_adapter(images, tmp_path, comfy):
    import shutil

    from tiny_models import tiny_t5_encoder, tiny_text_adapter
    from training.adapter import load_text_adapter

    t5_dir, adapter_dir = tmp_path / "t5", tmp_path / "adapter"
    tiny_t5_encoder().save_pretrained(t5_dir)
    shutil.copytree(os.path.join(comfy, "comfy", "text_encoders", "t5_tokenizer"), t5_dir, dirs_exist_ok=True)
    tiny_text_adapter().save_pretrained(adapter_dir)
    out = str(tmp_path / "out")
    run_stage("align", "--data.path", images, "--data.batch_size", "2", "--run.grad_accum", "1", "--run.max_steps", "3",
              "--run.save_every", "0", "--optim.lr", "1e-3", "--model.t5", str(t5_dir), "--model.adapter",
              str(adapter_dir), "--run.output_dir", out, "--run.log_with", "none")
    before, after = load_text_adapter(str(adapter_dir)), load_text_adapter(os.path.join(out, "adapter"))
    changed = [n for (n, a), b in zip(before.named_parameters(), after.parameters()) if not torch.equal(a, b)]
    assert changed, "the TextAdapter did not train"
    assert len(metrics(out)) == 3 and all(math.isfinite(m["loss"]) for m in metrics(out))


def test_export_merged_unet_equals_base_plus_lora(align_run, tmp_path):
    from diffusers import UNet2DConditionModel

    from training.lora import unet_lora_layers
    from training.tiny import tiny_unet

    out = tmp_path / "merged"
    lora = os.path.join(align_run, "lora_weights.safetensors")
    proc = subprocess.run([__import__("sys").executable, "-m", "training.export_merged", "--tiny", "--lora",
                           f"{lora}:0.5", "--out", str(out), "--dtype", "fp32"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged, base, named = UNet2DConditionModel.from_pretrained(out), tiny_unet(), load_file(lora)
    merged_sd, base_sd = merged.state_dict(), base.state_dict()
    targets = {layer.name + ".weight": layer for layer in unet_lora_layers(base)}
    for key, weight in base_sd.items():
        if key in targets:
            stem = targets[key].kohya_name
            up, down = named[f"{stem}.lora_up.weight"].float(), named[f"{stem}.lora_down.weight"].float()
            scale = 0.5 * float(named[f"{stem}.alpha"]) / down.shape[0]
            expected = weight + scale * (up.flatten(1) @ down.flatten(1)).view_as(weight)
            torch.testing.assert_close(merged_sd[key], expected, atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(merged_sd[key], weight), key
    assert not (tmp_path / "merged.tmp").exists()
    bad = subprocess.run([__import__("sys").executable, "-m", "training.export_merged", "--tiny", "--lora",
                          str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "x")], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


@pytest.mark.parametrize("stage", ["align", "reward"])
def test_example_configs_resolve_to_the_paper_defaults(stage):
    from training.config import build_parser, resolve

    path = os.path.join(REPO, "training", "configs", "examples", f"{stage}.yaml")
    cfg = resolve(stage, build_parser(stage, "").parse_args(["--config", path]))
    assert cfg.stage == stage and cfg.lora.rank == 32 and cfg.optim.lr == 3e-5
    if stage == "align":
        assert (cfg.data.batch_size, cfg.run.grad_accum, cfg.data.caption_dropout) == (16, 2, 0.1)
    else:
        assert (cfg.sampling.steps, cfg.sampling.grad_steps, cfg.sampling.guidance, cfg.sampling.w) == (50, 5, 7.5, 0.3)
