"""CoMat on tiny models (CPU): the BLIP concept loss, the noun-modifier parser and its token rows, the
cross-attention capture, the discriminator step, 20 training steps lowering the loss, bad input."""
import json
import os

import pytest
import torch

from trainer_helpers import make_prompt_file, metrics, run_stage

PROMPT = "A red circle on a blue table."
OTHER = "A green square."
WORDS = "[PAD] [UNK] [CLS] [SEP] [MASK] a photography of red blue green circle square on table the . soft light is"


def make_tiny_blip(folder: str, seed: int = 0):
    """A tiny BLIP captioner (random weights, 32x32 images) and a WordPiece tokenizer over a small
    vocabulary written here, saved as a local captioner folder."""
    from transformers import BertTokenizerFast, BlipConfig, BlipForConditionalGeneration

    os.makedirs(folder, exist_ok=True)
    words = WORDS.split()
    with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(words) + "\n")
    tokenizer = BertTokenizerFast(os.path.join(folder, "vocab.txt"))
    config = BlipConfig(
        text_config=dict(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32, pad_token_id=0, bos_token_id=2,
                         sep_token_id=3, eos_token_id=3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8))
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def blip_folder(tmp_path_factory):
    return make_tiny_blip(str(tmp_path_factory.mktemp("blip")))


def _image(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    image = torch.zeros(1, 3, 32, 32)
    image[:, 0, 8:24, 8:24] = 1.0  # a red square on a dark background, with a little texture
    return (image + 0.05 * torch.rand(image.shape, generator=g)).clamp(0, 1)


def train_captioner(captioner, steps: int = 40) -> None:
    """Briefly train the captioner: the image goes with PROMPT, noise with OTHER."""
    model = captioner.model.requires_grad_(True).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        noise = torch.rand(1, 3, 32, 32, generator=g)
        loss = -captioner.reward(_image(), [PROMPT]) - captioner.reward(noise, [OTHER])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def trained_blip_folder(tmp_path_factory, blip_folder):
    """The tiny captioner after :func:`train_captioner`: it now reacts to the image."""
    from training.captioner import load_captioner

    captioner = load_captioner(blip_folder)
    train_captioner(captioner)
    folder = str(tmp_path_factory.mktemp("blip_trained"))
    captioner.model.save_pretrained(folder)
    captioner.tokenizer.save_pretrained(folder)
    return folder


def test_concept_loss_is_finite_differentiable_and_lower_for_a_learned_image(blip_folder):
    from training.captioner import load_captioner

    captioner = load_captioner(blip_folder)
    image = _image().requires_grad_(True)
    reward = captioner.reward(image, [PROMPT], torch.Generator().manual_seed(0))
    reward.backward()
    assert torch.isfinite(reward) and image.grad is not None and image.grad.abs().sum() > 0
    assert all(p.grad is None for p in captioner.model.parameters())
    ids, _, labels = captioner.text([PROMPT])
    assert (labels[0, : captioner.prefix_length] == -100).all() and (labels[0, captioner.prefix_length:] == ids[0, captioner.prefix_length:]).all()
    with torch.no_grad():  # a caption longer than BLIP's text positions is truncated
        assert torch.isfinite(captioner.reward(_image(), [" ".join(["red circle"] * 40)]))

    train_captioner(captioner)
    with torch.no_grad():
        learned = -captioner.reward(_image(7), [PROMPT])
        noise = -captioner.reward(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(9)), [PROMPT])
    assert torch.isfinite(learned) and learned < noise, (float(learned), float(noise))


@pytest.mark.parametrize("prompt, expected", [
    ("A fluffy white cat on a red wooden chair.", [("fluffy", "white", "cat"), ("red", "wooden", "chair")]),
    ("a red and blue car parked near a tall building", [("red", "blue", "car"), ("tall", "building")]),
    ("A dog running in the park", [("dog",), ("park",)]),
    ("two very large green apples on a plate", [("plate",)]),  # 4 words: dropped, as the reference
    ("a man wearing a black leather jacket", [("man",), ("black", "leather", "jacket")]),
])
def test_parser_groups(prompt, expected):
    from training.concepts import parse_groups

    assert [g.words for g in parse_groups(prompt)] == expected


def _conditioning():
    from training.clip_text import TransformersClipBackend, clip_tokenizer
    from training.conditioning import TextConditioner
    from training.tiny import tiny_clip_text_model

    return TextConditioner(TransformersClipBackend(clip_tokenizer(), tiny_clip_text_model()), 77)


def test_groups_are_aligned_to_the_rows_of_the_segment_conditioning():
    from training.concepts import token_groups

    conditioner = _conditioning()
    backend, tokenizer = conditioner.backend, conditioner.backend.tokenizer
    caption = "A red car. A fluffy white cat sits on a strawberries-coloured mat."
    groups = token_groups(caption, backend, conditioner.options)
    assert [g.group.words for g in groups] == [("red", "car"), ("fluffy", "white", "cat"), ("strawberries-coloured", "mat")]
    # the concatenation the encoder builds: every segment keeps its BOS, EOS and padding dropped
    flat = []
    for sentence in ("A red car.", "A fluffy white cat sits on a strawberries-coloured mat."):
        flat += [tokenizer.bos_token_id] + tokenizer(sentence, add_special_tokens=False).input_ids
    for g in groups:
        for word, rows in zip(g.group.words, g.positions):
            assert [flat[p] for p in rows] == tokenizer(word, add_special_tokens=False).input_ids, word
    assert len(groups[2].positions[0]) > 1  # a word of several BPE pieces keeps all of them
    # and the rows are those of the conditioning itself: the second sentence starts after the first
    with torch.no_grad():
        full = conditioner([caption])[0]
        alone = conditioner(["A fluffy white cat sits on a strawberries-coloured mat."])[0]
    offset = 1 + len(tokenizer("A red car.", add_special_tokens=False).input_ids)
    cat = groups[1].noun_positions[0]
    torch.testing.assert_close(full[cat], alone[cat - offset])
    # rows past token_length are cut with their group
    from training.encode import SegmentOptions
    short = token_groups(caption, backend, SegmentOptions(token_length=offset + 3))
    assert [g.group.words for g in short] == [("red", "car")]


def _tiny_unet_with_lora(targets: str = "attention"):
    from training.lora import add_lora
    from training.tiny import tiny_unet

    unet = tiny_unet().requires_grad_(False)
    params = add_lora(unet, 4, 4.0, targets=targets)
    return unet, params


def test_attention_maps_are_captured_for_the_right_tokens():
    from diffusers.models.attention_processor import Attention

    from training.attention_maps import AttentionStore, RecordingDenoiser, install_capture
    from training.denoisers import CheckpointedUNet

    unet, params = _tiny_unet_with_lora()
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)
    B, T = 2, 77
    x = torch.randn(2 * B, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2 * B, T, 768, generator=torch.Generator().manual_seed(1))
    t = torch.full((2 * B,), 500)
    with torch.no_grad():
        plain = unet(x, t, context).sample
    seen = {}

    def grab(name):
        def hook(module, args, kwargs):
            seen[name] = (args[0] if args else kwargs["hidden_states"], kwargs["encoder_hidden_states"])
        return hook

    handles = [m.register_forward_pre_hook(grab(n), with_kwargs=True) for n, m in unet.named_modules()
               if isinstance(m, Attention) and m.is_cross_attention]
    store = AttentionStore()
    names = install_capture(unet, store)
    assert names and all(n.startswith(("mid_block", "up_blocks")) and n.endswith("attn2") for n in names)
    assert not any(n.startswith("down_blocks") for n in names)
    tokens = [[1, 2, 5], [3, 40]]
    store.begin(tokens, [1])  # the second gradient call of the pass is recorded, through a checkpoint
    denoiser = RecordingDenoiser(CheckpointedUNet(unet), store)
    denoiser.prepare()
    denoiser.with_grad(x, t, context)
    assert store.maps == []
    captured = denoiser.with_grad(x, t, context)
    for h in handles:
        h.remove()
    torch.testing.assert_close(captured, plain)  # the capture does not change the output
    assert sorted(name for _, name, _ in store.maps) == sorted(names)  # each captured layer once, forward order
    for _, name, per_sample in store.maps:
        attn = unet.get_submodule(name)
        hidden, ctx = seen[name]
        heads = attn.heads
        q = attn.to_q(hidden[:B]).unflatten(-1, (heads, -1)).transpose(1, 2)  # cond branch only
        k = attn.to_k(ctx[:B]).unflatten(-1, (heads, -1)).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)  # (B, heads, hw, T)
        for b in range(B):
            assert per_sample[b].shape == (heads, hidden.shape[1], len(tokens[b]))
            torch.testing.assert_close(per_sample[b], probs[b][..., tokens[b]], atol=1e-6, rtol=1e-5)
    # gradient reaches the LoRA on to_q / to_k through the maps (the checkpoint's recomputation stores nothing)
    n_maps = len(store.maps)
    loss = sum(m.sum() for _, _, per_sample in store.maps for m in per_sample) + captured.sum()
    loss.backward()
    assert len(store.maps) == n_maps
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in unet.named_parameters() if "to_q.lora" in n)


def _concept_loss_and_grads(captioner, decode_chunk: int):
    """The concept term alone through the tiny preset's fast-mode loop: its loss and LoRA gradients."""
    from training.clip_text import TransformersClipBackend
    from training.conditioning import TextConditioner
    from training.config import ModelConfig
    from training.denoisers import MergedShadowUNet
    from training.lora import add_lora
    from training.models import load_components
    from training.objectives.comat import CoMatObjective

    torch.manual_seed(0)
    c = load_components(ModelConfig(tiny=True))
    for m in (c.unet, c.vae, c.text_encoder):
        m.requires_grad_(False)
    params = add_lora(c.unet, 4, 4.0)
    with torch.no_grad():
        for name, p in c.unet.named_parameters():  # non-zero up weights: every LoRA tensor gets a gradient
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
    objective = CoMatObjective(MergedShadowUNet(c.unet), c.vae, c.scheduler,
                               TextConditioner(TransformersClipBackend(c.tokenizer, c.text_encoder), 77), (4, 4, 4),
                               3, 7.5, 2, torch.float32, captioner=captioner, w_concept=1.0, store=None, w_token=0.0,
                               w_pixel=0.0, attn_steps=1, threshold=0.5, max_group_words=3, discriminator=None,
                               real=None, w_adv=0.0, decode_chunk=decode_chunk)
    loss, logs = objective.loss({"caption": [PROMPT, OTHER, PROMPT + " Soft light."]}, torch.Generator().manual_seed(3))
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in params])


def test_chunked_decode_gives_the_whole_batch_concept_loss(blip_folder):
    """Fast mode decodes and captions ``decode_chunk`` images at a time in backward: same loss and LoRA
    gradients as decoding the whole batch with a graph (different prompt lengths: different padding)."""
    from training.captioner import load_captioner

    captioner = load_captioner(blip_folder)
    whole_loss, whole = _concept_loss_and_grads(captioner, 0)
    chunk_loss, chunked = _concept_loss_and_grads(captioner, 2)
    torch.testing.assert_close(chunk_loss, whole_loss, rtol=1e-5, atol=1e-6)
    assert whole.norm() > 0 and float((chunked - whole).norm() / whole.norm()) < 1e-4


def test_token_loss_is_the_papers_formula():
    from training.attention_maps import AttentionStore, Group, concentration_losses

    A = torch.rand(2, 16, 3)  # heads, 4x4 positions, tokens (attribute, attribute, noun)
    mask = torch.zeros(4, 4)
    mask[:2] = 1.0
    store = AttentionStore(tokens=[[0, 1, 2]], maps=[(0, "mid", [A])])
    group = Group(tokens=(0, 1, 2), noun=(2,))
    token, pixel = concentration_losses(store, [[group]], masks=[[mask]])
    M = mask.flatten()
    expected = torch.stack([(1 - ((A[..., j] * M).sum(-1) / A[..., j].sum(-1)).mean()) ** 2 for j in range(3)]).mean()
    torch.testing.assert_close(token, expected)
    bce = torch.nn.functional.binary_cross_entropy(A.mean(0).sum(-1).clamp(0, 1), M)
    torch.testing.assert_close(pixel, bce)
    # mask-free: the noun's own thresholded map is the region; no pixel loss without masks
    token_free, pixel_free = concentration_losses(store, [[group]], threshold=0.5)
    noun = A[..., 2].mean(0)
    M_free = (noun >= 0.5 * noun.max()).float()
    expected_free = torch.stack([(1 - ((A[..., j] * M_free).sum(-1) / A[..., j].sum(-1)).mean()) ** 2
                                 for j in range(3)]).mean()
    torch.testing.assert_close(token_free, expected_free)
    assert pixel_free == 0


def test_discriminator_step_and_generator_loss():
    from training.discriminator import DiscriminatorTrainer, LatentDiscriminator

    unet, params = _tiny_unet_with_lora()
    d = LatentDiscriminator(unet, torch.randn(1, 77, 768), timestep=19)
    trainer = DiscriminatorTrainer(d, lr=1e-2)
    assert all(not p.requires_grad for p in d.parameters())
    fake = torch.randn(2, 4, 4, 4, requires_grad=True)
    real = torch.randn(2, 4, 4, 4) * 0.2 + 1.0
    losses = [float(trainer.step(fake, real)) for _ in range(15)]
    assert losses[-1] < losses[0] and fake.grad is None
    g_adv = d.generator_loss(fake)
    g_adv.backward()
    assert fake.grad.abs().sum() > 0 and all(p.grad is None for p in d.parameters())
    assert all(p.grad is None for p in params)  # the generator's own LoRA is not the discriminator's


def test_discriminator_state_round_trips_through_a_checkpoint_file(tmp_path):
    from training.discriminator import DiscriminatorTrainer, LatentDiscriminator
    from training.safe_io import load_tensors, save_tensors

    unet, _ = _tiny_unet_with_lora()
    context = torch.randn(1, 77, 768)
    fake, real = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4) + 1.0
    first = DiscriminatorTrainer(LatentDiscriminator(unet, context, 19), lr=1e-2)
    for _ in range(3):
        first.step(fake, real)
    path = save_tensors(first.state(), str(tmp_path / "objective_state.safetensors"))
    resumed = DiscriminatorTrainer(LatentDiscriminator(unet, context, 19), lr=1e-2)
    resumed.load_state(load_tensors(path))
    torch.testing.assert_close(resumed.step(fake, real), first.step(fake, real))
    for a, b in zip(resumed.params, first.params):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="parameter 0 is missing"):
        resumed.load_state({})


ARGS = ["--objective", "comat", "--data.resolution", "32", "--lora.rank", "4", "--lora.alpha", "4",
        "--sampling.steps", "3", "--sampling.grad_steps", "2", "--comat.attn_steps", "1", "--run.save_every", "0"]
TRAIN_PROMPTS = ["A red circle on a blue table.", "A green square on a red table."]


def _total_loss(blip: str, lora_file: str | None) -> float:
    """``-r + 1e-3 L_token`` (CoMat's weights) on a fixed batch and fixed draws, base or trained LoRA.
    ``G_adv`` is left out: it is measured against a discriminator that moves with training."""
    from training.attention_maps import AttentionStore, install_capture
    from training.captioner import load_captioner
    from training.config import ModelConfig
    from training.denoisers import CheckpointedUNet
    from training.lora import merge_kohya_lora
    from training.models import load_components
    from training.objectives.comat import CoMatObjective
    from training.safe_io import load_tensors

    c = load_components(ModelConfig(tiny=True))
    for m in (c.unet, c.vae, c.text_encoder):
        m.requires_grad_(False)
    if lora_file:
        merge_kohya_lora(c.unet, load_tensors(lora_file))
    conditioner = _conditioning()
    conditioner.backend.text_encoder = c.text_encoder
    store = AttentionStore()
    install_capture(c.unet, store)
    objective = CoMatObjective(CheckpointedUNet(c.unet), c.vae, c.scheduler, conditioner, (4, 4, 4), 3, 7.5, 2,
                               torch.float32, captioner=load_captioner(blip), w_concept=1.0, store=store,
                               w_token=1e-3, w_pixel=0.0, attn_steps=1, threshold=0.5, max_group_words=3,
                               discriminator=None, real=None, w_adv=0.0)
    with torch.enable_grad():
        return sum(float(objective.loss({"caption": TRAIN_PROMPTS}, torch.Generator().manual_seed(s))[0])
                   for s in range(3)) / 3


@pytest.fixture(scope="module")
def comat_run(tmp_path_factory, trained_blip_folder):
    folder = tmp_path_factory.mktemp("comat")
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(TRAIN_PROMPTS) + "\n")
    out = str(folder / "run")
    run_stage("reward", *ARGS, "--captioner", trained_blip_folder, "--data.path", str(prompts), "--data.batch_size", "2",
              "--run.max_steps", "20", "--optim.lr", "3e-3", "--run.output_dir", out)
    return out


def test_20_steps_lower_the_total_loss(comat_run, trained_blip_folder):
    from safetensors.torch import load_file

    lora = os.path.join(comat_run, "lora_weights.safetensors")
    names = {k.rsplit(".", 2)[0] for k in load_file(lora)}
    assert names and all(n.endswith(("attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0", "attn2_to_q",
                                     "attn2_to_k", "attn2_to_v", "attn2_to_out_0")) for n in names)
    logged = metrics(comat_run)
    assert len(logged) == 20
    assert os.path.isfile(os.path.join(comat_run, "checkpoints", "step-0000020", "objective_state.safetensors"))
    assert all(all(torch.isfinite(torch.tensor(m[k])) for k in ("concept", "token", "g_adv", "d_loss")) for m in logged)
    before, after = _total_loss(trained_blip_folder, None), _total_loss(trained_blip_folder, lora)
    assert after < before, (before, after)


def test_comat_trains_with_the_lcm_sampler(tmp_path, blip_folder):
    """CoMat's losses on LCM's 4 unguided steps (``--sampler lcm``): the one loop, the attention capture
    and the discriminator work without the CFG half of the batch."""
    from safetensors.torch import load_file

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(TRAIN_PROMPTS) + "\n")
    out = str(tmp_path / "run")
    run_stage("reward", *ARGS[:ARGS.index("--sampling.steps")], "--sampler", "lcm", "--captioner", blip_folder,
              "--data.path", str(prompts), "--data.batch_size", "2", "--run.max_steps", "2", "--run.save_every", "0",
              "--run.output_dir", out)
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        sampling = json.load(f)["sampling"]
    assert (sampling["sampler"], sampling["steps"], sampling["guidance"]) == ("lcm", 4, 0.0)
    logged = metrics(out)
    assert [m["step"] for m in logged] == [1, 2]
    assert all(torch.isfinite(torch.tensor(m[k])) for m in logged for k in ("loss", "concept", "token", "g_adv", "d_loss"))
    assert all(m["grad_norm"] > 0 for m in logged)
    assert load_file(os.path.join(out, "lora_weights.safetensors"))


def test_comat_defaults_are_the_papers():
    from training.config import build_parser, resolve

    cfg = resolve("reward", build_parser("reward", "").parse_args(["--objective", "comat", "--captioner", "/x"]))
    assert (cfg.sampling.steps, cfg.sampling.guidance, cfg.sampling.grad_steps) == (50, 7.5, 5)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.max_grad_norm, cfg.optim.warmup_steps) == (5e-5, 1e-2, 0.1, 0)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, cfg.data.batch_size, cfg.run.max_steps) == (
        128, 128.0, "attention", 4, 2000)
    c = cfg.comat
    assert (c.captioner, c.w_concept, c.w_adv, c.w_token, c.w_pixel, c.attn_steps) == ("/x", 1.0, 1.0, 1e-3, 5e-5, 2)
    assert (c.disc_lr, c.disc_betas, c.disc_max_grad_norm) == (2e-5, [0.0, 0.999], 1.0)


def test_unknown_objective_name_is_refused(tmp_path):
    prompts = make_prompt_file(str(tmp_path / "p.txt"))
    out = run_stage("reward", "--objective", "comatt", "--data.path", prompts, "--run.max_steps", "1",
                    "--run.output_dir", str(tmp_path / "out"), check=False)
    assert out.returncode == 2 and "invalid choice: 'comatt'" in out.stderr and "Traceback" not in out.stderr


def test_captioner_folder_of_the_wrong_model_type_is_refused(tmp_path):
    folder = tmp_path / "captioner"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "clip"}))
    prompts = make_prompt_file(str(tmp_path / "p.txt"))
    out = run_stage("reward", *ARGS, "--captioner", str(folder), "--data.path", prompts, "--run.max_steps", "1",
                    "--run.output_dir", str(tmp_path / "out"), check=False)
    expected = f"comat.captioner {str(folder)!r}: its config.json has model_type 'clip', expected 'blip'"
    assert out.returncode == 2 and expected in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("case, expected", [("no_config", "config.json is missing"), ("file", "expected a folder"),
                                            ("no_weights", "no weights")])
def test_incomplete_captioner_folders_are_refused(case, expected, tmp_path):
    from training.captioner import load_captioner
    from training.safe_io import ModelFileError

    path = tmp_path / "captioner"
    if case == "file":
        path.write_text("x")
    else:
        path.mkdir()
        if case == "no_weights":
            (path / "config.json").write_text(json.dumps({"model_type": "blip"}))
    with pytest.raises(ModelFileError, match=expected) as info:
        load_captioner(str(path))
    assert str(path) in str(info.value)
