"""The decomposed reward scorer (training/scoring.py, training/reward_models.py) on tiny models saved in
the real on-disk formats: a transformers CLIPModel folder, an open_clip hub folder, an HPSv2-style
``{"state_dict": ...}`` .pt file and an open_clip .safetensors file."""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from tiny_models import PROMPTS, build_tiny_clipmodel, build_tiny_open_clip
from training.scoring import (DEFAULT_PROMPTS, Direction, common_direction, decompose, image_features,
                             preprocess_images, read_prompt_file, resolve_direction, reward_loss, score_images,
                             text_features)
from training.reward_models import CLIP_MEAN, CLIP_STD, list_reward_models, load_reward_model
from training.safe_io import ModelFileError

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward_models")
    hf = build_tiny_clipmodel(str(root / "tiny_denscore"))
    oc, paths = build_tiny_open_clip(str(root))
    return {"root": str(root), "hf_model": hf, "oc_model": oc, "denscore": str(root / "tiny_denscore"), **paths}


@pytest.fixture(scope="module")
def models(files):
    return {
        "denscore": load_reward_model(files["denscore"], "denscore"),
        "hpsv2": load_reward_model(files["pt"], "hpsv2", architecture=files["config"]),
        "clip": load_reward_model(files["hub"], "clip"),
    }


@pytest.fixture(params=["denscore", "hpsv2"])
def model(request, models):
    return models[request.param]


def images(n: int = 3, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- loading -------------------------------------------------------------------------------

def test_transformers_folder_loads_back_frozen_with_the_saved_weights(files, models):
    rm = models["denscore"]
    assert rm.image_size == 32 and not any(p.requires_grad for p in rm.model.parameters())
    ids = rm.tokenize(["a red fox in the snow."])
    torch.testing.assert_close(rm.encode_text(ids), files["hf_model"].get_text_features(input_ids=ids).pooler_output)
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(rm.encode_image(pixels),
                               files["hf_model"].get_image_features(pixel_values=pixels).pooler_output)
    assert rm.logit_scale == pytest.approx(files["hf_model"].logit_scale.exp().item())


def test_open_clip_pt_hub_folder_and_safetensors_load_the_same_weights(files, models):
    single = load_reward_model(files["safetensors"], "clip", architecture=files["config"])
    pixels, ids = torch.randn(2, 3, 32, 32), models["clip"].tokenize(["a cat.", "a dog."])
    expected_image = files["oc_model"].encode_image(pixels)
    expected_text = files["oc_model"].encode_text(ids)
    for rm in (models["hpsv2"], models["clip"], single):
        torch.testing.assert_close(rm.encode_image(pixels), expected_image)
        torch.testing.assert_close(rm.encode_text(ids), expected_text)
        assert not any(p.requires_grad for p in rm.model.parameters())


def test_tokenize_is_77_tokens_truncated_and_padded(models):
    rm = models["denscore"]
    ids = rm.tokenize(["a cat.", " ".join(["word"] * 200)])
    assert ids.shape == (2, 77)
    bos, eos = rm.tokenizer.bos_token_id, rm.tokenizer.eos_token_id
    assert ids[0, 0] == bos and ids[0, 4] == eos and (ids[0, 5:] == 0).all()  # a, cat, . then EOS, pad 0
    assert ids[1, 0] == bos and ids[1, 76] == eos and (ids[1, 1:76] != eos).all()


def test_list_reward_models_gives_folders_as_one_entry(files):
    entries = list_reward_models(files["root"])
    assert entries == ["tiny_clip.safetensors", "tiny_denscore", "tiny_hps.pt", "tiny_open_clip"]


# ---- features ------------------------------------------------------------------------------

def test_text_feature_is_the_plain_mean_of_normalised_sentence_features(model):
    text = PROMPTS[0]
    sentences = ["A red fox sits in the snow.", "The sky is grey.", "a pine forest stands behind it."]
    direct = F.normalize(model.encode_text(model.tokenize(sentences)), dim=-1).mean(dim=0)
    f_T = text_features(model, [text, PROMPTS[2], text])
    torch.testing.assert_close(f_T[0], direct)
    torch.testing.assert_close(f_T[2], direct)
    assert f_T[0].norm() < 0.999  # not re-normalised
    assert f_T[1].norm() == pytest.approx(1.0, abs=1e-5)  # a single sentence is unit length


def test_eval_preprocessing_equals_torchvision_centre_crop_resize_normalise(model):
    x = images(2, 512)
    ours = preprocess_images(x, 224, CLIP_MEAN, CLIP_STD, train=False)
    ref = TF.normalize(TF.resize(TF.center_crop(x, 504), [224, 224], antialias=True), CLIP_MEAN, CLIP_STD)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_train_preprocessing_is_a_random_504_crop(model):
    x = images(1, 512)
    a = preprocess_images(x, 224, CLIP_MEAN, CLIP_STD, train=True, generator=torch.Generator().manual_seed(0))
    b = preprocess_images(x, 224, CLIP_MEAN, CLIP_STD, train=True, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)
    g = torch.Generator().manual_seed(0)
    top, left = (int(torch.randint(0, 9, (1,), generator=g)) for _ in range(2))
    crop = x[:, :, top: top + 504, left: left + 504]
    torch.testing.assert_close(a, TF.normalize(TF.resize(crop, [224, 224], antialias=True), CLIP_MEAN, CLIP_STD),
                               atol=1e-5, rtol=1e-5)
    offsets = {tuple(preprocess_images(x, 224, CLIP_MEAN, CLIP_STD, train=True)[0, 0, :2, :2].flatten().tolist())
               for _ in range(6)}
    assert len(offsets) > 1


# ---- decomposition -------------------------------------------------------------------------

def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_decomposition_identities_and_the_direct_formula():
    f_T, f_I = unit(5, 16, seed=0) * 0.8, unit(5, 16, seed=1)
    v = Direction(common_direction(unit(7, 16, seed=2)), "reference")
    s1 = decompose(f_T, f_I, v, w=1.0)
    torch.testing.assert_close(s1.reweighted, s1.total)
    torch.testing.assert_close(s1.text_relevant + s1.text_irrelevant, s1.total)
    torch.testing.assert_close(s1.eta, f_T @ v.v)  # eta = length of f_T's projection on v
    proj = (f_T @ v.v).unsqueeze(1) * v.v
    torch.testing.assert_close(s1.text_irrelevant, (proj * f_I).sum(-1))
    for w in (0.0, 0.3, 0.7):
        s = decompose(f_T, f_I, v, w=w)
        f_T_prime = f_T - (1 - w) * (f_T @ v.v).unsqueeze(1) * v.v  # f_T' = f_T - (1 - w) eta v
        torch.testing.assert_close(s.reweighted, (f_T_prime * f_I).sum(-1))
    # w = 0 removes the common component: moving f_T along v changes nothing
    s0, shifted = decompose(f_T, f_I, v, w=0.0), decompose(f_T + 0.37 * v.v, f_I, v, w=0.0)
    torch.testing.assert_close(s0.reweighted, shifted.reweighted)
    assert not torch.allclose(s0.total, shifted.total)
    assert reward_loss(s0).item() == pytest.approx(0.5 * (1 - s0.reweighted.mean().item()))


def test_score_images_equals_the_formula_from_scratch(model):
    x = images(3, 64)
    scores = score_images(model, x, PROMPTS, w=0.3, direction="batch")
    f_I = F.normalize(model.encode_image(preprocess_images(x, model.image_size, model.mean, model.std)), dim=-1)
    f_T = torch.stack([F.normalize(model.encode_text(model.tokenize(_sentences(p))), dim=-1).mean(0) for p in PROMPTS])
    v = F.normalize(f_T.mean(0), dim=0)
    eta = f_T @ v
    relevant = ((f_T - eta[:, None] * v) * f_I).sum(-1)
    torch.testing.assert_close(scores.total, (f_T * f_I).sum(-1))
    torch.testing.assert_close(scores.reweighted, relevant + 0.3 * eta * (f_I @ v))
    torch.testing.assert_close(scores.total_scaled, scores.total * model.logit_scale)
    assert scores.direction.source == "batch" and scores.direction.note == ""


def _sentences(prompt):
    from training.segments import split_sentences
    return split_sentences(prompt)


def test_gradients_reach_the_image_and_never_the_reward_model(model):
    x = images(3, 64).requires_grad_(True)
    loss = reward_loss(score_images(model, x, PROMPTS, train=True, generator=torch.Generator().manual_seed(3)))
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.model.parameters())


def test_batch_direction_uses_the_gathered_features(model):
    others = unit(4, 16, seed=5)
    calls = []

    def gather(t):
        calls.append(t.shape)
        return torch.cat([t, others])

    scores = score_images(model, images(3), PROMPTS, direction="batch", gather=gather)
    f_T = text_features(model, PROMPTS)
    assert calls == [(3, 16)]
    torch.testing.assert_close(scores.direction.v, F.normalize(torch.cat([f_T, others]).mean(0), dim=0))


@pytest.mark.parametrize("texts", [PROMPTS[:1], [PROMPTS[0]] * 3], ids=["batch-of-one", "one-prompt"])
def test_batch_direction_with_one_prompt_falls_back_and_says_so(model, texts, tmp_path):
    n = len(texts)
    with pytest.warns(UserWarning, match="batch direction undefined"):
        scores = score_images(model, images(n), texts, direction="batch")
    assert scores.direction.source == "builtin" and "builtin" in scores.direction.note
    torch.testing.assert_close(scores.direction.v, common_direction(text_features(model, read_prompt_file(DEFAULT_PROMPTS))))
    ref = tmp_path / "ref.txt"
    ref.write_text("# comment\na lighthouse on a cliff.\n\na bowl of soup.\n")
    with pytest.warns(UserWarning):
        scores = score_images(model, images(n), texts, direction="batch", reference=str(ref))
    assert scores.direction.source == "reference"
    torch.testing.assert_close(scores.direction.v, common_direction(text_features(model, ["a lighthouse on a cliff.", "a bowl of soup."])))


def test_builtin_prompt_set_is_64_varied_prompts_and_direction_sources_differ(model, tmp_path):
    prompts = read_prompt_file(DEFAULT_PROMPTS)
    assert len(prompts) == 64 and len(set(prompts)) == 64
    assert sum(len(_sentences(p)) > 1 for p in prompts) > 32  # mostly multi-sentence, like long captions
    f_T = text_features(model, PROMPTS)
    builtin = resolve_direction(model, "builtin", f_T)
    ref = tmp_path / "ref.txt"
    ref.write_text("a cat.\na dog.\n")
    reference = resolve_direction(model, "reference", f_T, str(ref))
    batch = resolve_direction(model, "batch", f_T)
    assert (builtin.source, reference.source, batch.source) == ("builtin", "reference", "batch")
    assert not torch.allclose(builtin.v, reference.v) and not torch.allclose(builtin.v, batch.v)
    with pytest.raises(ValueError, match="needs a reference prompt file"):
        resolve_direction(model, "reference", f_T)


def test_order_sorts_best_first(model):
    scores = score_images(model, images(4), PROMPTS[:1], direction="builtin")
    order = scores.order("total")
    assert sorted(order) == [0, 1, 2, 3]
    assert scores.total[order].tolist() == sorted(scores.total.tolist(), reverse=True)
    with pytest.raises(ValueError, match="score must be one of"):
        scores.order("v")


# ---- bad input -----------------------------------------------------------------------------

def test_wrong_kind_for_a_file_is_a_clear_error(files):
    with pytest.raises(ModelFileError, match="expects a transformers CLIPModel folder.*it is a file.*hpsv2 or clip"):
        load_reward_model(files["pt"], "denscore")
    with pytest.raises(ModelFileError, match="expects an open_clip.*transformers folder.*denscore or pickscore"):
        load_reward_model(files["denscore"], "hpsv2")
    with pytest.raises(ModelFileError, match="open_clip_config.json instead"):
        load_reward_model(files["hub"], "pickscore")
    with pytest.raises(ModelFileError, match="does not match open_clip architecture 'ViT-H-14'.*problems"):
        load_reward_model(files["pt"], "hpsv2")  # the default architecture is not the tiny one
    with pytest.raises(ValueError, match="no architecture 'ViT-Q-99'"):
        load_reward_model(files["pt"], "hpsv2", architecture="ViT-Q-99")
    with pytest.raises(ValueError, match="kind must be one of"):
        load_reward_model(files["pt"], "aesthetic")


def test_missing_model_names_where_comfyui_expects_it(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist.*models/reward_models"):
        load_reward_model(str(tmp_path / "denscore"), "denscore")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text('{"model_type": "clip"}')
    with pytest.raises(ModelFileError, match="no weights.*model.safetensors"):
        load_reward_model(str(tmp_path / "empty"), "denscore")


def test_corrupt_safetensors_is_a_clear_error(files, tmp_path):
    folder = tmp_path / "broken_denscore"
    shutil.copytree(files["denscore"], folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelFileError, match="could not be read"):
        load_reward_model(str(folder), "denscore")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelFileError, match="not a readable safetensors file"):
        load_reward_model(str(broken), "clip", architecture=files["config"])


def test_empty_text_and_mismatched_counts_are_refused(model):
    with pytest.raises(ValueError, match="text 1 is empty"):
        score_images(model, images(2), ["a cat.", "   "], direction="builtin")
    with pytest.raises(ValueError, match="3 images and 2 texts"):
        score_images(model, images(3), PROMPTS[:2], direction="builtin")


def test_odd_sizes_and_channel_counts(model):
    odd = torch.rand(2, 3, 37, 91)
    scores = score_images(model, odd, PROMPTS[:1], direction="builtin")
    assert scores.total.shape == (2,) and torch.isfinite(scores.reweighted).all()
    mixed = [torch.rand(3, 17, 29), torch.rand(3, 600, 300), torch.rand(3, 5, 5)]
    assert score_images(model, mixed, PROMPTS[:1], direction="builtin").total.shape == (3,)
    grey = torch.rand(2, 1, 40, 40)
    torch.testing.assert_close(score_images(model, grey, PROMPTS[:1], direction="builtin").total,
                               score_images(model, grey.repeat(1, 3, 1, 1), PROMPTS[:1], direction="builtin").total)
    rgba = torch.rand(2, 4, 40, 40)
    torch.testing.assert_close(image_features(model, rgba), image_features(model, rgba[:, :3]))
    with pytest.raises(ValueError, match="1 \\(grey\\), 3 \\(RGB\\) or 4 \\(RGBA\\) channels, got 2"):
        score_images(model, torch.rand(2, 2, 40, 40), PROMPTS[:1], direction="builtin")
    with pytest.raises(ValueError, match="images is empty"):
        score_images(model, [], PROMPTS[:1], direction="builtin")
    with pytest.raises(ValueError, match="\\(B, C, H, W\\)"):
        score_images(model, torch.rand(3, 40, 40), PROMPTS[:1], direction="builtin")
