"""The fast mode is the same method: on tiny fp32 models with LoRA dropout 0 it gives the reference
mode's loss and LoRA gradients (issue 11). The speed may never come from changing the method."""
import os

import pytest
import torch

from test_trainer import _tiny_reward_setup
from training.denoisers import CheckpointedUNet, MergedShadowUNet
from training.objectives.reward import RewardObjective

CAPTIONS = ["A red cat sleeps on a sofa. The room is warm.", "A blue car on a road.", "Two dogs in the snow.",
            "A lighthouse on a cliff. Waves crash below it."]


def _loss_and_grads(fast: bool, decode_chunk: int, checkpoint_calls: bool = False):
    torch.manual_seed(0)
    c, params, conditioner, scorer = _tiny_reward_setup()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in c.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    denoiser = MergedShadowUNet(c.unet, checkpoint_calls=checkpoint_calls) if fast else CheckpointedUNet(c.unet, "unet")
    objective = RewardObjective(denoiser, c.vae, c.scheduler, conditioner, scorer, (4, 8, 8), steps=6,
                                guidance=7.5, grad_steps=2, w=0.3, gather=None, weight_dtype=torch.float32,
                                decode_chunk=decode_chunk, reference_encodes_images=not fast)
    loss, logs = objective.loss({"caption": CAPTIONS}, torch.Generator().manual_seed(1234))
    loss.backward()
    names = [n for n, p in c.unet.named_parameters() if p.requires_grad]
    return loss.detach(), logs, {n: p.grad.clone() for n, p in zip(names, params)}


@pytest.mark.parametrize("decode_chunk, checkpoint_calls", [(1, False), (3, False), (2, True)])
def test_fast_mode_equals_reference_mode(decode_chunk, checkpoint_calls):
    ref_loss, ref_logs, ref_grads = _loss_and_grads(fast=False, decode_chunk=0)
    loss, logs, grads = _loss_and_grads(fast=True, decode_chunk=decode_chunk, checkpoint_calls=checkpoint_calls)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
    for k in ref_logs:
        torch.testing.assert_close(logs[k], ref_logs[k], atol=1e-6, rtol=1e-5)
    assert ref_grads.keys() == grads.keys() and len(grads) > 0
    ref = torch.cat([g.flatten() for g in ref_grads.values()])
    ours = torch.cat([grads[n].flatten() for n in ref_grads])
    assert ref.norm() > 0
    # float32 through 6 sampling steps, decoded in chunks of another size: the same function up to
    # summation order, so the relative error of the whole gradient is at rounding level
    relative = float((ours - ref).norm() / ref.norm())
    print(f"relative gradient error {relative:.2e}")
    assert relative < 1e-4, relative
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-4 * float(ref.abs().max()), rtol=1e-3,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_fast_mode_decodes_each_image_once_and_keeps_only_the_score_differentiable():
    """The chunked decode runs once per chunk (the gradient into x0 is taken there), not once without
    a graph and again in backward; the logged columns carry no gradient."""
    from training.objectives.reward import ChunkedDecodeScore

    decoded = []

    def fn(part, start):
        decoded.append(part.shape[0])
        return torch.stack([(part ** 2).flatten(1).sum(1), part.flatten(1).sum(1)], dim=1)

    x0 = torch.randn(5, 4, 3, 3, requires_grad=True)
    score, columns = ChunkedDecodeScore.apply(x0, fn, 2)
    assert decoded == [2, 2, 1] and not columns.requires_grad
    torch.testing.assert_close(columns[:, 0], score.detach())
    (3 * score).sum().backward()
    assert decoded == [2, 2, 1]  # backward decodes nothing again
    torch.testing.assert_close(x0.grad, 6 * x0.detach())


def test_shadow_weights_follow_the_lora_and_leave_it_untouched():
    c, params, _, _ = _tiny_reward_setup()
    denoiser = MergedShadowUNet(c.unet)
    before = [p.detach().clone() for p in params]
    name = denoiser.layers[0]
    layer = c.unet.get_submodule(name)
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(0.01)
    denoiser.prepare()
    expected = layer.base_layer.weight + layer.scaling["default"] * (
        layer.lora_B["default"].weight.flatten(1) @ layer.lora_A["default"].weight.flatten(1)).view_as(layer.base_layer.weight)
    torch.testing.assert_close(denoiser.shadow.get_submodule(name).weight, expected)
    assert not any(p.requires_grad for p in denoiser.shadow.parameters())
    assert all(torch.equal(a, b) or "lora_B" in n for (n, _), a, b in zip(
        [(n, p) for n, p in c.unet.named_parameters() if p.requires_grad], before, [p.detach() for p in params]))


def _align_setup(tmp_path, comfy_root: str | None = None):
    """Tiny components with a UNet LoRA, the align conditioner (with a training TextAdapter on a tiny
    T5 when ``comfy_root`` is given: ComfyUI's folder, which holds the T5 tokenizer) and a batch of 4
    images."""
    from trainer_helpers import make_image_folder
    from training.clip_text import TransformersClipBackend
    from training.conditioning import TextConditioner
    from training.config import ModelConfig
    from training.data import ImageCaptionDataset, collate, read_records
    from training.lora import add_lora
    from training.models import load_components
    from training.t5 import T5Branch, t5_tokenizer

    c = load_components(ModelConfig(tiny=True))
    for m in (c.unet, c.vae, c.text_encoder):
        m.requires_grad_(False)
    add_lora(c.unet, 4, 4.0)
    branch = None
    if comfy_root is not None:
        from tiny_models import tiny_t5_encoder, tiny_text_adapter

        branch = T5Branch(t5_tokenizer(os.path.join(comfy_root, "comfy", "text_encoders", "t5_tokenizer")),
                          tiny_t5_encoder().requires_grad_(False), tiny_text_adapter().train())
    conditioner = TextConditioner(TransformersClipBackend(c.tokenizer, c.text_encoder), 77, branch)
    dataset = ImageCaptionDataset(read_records(make_image_folder(str(tmp_path), n=4), need_images=True), 64)
    return c, conditioner, collate([dataset[i] for i in range(4)])


def test_align_fast_mode_caches_frozen_encoders_and_keeps_the_numbers(tmp_path):
    from training.feature_cache import FeatureCache
    from training.objectives.align import AlignObjective

    c, conditioner, batch = _align_setup(tmp_path)
    cache = FeatureCache(2**30)
    reference = AlignObjective(c.unet, c.vae, c.scheduler, conditioner, 0.5, torch.float32)
    fast = AlignObjective(c.unet, c.vae, c.scheduler, conditioner, 0.5, torch.float32, cache)
    losses = []
    for objective in (reference, fast, fast):  # the second fast call reads everything from the cache
        with torch.no_grad():
            losses.append(objective.loss(batch, torch.Generator().manual_seed(3))[0])
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(losses[2], losses[0], atol=1e-6, rtol=1e-5)
    assert cache.misses > 0 and cache.hits >= 4 and cache.used > 0
    tiny = FeatureCache(budget_bytes=1)  # too small: nothing kept, still correct
    with torch.no_grad():
        again = AlignObjective(c.unet, c.vae, c.scheduler, conditioner, 0.5, torch.float32, tiny).loss(
            batch, torch.Generator().manual_seed(3))[0]
    torch.testing.assert_close(again, losses[0], atol=1e-6, rtol=1e-5)
    assert tiny.used == 0 and not tiny.entries


def test_align_fast_mode_with_t5_caches_t5_and_trains_the_adapter_the_same(tmp_path, comfy):
    """ct5f: the cache keeps the frozen T5's hidden states (T5 runs once per caption); the training
    TextAdapter runs on them every step and gets the reference's gradients."""
    from training.feature_cache import FeatureCache
    from training.objectives.align import AlignObjective

    c, conditioner, batch = _align_setup(tmp_path, comfy)
    t5_calls = []
    conditioner.t5.encoder.register_forward_hook(lambda *_: t5_calls.append(1))
    adapter = conditioner.t5.adapter
    cache = FeatureCache(2**30)
    results = []
    for objective in (AlignObjective(c.unet, c.vae, c.scheduler, conditioner, 0.5, torch.float32),
                      *[AlignObjective(c.unet, c.vae, c.scheduler, conditioner, 0.5, torch.float32, cache)] * 2):
        adapter.zero_grad(set_to_none=True)
        t5_calls.clear()
        torch.manual_seed(0)  # the adapter trains with dropout 0.1 (reference), drawn from the global generator
        loss = objective.loss(batch, torch.Generator().manual_seed(3))[0]
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in adapter.parameters()], len(t5_calls)))
    (ref_loss, ref_grads, ref_calls), (first_loss, first_grads, first_calls), (loss, grads, calls) = results
    assert (ref_calls, first_calls, calls) == (1, 1, 0)  # the second fast step reads T5 from the cache
    assert any(g.abs().max() > 0 for g in ref_grads)
    for got_loss, got_grads in ((first_loss, first_grads), (loss, grads)):
        torch.testing.assert_close(got_loss, ref_loss, atol=1e-6, rtol=1e-5)
        for got, want in zip(got_grads, ref_grads):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
