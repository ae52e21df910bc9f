"""The template folder as ComfyUI's front end lists it (every ``example_workflows/*.json`` is a
template titled by its file name, ``<name>.jpg`` its thumbnail): UI-format workflows only, each with a
thumbnail and a readable title that ComfyUI serves, the API-format twins elsewhere, the best-of-N
prompt held once, and every README screenshot written by a browser test."""
from __future__ import annotations

import asyncio
import glob
import json
import os
import re
import urllib.parse

import aiohttp
import pytest
from PIL import Image

from comfy_inprocess import REPO
from ui_workflows import TEMPLATE_FILES, UI_EXAMPLES, load_ui, thumbnail_path
from workflows import API_EXAMPLES, EXAMPLES

READABLE_TITLE = re.compile(r"[A-Z][A-Za-z0-9]*( [A-Za-z0-9.,()-]+)+")
"""Words with spaces, a capital first: no snake_case, and no character a URL path treats specially
(the front end puts the name in its fetch URLs unescaped)."""


def _templates() -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(EXAMPLES, "*.json")))


def test_the_template_folder_holds_only_ui_workflows():
    assert {TEMPLATE_FILES[key] for key in UI_EXAMPLES} <= set(_templates())
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


def test_every_template_is_titled_by_a_readable_file_name():
    assert set(UI_EXAMPLES) == set(TEMPLATE_FILES) and set(TEMPLATE_FILES.values()) <= set(_templates())
    for name in _templates():
        title = os.path.splitext(name)[0]
        assert READABLE_TITLE.fullmatch(title) and len(title) <= 40, f"{name!r}: the template browser's title"


@pytest.mark.comfyui
def test_comfyui_lists_and_serves_each_template_and_thumbnail_by_its_title(comfy, tmp_path):
    """ComfyUI's own template routes (``/workflow_templates``, the static folder) on the pack's folder,
    fetched by the URLs the front end builds from the titles."""
    import folder_paths
    from aiohttp import web
    from aiohttp.test_utils import TestServer
    from app.custom_node_manager import CustomNodeManager

    module = "ComfyUI-LongAlign"
    os.symlink(REPO, tmp_path / module)
    folder_paths.folder_names_and_paths["custom_nodes"][0].append(str(tmp_path))
    routes, webapp = web.RouteTableDef(), web.Application()
    CustomNodeManager().add_routes(routes, webapp, [(module, REPO)])
    webapp.add_routes(routes)

    async def main():
        async with TestServer(webapp) as server, aiohttp.ClientSession() as session:
            async with session.get(server.make_url("/workflow_templates")) as r:
                listed = (await r.json())[module]
            served = {}
            for title in listed:
                for ext in ("json", "jpg"):
                    url = f"/api/workflow_templates/{module}/{urllib.parse.quote(title, safe='(),')}.{ext}"
                    async with session.get(server.make_url(url)) as r:
                        served[f"{title}.{ext}"] = (r.status, await r.read())
            return listed, served

    try:
        listed, served = asyncio.run(main())
    finally:
        folder_paths.folder_names_and_paths["custom_nodes"][0].remove(str(tmp_path))
    assert sorted(listed) == [os.path.splitext(n)[0] for n in _templates()]
    for name in _templates():
        status, body = served[name]
        assert status == 200 and json.loads(body) == load_ui(name), name
        status, body = served[os.path.splitext(name)[0] + ".jpg"]
        with open(thumbnail_path(name), "rb") as f:
            assert status == 200 and body == f.read(), name


def test_every_readme_screenshot_is_written_by_a_browser_test():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        shown = set(re.findall(r"docs/screenshots/([^)\s]+\.png)", f.read()))
    assert shown
    written = {key.replace(".json", ".png") for key in UI_EXAMPLES}  # test_browser: one per example
    for path in glob.glob(os.path.join(REPO, "tests", "test_browser*.py")):
        with open(path, encoding="utf-8") as f:
            written |= set(re.findall(r"screenshot\(page, [^\n]*?\"([\w.-]+\.png)\"", f.read()))
    assert shown <= written, f"README screenshots no browser test writes: {sorted(shown - written)}"
