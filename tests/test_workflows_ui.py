"""The UI-format examples against the real server: valid for ``/object_info``, the same graphs as the
API-format files the other server tests run, and the side-by-side graph runs (the browser test runs
the best-of-N graph and proves the Python conversion equals the front end's)."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from ui_workflows import UI_EXAMPLES, check_against_object_info, load_ui, ui_to_api
from workflows import load_example, shrink

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.get("/object_info")


@pytest.mark.parametrize("name", list(UI_EXAMPLES))
def test_ui_example_is_valid_for_the_servers_object_info(object_info, name):
    ui = load_ui(name)
    check_against_object_info(ui, object_info)
    assert ui["version"] >= 0.4 and {n["id"] for n in ui["nodes"]} == set(range(1, len(ui["nodes"]) + 1))
    assert any(n["type"].startswith("LongAlign") for n in ui["nodes"])
    ckpts = [n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "CheckpointLoaderSimple"]
    assert ckpts in (["v1-5-pruned-emaonly.safetensors"], ["sd_xl_base_1.0.safetensors"])  # a real name; tests substitute the tiny one


@pytest.mark.parametrize("name", ["long_prompt_sd15.json", "longsd_long_prompt.json"])
def test_ui_example_is_the_graph_of_its_api_twin(object_info, name):
    api = load_example(name.replace(".json", "_api.json"))
    for node in api.values():
        node.pop("_meta", None)
    assert ui_to_api(load_ui(name), object_info) == api


def test_a_broken_ui_example_is_caught(object_info):
    ui = load_ui("long_prompt_sd15.json")
    encoder = next(n for n in ui["nodes"] if n["type"] == "LongAlignTextEncode")
    encoder["widgets_values"][1] = "words"  # the split combo
    with pytest.raises(AssertionError, match="words"):
        check_against_object_info(ui, object_info)
    encoder["type"] = "LongAlignTextEncoder"
    with pytest.raises(AssertionError, match="unknown to the server"):
        check_against_object_info(ui, object_info)


def test_stock_vs_longalign_example_runs_and_the_two_encodings_differ(comfy_server, object_info):
    ui = load_ui("stock_vs_longalign.json")
    wf = shrink(ui_to_api(ui, object_info), "tiny_sd15.safetensors")
    samplers = [k for k, n in wf.items() if n["class_type"] == "KSampler"]
    assert len(samplers) == 2 and wf[samplers[0]]["inputs"]["seed"] == wf[samplers[1]]["inputs"]["seed"]
    entry = comfy_server.run(wf)
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = {}
    for node_id in ("11", "12"):
        image = entry["outputs"][node_id]["images"][0]
        with Image.open(os.path.join(comfy_server.base_dir, "output", image.get("subfolder", ""), image["filename"])) as im:
            images[image["filename"].split("_")[0]] = np.asarray(im, dtype=np.int16)
    assert set(images) == {"stock", "longalign"}
    assert np.abs(images["stock"] - images["longalign"]).max() > 0
