"""The reward nodes in-process (equal to the library, under ComfyUI's inference mode) and in the real
ComfyUI server on images from the tiny SD1.5 checkpoint workflow."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_models import PROMPTS, build_tiny_clipmodel, build_tiny_open_clip
from training.scoring import score_images
from training.reward_models import load_reward_model
from workflows import load_example, shrink


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy_reward_models")
    build_tiny_clipmodel(str(root / "tiny_denscore"))
    build_tiny_open_clip(str(root))
    return root


@pytest.fixture(scope="module")
def nodes(pack, reward_dir):
    import folder_paths

    folder_paths.add_model_folder_path("reward_models", str(reward_dir))
    m = pack.NODE_CLASS_MAPPINGS
    return {"loader": m["LongAlignRewardModelLoader"](), "score": m["LongAlignDecomposedRewardScore"](),
            "rank": m["LongAlignRankByReward"]()}


@pytest.fixture(scope="module")
def loaded(nodes):
    with torch.inference_mode():  # as ComfyUI executes nodes
        (model,) = nodes["loader"].load("tiny_denscore", "denscore", "cpu", "fp32")
    return model


def comfy_images(n=4, size=48, seed=0):
    """ComfyUI IMAGE: (B, H, W, C) in [0, 1]."""
    return torch.rand(n, size, size, 3, generator=torch.Generator().manual_seed(seed))


def test_loader_lists_the_folder_and_loads_the_library_model(nodes, reward_dir, loaded):
    listed = nodes["loader"].INPUT_TYPES()["required"]["model_name"][0]
    assert {"tiny_denscore", "tiny_open_clip", "tiny_hps.pt", "tiny_clip.safetensors"} <= set(listed)
    library = load_reward_model(str(reward_dir / "tiny_denscore"), "denscore")
    ids = library.tokenize(["a cat."])
    torch.testing.assert_close(loaded.encode_text(ids), library.encode_text(ids))
    with torch.inference_mode():
        (hub,) = nodes["loader"].load("tiny_open_clip", "hpsv2", "cpu", "fp16")
    assert hub.kind == "hpsv2" and hub.dtype == torch.float16
    with torch.inference_mode():
        (auto,) = nodes["loader"].load("tiny_denscore", "denscore", "auto", "auto")
    assert auto.device.type == "cpu" and auto.dtype == torch.float32  # ComfyUI runs with --cpu here


def test_score_node_equals_the_library_and_shows_its_summary(nodes, loaded):
    images = comfy_images()
    with torch.inference_mode():
        out = nodes["score"].score(images, loaded, PROMPTS[0], 0.3, "builtin")
    total, relevant, irrelevant, reweighted, summary = out["result"]
    library = score_images(loaded, images.movedim(-1, 1), [PROMPTS[0]], w=0.3, direction="builtin")
    assert len(total) == 4 and all(isinstance(x, float) for x in total)
    np.testing.assert_allclose(total, library.total.tolist(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reweighted, library.reweighted.tolist(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.add(relevant, irrelevant), total, atol=1e-5)
    assert out["ui"]["text"] == [summary]
    parsed = json.loads(summary)
    assert parsed["direction"] == "builtin" and parsed["w"] == 0.3 and parsed["reweighted"] == reweighted


def test_rank_node_returns_the_batch_in_score_order_and_the_top_k(nodes, loaded):
    images = comfy_images(5)
    with torch.inference_mode():
        out = nodes["rank"].rank(images, loaded, PROMPTS[1], 0.3, "builtin", "total", 2)
        (scores,) = [nodes["score"].score(images, loaded, PROMPTS[1], 0.3, "builtin")["result"][0]]
    ranked, top, ranking, rejected, _ = out["result"]
    order = json.loads(ranking)["order"]
    assert order == sorted(range(5), key=lambda i: -scores[i])
    torch.testing.assert_close(ranked, images[order])
    torch.testing.assert_close(top, images[order[:2]])
    torch.testing.assert_close(rejected, images[order[2:]])
    assert json.loads(ranking)["scores"] == sorted(json.loads(ranking)["scores"], reverse=True)


def test_rank_node_returns_the_chosen_latents_and_applies_the_threshold(nodes, loaded):
    """Best-of-N that keeps working: the chosen latents come out beside the chosen images (to
    upscale or refine), a min_score leaves out weaker images, the rejected ones come out too."""
    from comfy_execution.graph_utils import ExecutionBlocker

    images, samples = comfy_images(5), torch.randn(5, 4, 6, 6)
    latent = {"samples": samples, "noise_mask": torch.rand(5, 1, 6, 6), "batch_index": [10, 11, 12, 13, 14]}
    with torch.inference_mode():
        out = nodes["rank"].rank(images, loaded, PROMPTS[1], 0.3, "builtin", "total", 3, latent=latent)
    _, top, text, rejected, chosen_latent = out["result"]
    ranking = json.loads(text)
    chosen = ranking["order"][:3]
    assert ranking["chosen"] == chosen and ranking["rejected"] == ranking["order"][3:]
    torch.testing.assert_close(top, images[chosen])
    torch.testing.assert_close(rejected, images[ranking["order"][3:]])
    torch.testing.assert_close(chosen_latent["samples"], samples[chosen])
    torch.testing.assert_close(chosen_latent["noise_mask"], latent["noise_mask"][chosen])
    assert chosen_latent["batch_index"] == [10 + i for i in chosen] and latent["samples"] is samples  # input untouched

    scores = ranking["scores"]  # a threshold between the 2nd and 3rd best: only two images reach it
    threshold = (scores[1] + scores[2]) / 2
    with torch.inference_mode():
        out = nodes["rank"].rank(images, loaded, PROMPTS[1], 0.3, "builtin", "total", 3, latent=latent,
                                 min_score=threshold)
    _, top, text, rejected, chosen_latent = out["result"]
    assert json.loads(text)["chosen"] == chosen[:2] and json.loads(text)["min_score"] == threshold
    torch.testing.assert_close(top, images[chosen[:2]])
    torch.testing.assert_close(chosen_latent["samples"], samples[chosen[:2]])
    assert rejected.shape[0] == 3

    with torch.inference_mode():  # nothing reaches it: the chosen outputs skip the nodes after them
        out = nodes["rank"].rank(images, loaded, PROMPTS[1], 0.3, "builtin", "total", 3, latent=latent,
                                 min_score=scores[0] + 1)
        no_latent = nodes["rank"].rank(images, loaded, PROMPTS[1], 0.3, "builtin", "total", 1)["result"][4]
    _, top, _, rejected, chosen_latent = out["result"]
    assert isinstance(top, ExecutionBlocker) and top.message is None and isinstance(chosen_latent, ExecutionBlocker)
    torch.testing.assert_close(rejected, images[ranking["order"]])
    assert isinstance(no_latent, ExecutionBlocker) and "latent input" in no_latent.message

    with pytest.raises(ValueError, match="latent must be the LATENT the 5 images were decoded from"):
        nodes["rank"].rank(images, loaded, PROMPTS[1], 0.3, "builtin", "total", 1, latent={"samples": samples[:2]})


def test_node_batch_direction_with_one_prompt_falls_back_visibly(nodes, loaded):
    with pytest.warns(UserWarning), torch.inference_mode():
        summary = json.loads(nodes["score"].score(comfy_images(2), loaded, PROMPTS[0], 0.3, "batch")["result"][4])
    assert summary["direction"] == "builtin" and "batch direction undefined" in summary["note"]


def test_node_bad_input_is_a_clear_error(nodes, loaded):
    with pytest.raises(ValueError, match="reward_model input is None"):
        nodes["score"].score(comfy_images(), None, "a cat.", 0.3, "builtin")
    with pytest.raises(ValueError, match="IMAGE batch"):
        nodes["score"].score(torch.rand(48, 48, 3), loaded, "a cat.", 0.3, "builtin")
    with pytest.raises(ValueError, match="text 0 is empty"):
        nodes["score"].score(comfy_images(), loaded, "  ", 0.3, "builtin")
    with pytest.raises(ValueError, match="needs a reference prompt file"):
        nodes["score"].score(comfy_images(), loaded, "a cat.", 0.3, "reference", "")
    with pytest.raises(FileNotFoundError, match="not in any reward_models folder"):
        nodes["loader"].load("no_such_model", "denscore", "cpu", "fp32")
    with pytest.raises(ValueError, match="expects a transformers CLIPModel folder"):
        nodes["loader"].load("tiny_hps.pt", "pickscore", "cpu", "fp32")


def strict_json(text: str):
    """JSON as the front end's ``JSON.parse`` reads it: NaN and Infinity are not JSON."""
    return json.loads(text, parse_constant=lambda constant: pytest.fail(f"{constant} in {text[:200]}"))


def test_non_finite_scores_rank_last_and_are_flagged():
    from training.scoring import DecomposedScores, Direction

    values = torch.tensor([0.1, float("nan"), float("inf"), -float("inf"), 0.3, 0.1])
    scores = DecomposedScores(values, values, values, values, values, 0.3, Direction(torch.zeros(3), "builtin"))
    assert scores.order("total") == [4, 0, 5, 1, 2, 3]  # finite best first (ties in batch order), then the rest
    assert scores.nonfinite() == [1, 2, 3]
    summary = strict_json(json.dumps(scores.summary(), allow_nan=False))
    assert summary["total"][1:4] == [None, None, None] and summary["nonfinite"] == [1, 2, 3]
    assert summary["mean"]["total"] == pytest.approx((0.1 + 0.3 + 0.1) / 3)
    ranking = strict_json(json.dumps(scores.ranking("total"), allow_nan=False))
    assert ranking["order"] == [4, 0, 5, 1, 2, 3] and ranking["scores"][3:] == [None, None, None]


def test_a_nan_image_ranks_last_and_the_summaries_are_json(nodes, loaded):
    """A NaN decode (an fp16 VAE) must not win best-of-N; the ui text stays parseable."""
    images = comfy_images(4)
    images[1] = float("nan")
    with torch.inference_mode():
        out = nodes["rank"].rank(images, loaded, PROMPTS[1], 0.3, "builtin", "reweighted", 1)
        score = nodes["score"].score(images, loaded, PROMPTS[1], 0.3, "builtin")
    ranked, top, text, rejected, _ = out["result"]
    ranking = strict_json(text)
    assert ranking["order"][-1] == 1 and ranking["nonfinite"] == [1]
    assert ranking["scores"][-1] is None and all(isinstance(x, float) for x in ranking["scores"][:-1])
    assert ranking["scores"][:-1] == sorted(ranking["scores"][:-1], reverse=True)
    assert bool(torch.isfinite(top).all())  # top_k = 1 is a real image, not the NaN one
    torch.testing.assert_close(ranked, images[ranking["order"]], equal_nan=True)
    assert ranking["chosen"] == ranking["order"][:1] and ranking["rejected"][-1] == 1
    torch.testing.assert_close(rejected, images[ranking["order"][1:]], equal_nan=True)
    summary = strict_json(score["result"][4])
    assert summary["nonfinite"] == [1] and summary["reweighted"][1] is None
    assert all(isinstance(v, float) for v in summary["mean"].values())
    assert out["ui"]["text"] == [text] and score["ui"]["text"] == [score["result"][4]]


@pytest.mark.parametrize("w", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_w_is_refused(nodes, loaded, w):
    for node in ("score", "rank"):
        message = type(nodes[node]).VALIDATE_INPUTS(w=w)
        assert isinstance(message, str) and "w must be a finite number" in message
    assert type(nodes["score"]).VALIDATE_INPUTS(w=0.3) is True and type(nodes["rank"]).VALIDATE_INPUTS() is True
    assert "between 0.0 and 2.0" in type(nodes["score"]).VALIDATE_INPUTS(w=2.5)
    with pytest.raises(ValueError, match="w must be a finite number"), torch.inference_mode():
        nodes["score"].score(comfy_images(2), loaded, "a cat.", w, "builtin")


# ---- the real server -------------------------------------------------------------------------

@pytest.mark.server
def test_rank_and_score_nodes_in_the_real_server(comfy_server, reward_dir):
    target = os.path.join(comfy_server.base_dir, "models", "reward_models", "tiny_denscore")
    shutil.copytree(reward_dir / "tiny_denscore", target, dirs_exist_ok=True)
    info = comfy_server.get("/object_info/LongAlignRewardModelLoader")["LongAlignRewardModelLoader"]
    assert "tiny_denscore" in info["input"]["required"]["model_name"][0]
    assert comfy_server.get("/object_info/LongAlignRankByReward")["LongAlignRankByReward"]["output"] == [
        "IMAGE", "IMAGE", "STRING", "IMAGE", "LATENT"]

    wf = shrink(load_example("long_prompt_sd15_api.json"), "tiny_sd15.safetensors", prefix="reward_all")
    wf["4"]["inputs"]["batch_size"] = 4
    text = wf["2"]["inputs"]["text"]
    scoring = {"reward_model": ["20", 0], "text": text, "w": 0.3, "direction": "builtin"}
    wf.update({
        "20": {"class_type": "LongAlignRewardModelLoader",
               "inputs": {"model_name": "tiny_denscore", "kind": "denscore", "device": "cpu", "dtype": "fp32"}},
        "21": {"class_type": "LongAlignRankByReward",
               "inputs": {"images": ["6", 0], **scoring, "score": "reweighted", "top_k": 2}},
        "22": {"class_type": "SaveImage", "inputs": {"images": ["21", 0], "filename_prefix": "reward_sorted"}},
        "23": {"class_type": "SaveImage", "inputs": {"images": ["21", 1], "filename_prefix": "reward_top"}},
        "24": {"class_type": "LongAlignDecomposedRewardScore", "inputs": {"images": ["6", 0], **scoring}},
    })
    entry = comfy_server.run(wf)
    assert entry["status"]["status_str"] == "success", entry["status"]
    outputs = entry["outputs"]
    summary = json.loads(outputs["24"]["text"][0])
    ranking = json.loads(outputs["21"]["text"][0])
    reweighted = summary["reweighted"]
    assert len(reweighted) == 4 and summary["direction"] == "builtin"
    assert ranking["order"] == sorted(range(4), key=lambda i: -reweighted[i])
    assert len(outputs["23"]["images"]) == 2

    def pixels(node):
        out = []
        for image in outputs[node]["images"]:
            path = os.path.join(comfy_server.base_dir, "output", image.get("subfolder", ""), image["filename"])
            with Image.open(path) as im:
                out.append(np.asarray(im))
        return out

    unsorted, ranked, top = pixels("7"), pixels("22"), pixels("23")
    assert any(not np.array_equal(unsorted[0], u) for u in unsorted[1:])  # the batch is not four copies
    for i, j in enumerate(ranking["order"]):
        np.testing.assert_array_equal(ranked[i], unsorted[j])
    np.testing.assert_array_equal(top[0], unsorted[ranking["order"][0]])


@pytest.mark.server
def test_a_non_finite_w_sent_through_the_api_is_refused(comfy_server, reward_dir):
    """ComfyUI's own min/max check lets NaN through (every comparison with NaN is false): the prompt
    is refused at validation (HTTP 400, node_errors naming w), before anything runs."""
    target = os.path.join(comfy_server.base_dir, "models", "reward_models", "tiny_denscore")
    shutil.copytree(reward_dir / "tiny_denscore", target, dirs_exist_ok=True)
    wf = shrink(load_example("long_prompt_sd15_api.json"), "tiny_sd15.safetensors", prefix="reward_nan")
    del wf["7"]  # the only output left is the ranking's: the whole prompt is refused
    for w in (float("nan"), float("inf")):
        wf.update({
            "20": {"class_type": "LongAlignRewardModelLoader",
                   "inputs": {"model_name": "tiny_denscore", "kind": "denscore", "device": "cpu", "dtype": "fp32"}},
            "21": {"class_type": "LongAlignRankByReward",
                   "inputs": {"images": ["6", 0], "reward_model": ["20", 0], "text": "a cat.", "w": w,
                              "direction": "builtin", "score": "reweighted", "top_k": 1}},
            "22": {"class_type": "SaveImage", "inputs": {"images": ["21", 1], "filename_prefix": "reward_nan"}},
        })
        status, body = comfy_server.queue(wf)  # json.dumps writes NaN / Infinity; ComfyUI's parser reads them
        assert status == 400, body
        assert "w must be a finite number" in json.dumps(body["node_errors"]["21"]), body
