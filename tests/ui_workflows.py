"""The UI-format example workflows (what ComfyUI's front end saves: nodes, links, widgets_values):
checked against a server's ``/object_info`` and converted to the API format the way the front end's
``graphToPrompt`` does (the browser test proves the two conversions agree)."""
from __future__ import annotations

import json
import os

from workflows import EXAMPLES

UI_EXAMPLES = {
    "long_prompt_sd15.json": "long prompt, stock SD1.5 checkpoint, LongAlign Text Encode",
    "long_prompt_sdxl.json": "long prompt, SDXL checkpoint, LongAlign Text Encode, a trained SDXL LoRA",
    "longsd_long_prompt.json": "LongSD: alignment + reward LoRAs, T5 adapter",
    "best_of_n_reward.json": "four images, ranked by the decomposed reward, best one saved",
    "stock_vs_longalign.json": "the same seed through CLIP Text Encode and LongAlign Text Encode",
    "train_reward_lora.json": "a reward LoRA trained from a prompt list, then best of N before and after it",
}
TEMPLATE_FILES = {
    "long_prompt_sd15.json": "Long prompt (SD1.5).json",
    "long_prompt_sdxl.json": "Long prompt (SDXL, LoRA).json",
    "longsd_long_prompt.json": "LongSD long prompt (LoRAs, T5).json",
    "best_of_n_reward.json": "Best of N by reward.json",
    "stock_vs_longalign.json": "Stock vs LongAlign encode.json",
    "train_reward_lora.json": "Train a reward LoRA.json",
}
"""Each example's key (its API twin's and screenshot's name) -> its file in ``example_workflows``, named
as the template browser should title it: the front end (1.32 to 1.58) shows a custom node's template
by its file name, and nothing else."""
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
MODEL_WIDGETS = {"ckpt_name", "lora_name", "alignment_lora", "reward_lora", "t5_name", "adapter_name", "model_name"}
"""Combo widgets that name model files: examples name the real files, a test server has tiny ones."""


THUMBNAIL_WIDTH = 512


def template_file(name: str) -> str:
    """The file in ``example_workflows`` of example ``name``: a key of :data:`TEMPLATE_FILES` or a file name."""
    return TEMPLATE_FILES.get(name, name)


def thumbnail_path(name: str) -> str:
    """The template browser's thumbnail of example ``name``: ``<stem>.jpg`` beside its file."""
    return os.path.join(EXAMPLES, os.path.splitext(template_file(name))[0] + ".jpg")


def write_thumbnail(screenshot: str, name: str) -> str:
    """The thumbnail of example ``name`` made from a screenshot of it (the browser test's)."""
    from PIL import Image

    with Image.open(screenshot) as im:
        im = im.convert("RGB")
        im = im.resize((THUMBNAIL_WIDTH, round(im.height * THUMBNAIL_WIDTH / im.width)), Image.LANCZOS)
        path = thumbnail_path(name)
        im.save(path + ".tmp", "JPEG", quality=85)
    os.replace(path + ".tmp", path)
    return path


def load_ui(name: str) -> dict:
    """Example ``name`` (a key of :data:`TEMPLATE_FILES` or a file name) as the front end saved it."""
    with open(os.path.join(EXAMPLES, template_file(name)), encoding="utf-8") as f:
        return json.load(f)


def _is_widget(spec: list) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def _inputs(info: dict) -> list[tuple[str, list]]:
    return [*info["input"].get("required", {}).items(), *info["input"].get("optional", {}).items()]


def check_against_object_info(ui: dict, object_info: dict) -> None:
    """Every node is known to the server, every link joins an output to an input of its type, every
    widget list has one value per widget, and every non-model combo value is one the server offers."""
    nodes = {n["id"]: n for n in ui["nodes"]}
    missing = sorted({n["type"] for n in nodes.values()} - set(object_info))
    assert not missing, f"node types unknown to the server: {missing}"
    for link_id, origin, origin_slot, target, target_slot, link_type in ui["links"]:
        out_type = object_info[nodes[origin]["type"]]["output"][origin_slot]
        target_input = nodes[target]["inputs"][target_slot]
        in_spec = dict(_inputs(object_info[nodes[target]["type"]]))[target_input["name"]]
        assert out_type == link_type == in_spec[0] == target_input["type"], (link_id, out_type, link_type, in_spec[0])
        assert target_input["link"] == link_id
    for node in nodes.values():
        widgets = [(name, spec) for name, spec in _inputs(object_info[node["type"]]) if _is_widget(spec)]
        values = list(node.get("widgets_values", []))
        expected = sum(1 + bool(len(spec) > 1 and spec[1].get("control_after_generate")) for _, spec in widgets)
        assert len(values) == expected, (node["type"], values, [n for n, _ in widgets])
        for name, value in _widget_values(node, widgets):
            spec = widgets[[n for n, _ in widgets].index(name)][1]
            if isinstance(spec[0], list) and name not in MODEL_WIDGETS:
                assert value in spec[0], (node["type"], name, value, spec[0])


def _widget_values(node: dict, widgets: list[tuple[str, list]]):
    values = iter(node.get("widgets_values", []))
    for name, spec in widgets:
        yield name, next(values)
        if len(spec) > 1 and spec[1].get("control_after_generate"):
            next(values)  # the "fixed"/"randomize" control widget the front end adds after a seed


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """The API-format prompt of a UI workflow (inputs in ``INPUT_TYPES`` order, ``_meta`` left out)."""
    origins = {link[0]: [str(link[1]), link[2]] for link in ui["links"]}
    prompt = {}
    for node in sorted(ui["nodes"], key=lambda n: n["id"]):
        assert node.get("mode", 0) == 0, f"node {node['id']} is muted or bypassed"
        info = object_info[node["type"]]
        widgets = [(name, spec) for name, spec in _inputs(info) if _is_widget(spec)]
        values = dict(_widget_values(node, widgets))
        links = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        inputs = {}
        for name, _ in _inputs(info):
            if name in links:
                inputs[name] = origins[links[name]]
            elif name in values:
                inputs[name] = values[name]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
