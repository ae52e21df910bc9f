"""The train-from-the-graph template in the real front end: queued from the page on the tiny models,
LongAlign Train LoRA shows ComfyUI's progress bar and its live loss / reward plot while the trainer
runs, then the last validation image; the sampling after it runs with the new LoRA, and Load LoRA lists
it without a reload. Writes the README's screenshot ``docs/screenshots/train_from_graph.png``."""
from __future__ import annotations

import json
import os

import pytest

from test_browser import artifacts, load, page, screenshot, wait_for_history  # noqa: F401 (fixtures)
from train_graph import REWARD_MODEL, TRAIN_CKPT, prepare
from ui_workflows import load_ui

pytestmark = pytest.mark.server
TRAIN_NODE = 4
STEPS = 3
PLOT = "node.widgets.find(w => w.name === 'longalign_train_plot').element"


@pytest.fixture(scope="module")
def server(comfy_server, server_train_checkpoint):
    """The session's server ready to train, the first-run tutorial and the minimap off."""
    assert server_train_checkpoint == TRAIN_CKPT
    prepare(comfy_server)
    for setting in ("Comfy.TutorialCompleted", "Comfy.Minimap.Visible"):
        status, _ = comfy_server.request(f"/settings/{setting}", setting == "Comfy.TutorialCompleted")
        assert status == 200
    return comfy_server


def _plot(page) -> dict:
    return page.evaluate(f"(id) => {{ const node = app.graph.getNodeById(id); const el = {PLOT};"
                         " return {...el.dataset, caption: el.querySelector('.caption').textContent,"
                         " height: el.querySelector('canvas').clientHeight,"
                         " inked: (() => { const c = el.querySelector('canvas');"
                         "   const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                         "   let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n; })() }; }",
                         TRAIN_NODE)


def test_the_template_trains_with_progress_and_a_live_plot_then_samples_with_the_lora(server, page, artifacts):
    log_start = len(server.log())
    load(page, load_ui("train_reward_lora.json"))
    empty = _plot(page)
    assert empty["points"] == "0" and empty["caption"] == "loss and reward appear here while it trains"
    assert empty["height"] > 100
    names = {"ckpt_name": TRAIN_CKPT, "model_name": REWARD_MODEL, "device": "cpu",
             "width": 64, "height": 64, "steps": 2}
    train = {"steps": STEPS, "rank": 4, "lr": 1e-3, "resolution": 32, "lora_name": "from_the_page",
             "sampling_steps": 2, "batch_size": 1, "validate_every": STEPS}
    page.evaluate("""([names, train, trainId]) => {
        for (const node of app.graph.nodes)
            for (const w of node.widgets ?? []) {
                const values = String(node.id) === String(trainId) ? {...names, ...train} : names;
                if (w.name in values) w.value = values[w.name];
            }
    }""", [names, train, TRAIN_NODE])
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    assert {k: prompt[str(TRAIN_NODE)]["inputs"][k] for k in train} == train  # what will be queued
    page.evaluate("async () => { await app.queuePrompt(0, 1); }")

    # while it trains: ComfyUI's progress bar on the node, the plot growing
    page.wait_for_function(f"(id) => {{ const node = app.graph.getNodeById(id); return Number({PLOT}.dataset.points) >= 1"
                           " && node.progress > 0; }", arg=TRAIN_NODE, timeout=600_000)
    running = _plot(page)
    assert running["status"] == "running" and running["total"] == str(STEPS)
    assert running["caption"].startswith(f"step {running['step']} / {STEPS}") and "loss" in running["caption"]
    assert running["inked"] > 200  # axes and at least one series drawn
    page.screenshot(path=os.path.join(artifacts, "train_from_graph_running.png"))  # for a look, not the README

    page.wait_for_function(f"(id) => {{ const node = app.graph.getNodeById(id); return {PLOT}.dataset.status === 'done'; }}",
                           arg=TRAIN_NODE, timeout=600_000)
    entry = wait_for_history(server, "17", timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    done = _plot(page)
    assert done["points"] == str(STEPS) and done["step"] == str(STEPS)
    assert "from_the_page.safetensors" in done["caption"]
    history = json.loads(entry["outputs"][str(TRAIN_NODE)]["longalign_train"][0])["history"]
    assert [p["step"] for p in history] == list(range(1, STEPS + 1))
    page.wait_for_function("(id) => app.graph.getNodeById(id).imgs?.length > 0", arg=TRAIN_NODE, timeout=10_000)
    for rank_node in ("14", "15"):  # best of N before and after training, both scored
        assert json.loads(entry["outputs"][rank_node]["text"][0])["order"]
    assert "lora key not loaded" not in server.log()[log_start:]  # the model output carries every LoRA weight
    screenshot(page, artifacts, "train_from_graph.png")
    # the model lists were refreshed when the LoRA was written: a new Load LoRA offers it without a reload
    page.wait_for_function("""() => {
        const node = LiteGraph.createNode('LoraLoader');
        const found = node.widgets.find(w => w.name === 'lora_name').options.values.includes('from_the_page.safetensors');
        node.onRemoved?.();
        return found;
    }""", timeout=10_000)
    assert page.longalign_errors == []
