"""LCM on tiny models (CPU): distillation lowers the consistency loss, the LCM solver runs inside the
one differentiable loop (reward_lcm), and the student runs in ComfyUI's stock LCM sampler."""
import os
import shutil

import pytest
import torch

from trainer_helpers import make_image_folder, run_stage


@pytest.fixture(scope="module")
def lcm_run(tmp_path_factory):
    images = make_image_folder(str(tmp_path_factory.mktemp("lcm_pairs")), n=4, size=32)
    out = str(tmp_path_factory.mktemp("lcm"))
    run_stage("lcm", "--data.path", images, "--data.resolution", "32", "--data.batch_size", "2",
              "--run.max_steps", "30", "--run.save_every", "0", "--optim.lr", "1e-3", "--run.output_dir", out)
    return images, out


def _distill_loss(images: str, lora_path: str | None) -> float:
    """The consistency loss on a fixed batch and fixed draws, with the student's LoRA zero or trained."""
    from training.clip_text import TransformersClipBackend
    from training.conditioning import TextConditioner
    from training.config import LcmConfig, ModelConfig
    from training.data import ImageCaptionDataset, collate, read_records
    from training.lora import add_lora, unet_lora_layers
    from training.models import load_components
    from training.objectives.lcm import LCMDistillObjective
    from training.safe_io import load_tensors

    c = load_components(ModelConfig(tiny=True))
    for m in (c.unet, c.vae, c.text_encoder):
        m.requires_grad_(False)
    add_lora(c.unet, 4, 4.0)
    if lora_path:
        named = load_tensors(lora_path)
        with torch.no_grad():
            for layer in unet_lora_layers(c.unet):
                peft = c.unet.get_submodule(layer.name)
                peft.lora_A["default"].weight.copy_(named[f"{layer.kohya_name}.lora_down.weight"].view_as(peft.lora_A["default"].weight))
                peft.lora_B["default"].weight.copy_(named[f"{layer.kohya_name}.lora_up.weight"].view_as(peft.lora_B["default"].weight))
    lc = LcmConfig()
    objective = LCMDistillObjective(c.unet, c.vae, c.scheduler, TextConditioner(TransformersClipBackend(c.tokenizer, c.text_encoder), 77),
                                    lc.num_ddim_timesteps, lc.w_min, lc.w_max, lc.huber_c, lc.sigma_data,
                                    lc.timestep_scaling, torch.float32)
    batch = collate([ImageCaptionDataset(read_records(images, need_images=True), 32)[i] for i in range(4)])
    with torch.no_grad():
        return sum(float(objective.loss(batch, torch.Generator().manual_seed(s))[0]) for s in range(4)) / 4


def test_30_distillation_steps_lower_the_consistency_loss(lcm_run):
    images, out = lcm_run
    before, after = _distill_loss(images, None), _distill_loss(images, os.path.join(out, "lora_weights.safetensors"))
    assert after < before, (before, after)


def test_lcm_solver_runs_inside_the_one_loop_without_guidance():
    from training.config import build_parser, resolve
    from training.denoisers import CheckpointedUNet
    from training.sampling import LCM, lcm_boundary, sample_x0
    from training.models import sd15_scheduler
    from training.tiny import tiny_unet

    cfg = resolve("reward", build_parser("reward", "").parse_args(["--sampler", "lcm"]))
    assert (cfg.sampling.steps, cfg.sampling.guidance) == (4, 0.0)
    scheduler = sd15_scheduler()
    solver = LCM(scheduler.alphas_cumprod, 1000)
    assert solver.timesteps(4) == [999, 759, 519, 279]
    c_skip, c_out = lcm_boundary(0)
    assert float(c_skip) == 1.0 and float(c_out) == 0.0  # f(x, 0) = x
    unet = tiny_unet()
    unet.requires_grad_(False)
    calls = []

    class Recorder(CheckpointedUNet):
        def no_grad(self, x, t, context):
            calls.append((x.shape[0], int(t[0]), False))
            return super().no_grad(x, t, context)

        def with_grad(self, x, t, context):
            calls.append((x.shape[0], int(t[0]), True))
            return super().with_grad(x, t, context)

    context = torch.randn(2, 77, 768, requires_grad=True)
    x0 = sample_x0(Recorder(unet), torch.randn(2, 4, 4, 4), context, torch.zeros(1, 77, 768), solver, 4, 0.0, [1, 3],
                   generator=torch.Generator().manual_seed(0))
    assert calls == [(2, 999, False), (2, 759, True), (2, 519, False), (2, 279, True)]  # no CFG: batch B
    x0.square().mean().backward()
    assert context.grad is not None and context.grad.abs().sum() > 0


def test_reward_lcm_merges_the_alignment_lora_then_the_student(lcm_run, tmp_path):
    """reward_lcm trains on base + alignment LoRA + LCM student: ``model.init_lora`` takes both, in order."""
    from training.config import build_parser, resolve
    from trainer_helpers import make_prompt_file, metrics

    _, out = lcm_run
    student = os.path.join(out, "lora_weights.safetensors")
    align = str(tmp_path / "align.safetensors")
    shutil.copy(student, align)  # any kohya LoRA of the same UNet stands in for the alignment LoRA
    cfg = resolve("reward", build_parser("reward", "").parse_args(["--model.init_lora", f"{align},{student}"]))
    assert cfg.model.init_lora == [align, student]
    run = str(tmp_path / "reward_lcm")
    run_stage("reward", "--sampler", "lcm", "--model.init_lora", f"{align},{student}", "--data.path",
              make_prompt_file(str(tmp_path / "p.txt")), "--data.resolution", "32", "--data.batch_size", "2",
              "--run.max_steps", "2", "--run.save_every", "0", "--run.output_dir", run)
    logged = metrics(run)
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in logged)
    assert os.path.isfile(os.path.join(run, "lora_weights.safetensors"))


@pytest.mark.server
def test_student_runs_in_the_stock_lcm_sampler_with_the_lora(lcm_run, comfy_server):
    from workflows import load_example, shrink

    _, out = lcm_run
    shutil.copy(os.path.join(out, "lora_weights.safetensors"),
                os.path.join(comfy_server.model_folder("loras"), "lcm_student.safetensors"))
    wf = shrink(load_example("long_prompt_sd15_api.json"), "tiny_sd15.safetensors", steps=4, prefix="lcm")
    wf["10"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                      "lora_name": "lcm_student.safetensors",
                                                      "strength_model": 1.0, "strength_clip": 1.0}}
    wf["11"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["10", 0], "sampling": "lcm", "zsnr": False}}
    wf["5"]["inputs"].update(model=["11", 0], sampler_name="lcm", scheduler="sgm_uniform", cfg=1.0)
    log_before = len(comfy_server.log())
    entry = comfy_server.run(wf)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["outputs"]["7"]["images"]
    assert "lora key not loaded" not in comfy_server.log()[log_before:]
