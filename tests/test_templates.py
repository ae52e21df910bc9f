"""The template folder as ComfyUI's front end lists it (every ``example_workflows/*.json`` is a
template, ``<name>.jpg`` its thumbnail): UI-format workflows only, each with a thumbnail, the
API-format twins elsewhere, and the best-of-N prompt held once."""
from __future__ import annotations

import glob
import json
import os

from PIL import Image

from ui_workflows import UI_EXAMPLES, load_ui, thumbnail_path
from workflows import API_EXAMPLES, EXAMPLES


def _templates() -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(EXAMPLES, "*.json")))


def test_the_template_folder_holds_only_ui_workflows():
    assert set(UI_EXAMPLES) <= set(_templates())
    for name in _templates():
        ui = load_ui(name)
        assert isinstance(ui.get("nodes"), list) and isinstance(ui.get("links"), list) and ui["nodes"], name
        assert all("class_type" not in n for n in ui["nodes"]), name


def test_every_template_has_a_thumbnail():
    for name in _templates():
        with Image.open(thumbnail_path(name)) as im:
            assert im.format == "JPEG" and im.width >= 256 and im.height >= 128, name
    leftovers = {os.path.splitext(f)[0] for f in os.listdir(EXAMPLES)} - {os.path.splitext(n)[0] for n in _templates()}
    assert not leftovers, f"files in example_workflows that belong to no template: {leftovers}"


def test_api_twins_live_outside_the_template_folder_and_match_a_template():
    twins = sorted(os.path.basename(p) for p in glob.glob(os.path.join(API_EXAMPLES, "*.json")))
    assert {"long_prompt_sd15_api.json", "longsd_long_prompt_api.json"} <= set(twins)
    for name in twins:
        assert name.replace("_api.json", ".json") in UI_EXAMPLES
        with open(os.path.join(API_EXAMPLES, name), encoding="utf-8") as f:
            prompt = json.load(f)
        assert all("class_type" in node and "inputs" in node for node in prompt.values()), name
    assert not glob.glob(os.path.join(EXAMPLES, "*_api.json"))


def test_templates_use_the_current_node_ids():
    old = {"LongSDLoader", "T5AdapterLoader"}
    for name in _templates():
        assert not old & {n["type"] for n in load_ui(name)["nodes"]}, name


def test_best_of_n_holds_its_prompt_once_feeding_all_three_consumers():
    ui = load_ui("best_of_n_reward.json")
    nodes = {n["id"]: n for n in ui["nodes"]}
    (source,) = [n for n in ui["nodes"] if n["type"] == "PrimitiveStringMultiline"]
    prompt = source["widgets_values"][0]
    assert len(prompt) > 300
    raw = json.dumps(ui)
    assert raw.count(json.dumps(prompt)[1:-1]) == 1
    fed = set()
    for _, origin, _, target, slot, link_type in ui["links"]:
        if origin == source["id"]:
            assert link_type == "STRING" and nodes[target]["inputs"][slot]["name"] == "text"
            fed.add(nodes[target]["type"])
    assert fed == {"LongAlignTextEncode", "LongAlignRankByReward", "LongAlignDecomposedRewardScore"}
    assert sum(link[1] == source["id"] for link in ui["links"]) == 3  # the negative prompt keeps its own text
