"""Text Embedding Interpolate: exact at the ends, the formula in between, clear errors, runs in ComfyUI."""
import os

import pytest
import torch

from training.interpolate import interpolate_conditioning
from workflows import load_example, shrink


def _cond(seed: int, length: int = 240, pooled: bool = True):
    g = torch.Generator().manual_seed(seed)
    extra = {"pooled_output": torch.randn(1, 768, generator=g)} if pooled else {}
    return [[torch.randn(1, length, 768, generator=g), extra]]


def test_ends_are_exactly_the_inputs_and_the_middle_is_the_formula():
    ft, orig = _cond(0), _cond(1)
    for a, expected in ((0.0, orig), (1.0, ft)):
        out = interpolate_conditioning(ft, orig, a)
        assert torch.equal(out[0][0], expected[0][0])
        assert torch.equal(out[0][1]["pooled_output"], expected[0][1]["pooled_output"])
    mid = interpolate_conditioning(ft, orig, 0.3)
    torch.testing.assert_close(mid[0][0], 0.3 * ft[0][0] + 0.7 * orig[0][0])
    torch.testing.assert_close(mid[0][1]["pooled_output"], 0.3 * ft[0][1]["pooled_output"] + 0.7 * orig[0][1]["pooled_output"])
    assert not torch.equal(mid[0][0], ft[0][0]) and not torch.equal(mid[0][0], orig[0][0])


@pytest.mark.parametrize("case,expected", [
    ("length", "shapes differ: fine-tuned (1, 240, 768) vs original (1, 77, 768)"),
    ("entries", "conditioning_ft has 1 entries, conditioning_orig 2"),
    ("pooled", "conditioning_orig has no pooled_output"),
    ("factor", "factor must be in [0, 1], got 1.5"),
    ("type", "conditioning_orig is not a CONDITIONING"),
])
def test_mismatched_inputs_are_refused_clearly(case, expected):
    ft, orig, a = _cond(0), _cond(1), 0.5
    if case == "length":
        orig = _cond(1, length=77)
    elif case == "entries":
        orig = orig + _cond(2)
    elif case == "pooled":
        orig = _cond(1, pooled=False)
    elif case == "factor":
        a = 1.5
    else:
        orig = torch.zeros(1, 240, 768)
    with pytest.raises(ValueError, match="Text Embedding Interpolate") as info:
        interpolate_conditioning(ft, orig, a)
    assert expected in str(info.value)


@pytest.mark.server
def test_node_runs_in_the_real_server_between_two_longalign_encodings(comfy_server):
    info = comfy_server.get("/object_info/LongAlignTextEmbeddingInterpolate")["LongAlignTextEmbeddingInterpolate"]
    assert set(info["input"]["required"]) == {"conditioning_ft", "conditioning_orig", "factor"}
    wf = shrink(load_example("long_prompt_sd15_api.json"), "tiny_sd15.safetensors", prefix="interp")
    wf["20"] = {"class_type": "LongAlignTextEncode", "inputs": {**wf["2"]["inputs"], "text": "A red fox in snow."}}
    wf["21"] = {"class_type": "LongAlignTextEmbeddingInterpolate",
                "inputs": {"conditioning_ft": ["2", 0], "conditioning_orig": ["20", 0], "factor": 0.4}}
    wf["5"]["inputs"]["positive"] = ["21", 0]
    entry = comfy_server.run(wf)
    assert entry["status"]["status_str"] == "success", entry["status"]
    image = entry["outputs"]["7"]["images"][0]
    assert os.path.isfile(os.path.join(comfy_server.base_dir, "output", image.get("subfolder", ""), image["filename"]))

    bad = shrink(load_example("long_prompt_sd15_api.json"), "tiny_sd15.safetensors", prefix="interp_bad")
    bad["20"] = {"class_type": "LongAlignTextEncode", "inputs": {**bad["2"]["inputs"], "token_length": 77}}
    bad["21"] = {"class_type": "LongAlignTextEmbeddingInterpolate",
                 "inputs": {"conditioning_ft": ["2", 0], "conditioning_orig": ["20", 0], "factor": 0.4}}
    bad["5"]["inputs"]["positive"] = ["21", 0]
    entry = comfy_server.run(bad)
    assert entry["status"]["status_str"] == "error"
    assert "shapes differ" in str(entry["status"]["messages"])
