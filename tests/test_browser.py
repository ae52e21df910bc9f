"""The pack in ComfyUI's real front end (``comfyui-frontend-package``) in Debian's headless Chromium,
driven by Playwright: the examples load with no missing node and convert to the prompts the Python
side expects, the token counter shows the server's counts, and the reward scores appear after a run.

Every test here runs on each front end and node renderer of the matrix (``scripts/test.sh``: 1.32.9,
1.58.1 with litegraph nodes, 1.58.1 with Vue nodes): type into the visible text box (``text_box``),
measure a node where it is drawn (``NODE_BOX_JS``).

Screenshots go to ``$LONGALIGN_ARTIFACTS`` (default: pytest's temporary folder) and, in the whole-suite
leg (ComfyUI 0.3.75, front end 1.32.9), to ``docs/screenshots/`` for the README.
"""
from __future__ import annotations

import json
import os
import time
import urllib.request

import pytest

from comfy_inprocess import REPO
from comfy_matrix import leg
from comfy_server import vue_nodes
from ui_workflows import MODEL_WIDGETS, UI_EXAMPLES, load_ui, ui_to_api, write_thumbnail
from workflows import load_example

pytestmark = pytest.mark.server
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOTS = os.path.join(REPO, "docs", "screenshots")
TINY_NAMES = {"ckpt_name": "tiny_sd15.safetensors", "model_name": "tiny_denscore", "device": "cpu",
              "width": 64, "height": 64, "steps": 2}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    path = os.environ.get("LONGALIGN_ARTIFACTS") or str(tmp_path_factory.mktemp("browser-artifacts"))
    os.makedirs(path, exist_ok=True)
    os.makedirs(SCREENSHOTS, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def server(comfy_server):
    """The session's server with a tiny Denscore model and the first-run tutorial marked done."""
    from tiny_models import build_tiny_clipmodel

    target = os.path.join(comfy_server.base_dir, "models", "reward_models", "tiny_denscore")
    if not os.path.isdir(target):
        build_tiny_clipmodel(target)
    for setting in ("Comfy.TutorialCompleted", "Comfy.Minimap.Visible"):  # no first-run dialog, no minimap
        status, _ = comfy_server.request(f"/settings/{setting}", setting == "Comfy.TutorialCompleted")
        assert status == 200
    return comfy_server


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    assert os.access(CHROMIUM, os.X_OK), "Debian's chromium is missing: run tests/comfy_env.sh"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")  # the Nodes 2.0 banner
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url)
        page.wait_for_function("window.app?.graph && window.app.extensions?.some(e => e.name === 'LongAlign.FrontEnd')",
                               timeout=60_000)
        assert in_vue_mode(page) == vue_nodes()  # the leg's renderer is the one the page uses
        page.longalign_errors = errors
        yield page
        browser.close()


def load(page, ui: dict) -> None:
    """Load ``ui`` as a user opening the file would; the front end's schema check must pass."""
    page.evaluate("async (ui) => { await app.loadGraphData(ui, true, true, 'test'); }", ui)
    page.wait_for_timeout(300)
    assert "Invalid workflow" not in page.evaluate("document.body.innerText")


def in_vue_mode(page) -> bool:
    """Whether the front end draws the nodes as Vue components ("Nodes 2.0") rather than on the canvas."""
    return page.evaluate("!!app.extensionManager?.setting?.get?.('Comfy.VueNodes.Enabled')")


def screenshot(page, artifacts: str, name: str) -> str | None:
    """The whole graph at the saved view (the front end may keep the previous view), notifications
    closed, saved as ``name`` in ``artifacts`` and, in the whole-suite leg, in ``docs/screenshots``,
    whose path it then returns."""
    page.evaluate("() => { const ds = app.graph.extra.ds; app.canvas.ds.scale = ds.scale;"
                  " app.canvas.ds.offset = [...ds.offset]; app.canvas.setDirty(true, true); }")
    page.wait_for_timeout(300)
    close = ".p-toast-close-button, [data-testid=error-overlay-dismiss]"  # 1.58 names missing model files
    if page.evaluate(f"[...document.querySelectorAll('{close}')].map(b => b.click()).length"):
        page.wait_for_timeout(500)  # closed as a user would
    page.screenshot(path=os.path.join(artifacts, name))
    if leg() is not None:
        return None
    page.screenshot(path=os.path.join(SCREENSHOTS, name))
    return os.path.join(SCREENSHOTS, name)


def node_eval(page, node_id: int, body: str):
    """Evaluate ``body`` (a JS expression over ``node``) for the graph's node ``node_id``."""
    return page.evaluate(f"(id) => {{ const node = app.graph.getNodeById(id); return {body}; }}", node_id)


NODE_BOX_JS = """(node) => {  // where the node is drawn, title included: its Vue element, or its canvas rectangle
    const element = document.querySelector(`[data-node-id="${node.id}"]`);
    if (element) return element.getBoundingClientRect();
    const canvas = app.canvas.canvas.getBoundingClientRect();
    const [scale, [ox, oy]] = [app.canvas.ds.scale, app.canvas.ds.offset];
    return {left: canvas.left + (node.pos[0] + ox) * scale, right: canvas.left + (node.pos[0] + node.size[0] + ox) * scale,
            top: canvas.top + (node.pos[1] - LiteGraph.NODE_TITLE_HEIGHT + oy) * scale,
            bottom: canvas.top + (node.pos[1] + node.size[1] + oy) * scale};
}"""

VISIBLE_JS = """([id, widgetName]) => {
    const node = app.graph.getNodeById(id);
    const panel = node.widgets.find(w => w.name === widgetName).element;
    const box = (""" + NODE_BOX_JS + """)(node);
    const parts = panel.children.length ? [...panel.children] : [panel];
    const problems = [];
    if (getComputedStyle(panel).display === 'none' || panel.getClientRects().length === 0) problems.push('panel hidden');
    if (panel.scrollHeight > panel.clientHeight + 1) problems.push(`clipped: ${panel.scrollHeight} > ${panel.clientHeight}`);
    for (const part of parts) {
        const r = part.getBoundingClientRect();
        if (r.width === 0 || r.height === 0) problems.push(`empty: ${part.textContent}`);
        if (r.left < box.left - 1 || r.right > box.right + 1 || r.top < box.top - 1 || r.bottom > box.bottom + 1)
            problems.push(`outside the node: ${part.textContent} ${JSON.stringify(r)} ${JSON.stringify(box)}`);
        if (part.scrollWidth > part.clientWidth + 1) problems.push(`cut: ${part.textContent}`);
    }
    const panelBox = panel.getBoundingClientRect();
    if (panelBox.bottom > box.bottom + 1) problems.push('panel below the node');
    return {text: parts.map(p => p.textContent), problems};
}"""


def visible_text(page, node_id: int, widget_name: str) -> list[str]:
    """The lines of a node's panel, each asserted to lie whole inside the rendered node."""
    page.wait_for_timeout(200)  # the DOM widgets follow the canvas on the next frame
    shown = page.evaluate(VISIBLE_JS, [node_id, widget_name])
    assert shown["problems"] == [], shown
    return shown["text"]


def hidden_nodes(page) -> list[str]:
    """Nodes not wholly in view at the current view, or whose title the front end's own overlays
    (workflow menu, run bar) cover: the title's both ends and the node's corners must be in the
    canvas, and the title's ends must show the canvas or the node itself."""
    return page.evaluate("""() => {
        const canvas = app.canvas.canvas, rect = canvas.getBoundingClientRect();
        const scale = app.canvas.ds.scale, nodeBox = """ + NODE_BOX_JS + """;
        const bad = [];
        for (const node of app.graph.nodes) {
            const {left, right, top, bottom} = nodeBox(node);
            const element = document.querySelector(`[data-node-id="${node.id}"]`);
            const titleY = top + LiteGraph.NODE_TITLE_HEIGHT * scale / 2;
            const shows = (x, y) => { const hit = document.elementFromPoint(x, y);
                                      return hit === canvas || (element !== null && element.contains(hit)); };
            const points = [[left + 4, titleY], [right - 4, titleY], [left + 2, bottom - 2], [right - 2, bottom - 2]];
            const covered = points.filter(([x, y]) => x < rect.left || x > rect.right || y < rect.top || y > rect.bottom
                                                   || x > innerWidth || y > innerHeight
                                                   || (y === titleY && !shows(x, y)));
            if (covered.length) bad.push(`${node.title}: ${JSON.stringify(covered)}`);
        }
        return bad;
    }""")


def text_box(page, node_id: int, widget_name: str):
    """The text box a user types ``widget_name`` of node ``node_id`` into: the Vue node's textarea, or the
    litegraph widget's own element; asserted to be in the page and shown."""
    box = page.evaluate_handle("""([id, name]) => {
        const vue = document.querySelector(`[data-node-id="${id}"] [data-widget-name="${name}"] textarea`);
        if (vue) return vue;
        const element = app.graph.getNodeById(id).widgets.find(w => w.name === name).element;
        return element && document.contains(element) ? element : null;
    }""", [node_id, widget_name]).as_element()
    assert box is not None and box.is_visible(), f"no visible text box for {widget_name!r} of node {node_id}"
    return box


def model_files_missing(ui: dict, object_info: dict) -> set[str]:
    """Ids of ``ui``'s nodes that name a model file (``MODEL_WIDGETS``) the server does not offer."""
    missing = set()
    for node_id, node in ui_to_api(ui, object_info).items():
        info = object_info[node["class_type"]]["input"]
        specs = {**info.get("required", {}), **info.get("optional", {})}
        for name, value in node["inputs"].items():
            spec = specs[name]
            offered = spec[0] if isinstance(spec[0], list) else spec[1].get("options", []) if len(spec) > 1 else []
            if name in MODEL_WIDGETS and value not in offered:
                missing.add(node_id)
    return missing


def wait_for_history(server, node_id: str, timeout: float = 60.0) -> dict:
    """The finished history entry with an output from ``node_id`` (the UI shows a node's output
    before the whole prompt, and its history entry, is done)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [e for e in server.get("/history").values()
                if node_id in e["outputs"] and e["status"].get("completed") is not None]
        if done:
            return done[-1]
        time.sleep(0.25)
    raise TimeoutError(f"no finished prompt with an output from node {node_id} in /history")


def test_the_server_serves_the_front_end_and_the_extension(server, page):
    with urllib.request.urlopen(server.url + "/") as r:
        html = r.read().decode()
    assert "<div id=\"vue-app\"" in html or "comfy" in html.lower()
    with urllib.request.urlopen(server.url + "/extensions/ComfyUI-LongAlign/js/longalign.js") as r:
        assert "registerExtension" in r.read().decode()
    assert page.evaluate("!!LiteGraph.registered_node_types['LongAlignTextEncode']")


@pytest.mark.parametrize("name", list(UI_EXAMPLES))
def test_example_loads_with_no_missing_node_and_converts_like_the_python_side(server, page, artifacts, name):
    ui = load_ui(name)
    load(page, ui)
    types = page.evaluate("app.graph.nodes.map(n => n.type)")
    assert sorted(types) == sorted(n["type"] for n in ui["nodes"])
    # each node is its registered class (a missing type gives a placeholder); the only nodes a front end
    # flags are loaders naming a model file the test server lacks (1.58 flags those; 1.32 flags none)
    assert page.evaluate("app.graph.nodes.every(n => LiteGraph.registered_node_types[n.type]"
                         " && n instanceof LiteGraph.registered_node_types[n.type])")
    flagged = set(page.evaluate("app.graph.nodes.filter(n => n.has_errors).map(n => String(n.id))"))
    assert flagged <= model_files_missing(ui, server.get("/object_info")), flagged
    dialogs = page.evaluate("[...document.querySelectorAll('.p-dialog')].map(d => d.innerText)")
    assert not [d for d in dialogs if "missing" in d.lower()], dialogs
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    for node in prompt.values():
        node.pop("_meta", None)
    assert prompt == ui_to_api(ui, server.get("/object_info"))
    for element in page.evaluate("app.graph.nodes.filter(n => n.comfyClass === 'LongAlignTextEncode').map(n => n.id)"):
        page.wait_for_function("(id) => app.graph.getNodeById(id).widgets.find(w => w.name === 'longalign_counter')"
                               ".element.dataset.kept !== undefined", arg=element)
    readme_copy = screenshot(page, artifacts, name.replace(".json", ".png"))
    assert hidden_nodes(page) == []  # the template opens with every node in view, no title covered
    if readme_copy:
        write_thumbnail(readme_copy, name)  # the template browser's picture
    assert page.longalign_errors == []


def test_the_counter_shows_the_servers_segment_and_token_counts(server, page, artifacts):
    load(page, load_ui("long_prompt_sd15.json"))
    text = load_example("long_prompt_sd15_api.json")["2"]["inputs"]["text"]
    text = text + " " + text[: len(text) // 3]  # a new prompt, ~500 tokens
    status, expected = server.request("/longalign/tokenize", {"text": text, "token_length": 240, "split": "sentences"})
    assert status == 200 and expected["truncated"]
    box = text_box(page, 2, "text")
    box.fill(text)  # real input events on the text box, as typing gives
    counter = "node.widgets.find(w => w.name === 'longalign_counter').element"
    page.wait_for_function(f"(id) => {{ const node = app.graph.getNodeById(id); const c = {counter};"
                           f" return c.dataset.kept === '{expected['kept_tokens']}'; }}", arg=2, timeout=15_000)
    shown = node_eval(page, 2, f"({{lines: [...{counter}.children].map(d => d.textContent), title: {counter}.title, data: {{...{counter}.dataset}},"
                               f" color: getComputedStyle({counter}).color}})")
    n = len(expected["segments"])
    assert shown["data"]["segments"] == str(n)
    assert shown["data"]["tokens"] == ",".join(str(s["tokens"]) for s in expected["segments"])
    assert shown["data"]["state"] == "truncated" and shown["color"] == "rgb(240, 160, 48)"
    assert shown["lines"] == [f"240 of {expected['kept_tokens']} tokens kept · {n} segments · the rest is cut",
                              "per segment: " + " + ".join(str(s["tokens"]) for s in expected["segments"])]
    assert visible_text(page, 2, "longalign_counter") == shown["lines"]
    assert shown["title"].splitlines()[0] == f"1. [{expected['segments'][0]['tokens']}] {expected['segments'][0]['text']}"
    screenshot(page, artifacts, "counter_truncated.png")

    # a short prompt with L = 0: no warning, the natural length
    node_eval(page, 2, "(node.widgets.find(w => w.name === 'token_length').value = 0, true)")
    box.fill("A cat. A dog on a mat.")
    page.wait_for_function(f"(id) => {{ const node = app.graph.getNodeById(id); return {counter}.dataset.kept === '11'; }}",
                           arg=2, timeout=15_000)
    assert node_eval(page, 2, f"{counter}.dataset.state") == "ok"
    assert visible_text(page, 2, "longalign_counter") == [
        "11 tokens · 2 segments · L = 0: natural length, nothing cut", "per segment: 4 + 7"]


def test_the_counter_is_whole_inside_a_new_node_of_the_default_width(server, page):
    load(page, load_ui("long_prompt_sd15.json"))
    text = load_example("long_prompt_sd15_api.json")["2"]["inputs"]["text"] * 2  # many segments, cut at 240
    status, expected = server.request("/longalign/tokenize", {"text": text, "token_length": 240, "split": "sentences"})
    assert status == 200 and expected["truncated"] and len(expected["segments"]) > 8
    node_id = page.evaluate("""(text) => {
        const node = LiteGraph.createNode('LongAlignTextEncode');
        const [ox, oy] = app.canvas.ds.offset;
        node.pos = [40 - ox, 80 - oy];  // the top left of the view
        app.graph.add(node);
        node.widgets.find(w => w.name === 'text').value = text;
        node.longalignRefreshCounter();
        return node.id;
    }""", text)
    counter = "node.widgets.find(w => w.name === 'longalign_counter').element"
    page.wait_for_function(f"(id) => {{ const node = app.graph.getNodeById(id); return {counter}.dataset.kept === "
                           f"'{expected['kept_tokens']}'; }}", arg=node_id, timeout=15_000)
    assert visible_text(page, node_id, "longalign_counter") == [
        f"240 of {expected['kept_tokens']} tokens kept · {len(expected['segments'])} segments · the rest is cut",
        "per segment: " + " + ".join(str(s["tokens"]) for s in expected["segments"])]


def test_queued_best_of_n_graph_shows_the_scores_on_the_reward_nodes(server, page, artifacts):
    ui = load_ui("best_of_n_reward.json")
    load(page, ui)
    for node_id in (8, 10):  # before the run: the placeholder, whole inside the node
        assert visible_text(page, node_id, "longalign_scores") == ["scores appear here after a run"]
    prompt = next(n for n in ui["nodes"] if n["type"] == "PrimitiveStringMultiline")["widgets_values"][0]
    status, expected = server.request("/longalign/tokenize", {"text": prompt, "token_length": 240, "split": "sentences"})
    assert status == 200  # the positive encoder counts the prompt its linked text input gets
    page.wait_for_function("(id) => app.graph.getNodeById(id).widgets.find(w => w.name === 'longalign_counter')"
                           f".element.dataset.kept === '{expected['kept_tokens']}'", arg=2, timeout=15_000)
    page.evaluate("""(names) => {
        for (const node of app.graph.nodes)
            for (const w of node.widgets ?? []) if (w.name in names) w.value = names[w.name];
    }""", TINY_NAMES)
    page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    rows = "node.widgets.find(w => w.name === 'longalign_scores').element.querySelectorAll('tr[data-image]')"
    page.wait_for_function(f"(id) => {{ const node = app.graph.getNodeById(id); return {rows}.length === 4; }}",
                           arg=10, timeout=120_000)
    page.wait_for_function(f"(id) => {{ const node = app.graph.getNodeById(id); return {rows}.length === 4; }}",
                           arg=8, timeout=10_000)
    entry = wait_for_history(server, "10")
    assert entry["status"]["status_str"] == "success"
    summary = json.loads(entry["outputs"]["10"]["text"][0])
    ranking = json.loads(entry["outputs"]["8"]["text"][0])

    def table(node_id):
        return node_eval(page, node_id, f"[...{rows}].map(r => [r.dataset.image,"
                                        " Object.fromEntries([...r.querySelectorAll('td[data-field]')].map(td => [td.dataset.field, td.textContent]))])")

    shown = table(10)
    assert [image for image, _ in shown] == ["0", "1", "2", "3"]
    for image, cells in shown:
        for field in ("total", "text_relevant", "text_irrelevant", "reweighted"):
            assert cells[field] == f"{summary[field][int(image)]:.4f}"
    ranked = table(8)
    assert [int(image) for image, _ in ranked] == ranking["order"]
    chosen = node_eval(page, 8, f"[...{rows}].map(r => r.dataset.chosen)")
    assert chosen == ["true", "false", "false", "false"] and ranking["chosen"] == ranking["order"][:1]
    assert [cells["reweighted"] for _, cells in ranked] == [f"{x:.4f}" for x in ranking["scores"]]
    screenshot(page, artifacts, "best_of_n_scores.png")
    assert page.longalign_errors == []
