"""TextCraftor on tiny models (CPU): gradients reach the text encoder only, training raises the reward,
the saved text-encoder LoRA loads onto CLIP with the stock LoraLoader, bad input is refused."""
import os
import shutil

import pytest
import torch

from trainer_helpers import make_prompt_file, metrics, run_stage
from training.safe_io import MANIFEST

ARGS = ["--objective", "textcraftor", "--data.resolution", "32", "--textcraftor.rank", "4", "--textcraftor.alpha", "4",
        "--sampling.steps", "3", "--sampling.grad_steps", "1", "--run.save_every", "0"]
PROMPTS = ["A red circle on a blue table.", "A green square at night."]


def _objective(steps: int = 3, grad_steps: int = 1, lora_file: str | None = None):
    """The tiny TextCraftor objective as the stage builds it (UNet LoRA frozen, text-encoder LoRA)."""
    from training.clip_text import TransformersClipBackend
    from training.conditioning import TextConditioner
    from training.config import ModelConfig, TextCraftorConfig
    from training.denoisers import CheckpointedUNet
    from training.lora import add_lora, add_text_encoder_lora, merge_text_encoder_lora
    from training.models import load_components
    from training.objectives.textcraftor import TextCraftorObjective, TrainableTextEncoder, load_reward_terms
    from training.safe_io import load_tensors

    c = load_components(ModelConfig(tiny=True))
    for m in (c.unet, c.vae, c.text_encoder):
        m.requires_grad_(False)
    add_lora(c.unet, 4, 4.0)
    c.unet.requires_grad_(False)
    if lora_file:
        merge_text_encoder_lora(c.text_encoder, load_tensors(lora_file))
    conditioner = TextConditioner(TransformersClipBackend(c.tokenizer, c.text_encoder), 77)
    params = add_text_encoder_lora(c.text_encoder, 4, 4.0)
    encoder = TrainableTextEncoder(conditioner, "lora", 4.0, {})
    terms = load_reward_terms(TextCraftorConfig(), True, torch.device("cpu"), torch.float32)
    objective = TextCraftorObjective(CheckpointedUNet(c.unet), c.vae, c.scheduler, encoder, terms, (4, 4, 4), steps,
                                     7.5, grad_steps, torch.float32)
    return c, params, objective


class ContextRecorder:
    """Records, per UNet call, whether it ran with gradient and whether its context carries a graph."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def prepare(self):
        self.inner.prepare()

    def no_grad(self, x, t, context):
        self.calls.append(("no_grad", context.requires_grad))
        return self.inner.no_grad(x, t, context)

    def with_grad(self, x, t, context):
        self.calls.append(("with_grad", context.requires_grad))
        return self.inner.with_grad(x, t, context)


def test_gradients_reach_the_text_encoder_lora_only_through_the_last_steps():
    c, params, objective = _objective(steps=3, grad_steps=1)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.02)  # non-zero up weights: every LoRA tensor gets a gradient
    objective.denoiser = ContextRecorder(objective.denoiser)
    loss, logs = objective.loss({"caption": PROMPTS}, torch.Generator().manual_seed(0))
    loss.backward()
    # the first steps: original encoder, no graph; the last K: fine-tuned encoder, with gradient
    assert objective.denoiser.calls == [("no_grad", False), ("no_grad", False), ("with_grad", True)]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in params)
    lora_ids = {id(p) for p in params}
    frozen = [p for m in (c.unet, c.vae, c.text_encoder) for p in m.parameters() if id(p) not in lora_ids]
    frozen += [p for t in objective.terms for p in t.model.model.parameters()]
    assert all(p.grad is None for p in frozen)
    assert {"reward", "clip", "pick", "hps", "aesthetic"} <= set(logs) and torch.isfinite(loss)


def _reward(lora_file: str | None) -> float:
    _, _, objective = _objective(lora_file=lora_file)
    with torch.no_grad():
        return sum(float(objective.loss({"caption": PROMPTS}, torch.Generator().manual_seed(s))[1]["reward"])
                   for s in range(2)) / 2


@pytest.fixture(scope="module")
def textcraftor_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("textcraftor")
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = str(folder / "run")
    run_stage("reward", *ARGS, "--data.path", str(prompts), "--data.batch_size", "2", "--run.max_steps", "20",
              "--optim.lr", "3e-3", "--run.output_dir", out)
    return out


def test_20_steps_raise_the_reward_on_a_fixed_batch(textcraftor_run):
    lora = os.path.join(textcraftor_run, "adapter", "text_encoder_lora.safetensors")
    before, after = _reward(None), _reward(lora)
    assert after > before, (before, after)
    logged = metrics(textcraftor_run)
    assert len(logged) == 20 and all(m["lr"] == 3e-3 and m["grad_norm"] == 0.0 for m in logged)  # no clipping


def test_lora_run_writes_no_unet_lora(textcraftor_run):
    """The UNet is frozen: only the text encoder's file is written (no all-zero UNet LoRA beside it)."""
    written = [f for f in os.listdir(os.path.join(textcraftor_run, "adapter")) if f != MANIFEST]  # + our output manifest
    assert written == ["text_encoder_lora.safetensors"]
    assert not os.path.exists(os.path.join(textcraftor_run, "lora_weights.safetensors"))


def test_full_fine_tune_writes_diffs_that_comfyui_applies_to_clip(comfy, tmp_path):
    """``--textcraftor.train full``: the whole encoder trains; the ``.diff`` file patches ComfyUI's CLIP
    (stock key map and patching, every key consumed) into exactly the fine-tuned encoder."""
    import comfy.lora
    from comfy_inprocess import comfy_clip_from_transformers
    from training.config import ModelConfig
    from training.models import load_components
    from training.safe_io import load_tensors

    prompts = make_prompt_file(str(tmp_path / "p.txt"))
    out = str(tmp_path / "run")
    run_stage("reward", *ARGS, "--textcraftor.train", "full", "--data.path", prompts, "--data.batch_size", "2",
              "--run.max_steps", "3", "--optim.lr", "1e-3", "--run.output_dir", out)
    assert not os.path.exists(os.path.join(out, "lora_weights.safetensors"))
    diff = load_tensors(os.path.join(out, "adapter", "text_encoder_diff.safetensors"))
    assert any(t.abs().max() > 0 for t in diff.values())  # the encoder moved

    original = load_components(ModelConfig(tiny=True)).text_encoder
    tuned = load_components(ModelConfig(tiny=True)).text_encoder
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            stem, kind = name.removeprefix("text_model.").rsplit(".", 1)
            p += diff[f"text_encoders.clip_l.transformer.text_model.{stem}.{'diff' if kind == 'weight' else 'diff_b'}"].float()
    clip = comfy_clip_from_transformers(original)
    patches = comfy.lora.load_lora(diff, comfy.lora.model_lora_keys_clip(clip.cond_stage_model))
    assert len(patches) == len(diff)  # every tensor of the file found its layer
    clip.add_patches(patches, 1.0)
    expected = comfy_clip_from_transformers(tuned)
    tokens = clip.tokenize("A red circle on a blue table.")
    got, want = clip.encode_from_tokens(tokens), expected.encode_from_tokens(tokens)
    base = comfy_clip_from_transformers(original).encode_from_tokens(tokens)
    assert (got - base).abs().max() > 1e-4
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_textcraftor_defaults_are_the_papers():
    from training.config import build_parser, resolve

    cfg = resolve("reward", build_parser("reward", "").parse_args(["--objective", "textcraftor"]))
    assert (cfg.sampling.steps, cfg.sampling.guidance, cfg.sampling.grad_steps) == (25, 7.5, 5)
    assert (cfg.optim.lr, cfg.optim.max_grad_norm, cfg.data.batch_size) == (1e-6, 0.0, 4)
    assert (cfg.textcraftor.w_clip, cfg.textcraftor.w_pick, cfg.textcraftor.w_hps, cfg.textcraftor.w_aes) == (0.5, 1, 1, 1)
    plain = resolve("reward", build_parser("reward", "").parse_args([]))
    assert (plain.sampling.steps, plain.optim.lr, plain.sampling.objective) == (50, 3e-5, "longalign")


@pytest.mark.server
def test_text_encoder_lora_loads_onto_clip_with_the_stock_loraloader(textcraftor_run, comfy_server):
    from safetensors.torch import load_file

    from workflows import load_example, shrink

    lora = os.path.join(textcraftor_run, "adapter", "text_encoder_lora.safetensors")
    assert load_file(lora) and all(k.startswith("lora_te_text_model_encoder_layers_") for k in load_file(lora))
    shutil.copy(lora, os.path.join(comfy_server.model_folder("loras"), "textcraftor_te.safetensors"))
    base = shrink(load_example("long_prompt_sd15_api.json"), "tiny_sd15.safetensors", prefix="tc_base")
    tuned = shrink(base, "tiny_sd15.safetensors", prefix="tc_lora")
    tuned["10"] = {"class_type": "LoraLoader", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "lora_name": "textcraftor_te.safetensors",
        "strength_model": 0.0, "strength_clip": 1.0}}
    tuned["2"]["inputs"]["clip"] = ["10", 1]
    log_before = len(comfy_server.log())
    images = [comfy_server.image(wf) for wf in (base, tuned)]
    assert abs(images[0] - images[1]).max() > 0  # the CLIP patch changed the conditioning
    assert "lora key not loaded" not in comfy_server.log()[log_before:]


@pytest.mark.parametrize("case", ["cli", "file"])
def test_unknown_objective_name_is_refused(case, tmp_path):
    prompts = make_prompt_file(str(tmp_path / "p.txt"))
    args = ["--data.path", prompts, "--run.max_steps", "1", "--run.output_dir", str(tmp_path / "out")]
    if case == "cli":
        out = run_stage("reward", "--objective", "dreambooth", *args, check=False)
        expected = "invalid choice: 'dreambooth'"
    else:
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text("sampling:\n  objective: dreambooth\n")
        out = run_stage("reward", "--config", str(cfg), *args, check=False)
        expected = "sampling.objective: 'dreambooth' is not one of ['longalign', 'textcraftor', 'comat']"
    assert out.returncode == 2 and expected in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
