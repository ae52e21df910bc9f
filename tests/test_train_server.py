"""LongAlign Train LoRA in the real server (CPU, loopback) on the trainable tiny checkpoint: the
trainer runs as a child process while the server keeps answering; progress on the websocket; the
LoRA in models/loras and in LoraLoader's list; Cancel checkpoints and resume finishes the same LoRA;
bad inputs are refused naming the input, writing nothing; a second prompt waits in the queue."""
from __future__ import annotations

import os
import time

import pytest
import torch

from train_graph import TRAIN, TRAIN_CKPT, Listener, finished, prepare, train_prompt
from workflows import load_example, shrink

pytestmark = pytest.mark.server
STEPS = 3


@pytest.fixture(scope="module")
def server(comfy_server, server_train_checkpoint):
    assert server_train_checkpoint == TRAIN_CKPT
    prepare(comfy_server)
    return comfy_server


def _lora(server, name: str) -> str:
    return os.path.join(server.model_folder("loras"), f"{name}.safetensors")


def _run_dir(server, name: str) -> str:
    return os.path.join(server.base_dir, "output", "longalign_runs", name)


def _written(server) -> set[str]:
    """Every file under models/loras and the run folders."""
    roots = [server.model_folder("loras"), os.path.join(server.base_dir, "output", "longalign_runs")]
    return {os.path.join(folder, f) for root in roots for folder, _, files in os.walk(root) for f in files}


def _system_stats_seconds(server) -> float:
    started = time.perf_counter()
    status, body = server.request("/system_stats", timeout=10)
    assert status == 200 and "system" in body
    return time.perf_counter() - started


@pytest.fixture(scope="module")
def straight_run(server):
    """One uninterrupted run, watched on the websocket, with a second prompt queued behind it and
    /system_stats timed while it trains."""
    with Listener(server) as ws:
        prompt_id = ws.queue(server, train_prompt("straight", steps=STEPS))
        ws.wait_for(lambda m: m["type"] == "executing" and m["data"].get("node") == TRAIN, what="the train node start")
        second = ws.queue(server, shrink(load_example("long_prompt_sd15_api.json"), "tiny_sd15.safetensors"))
        queue = server.get("/queue")
        pending = [item[1] for item in queue["queue_pending"]]
        running = [item[1] for item in queue["queue_running"]]
        timings = []
        while not server.get(f"/history/{prompt_id}"):
            timings.append(_system_stats_seconds(server))
            time.sleep(0.2)
        entry = finished(server, prompt_id)
        second_entry = finished(server, second)
        ws.wait_for(lambda m: m["type"] == "executing" and m["data"].get("node") is None
                    and m["data"].get("prompt_id") == second, what="the second prompt's end")
        messages = list(ws.messages)
    return {"prompt_id": prompt_id, "entry": entry, "messages": messages, "timings": timings,
            "second": second, "second_entry": second_entry, "pending": pending, "running": running}


def test_a_run_reports_progress_and_writes_the_lora_that_loraloader_lists(server, straight_run):
    entry = straight_run["entry"]
    assert entry["status"]["status_str"] == "success", entry["status"]
    prompt_id = straight_run["prompt_id"]
    messages = straight_run["messages"]
    progress = [m["data"] for m in messages if m["type"] == "progress" and m["data"]["prompt_id"] == prompt_id]
    assert progress and all(p["node"] == TRAIN and p["max"] == STEPS for p in progress)
    values = [p["value"] for p in progress]
    assert values == sorted(values) and values[-1] == STEPS
    ours = [m["data"] for m in messages if m["type"] == "longalign.train" and m["data"]["prompt_id"] == prompt_id]
    steps = [m for m in ours if "step" in m]
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1))
    assert all(m["node"] == TRAIN and m["total"] == STEPS and {"loss", "reward"} <= set(m["scalars"]) for m in steps)
    assert ours[-1]["status"] == "done" and "straight.safetensors" in ours[-1]["message"]
    assert any(m["type"] == "binary" for m in messages), "no validation image preview was sent"

    lora = _lora(server, "straight")
    assert os.path.isfile(lora)
    from training.safe_io import load_tensors

    weights = load_tensors(lora)
    assert weights and all(k.startswith("lora_unet_") for k in weights)
    assert "straight.safetensors" in server.get("/object_info/LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"][0]
    output = entry["outputs"][TRAIN]
    assert output["images"] and output["images"][0]["type"] == "output"
    assert os.path.isfile(os.path.join(server.base_dir, "output", output["images"][0]["subfolder"],
                                       output["images"][0]["filename"]))


def test_the_server_answers_within_a_second_while_it_trains(straight_run):
    timings = straight_run["timings"]
    assert len(timings) >= 3, timings  # measured while the job ran
    assert max(timings) < 1.0, timings


def test_a_second_prompt_waits_in_the_queue_until_the_run_ends(straight_run):
    assert straight_run["running"] == [straight_run["prompt_id"]]
    assert straight_run["pending"] == [straight_run["second"]]
    assert straight_run["second_entry"]["status"]["status_str"] == "success"
    started = {m["data"]["prompt_id"]: i for i, m in enumerate(straight_run["messages"]) if m["type"] == "execution_start"}
    ended = [i for i, m in enumerate(straight_run["messages"])
             if m["type"] == "execution_success" and m["data"]["prompt_id"] == straight_run["prompt_id"]]
    assert ended and started[straight_run["second"]] > ended[0]


def test_cancel_checkpoints_and_resume_finishes_the_same_lora(server, straight_run):
    from training.safe_io import load_tensors

    name = "cancelled"
    with Listener(server) as ws:
        prompt_id = ws.queue(server, train_prompt(name, steps=STEPS))
        ws.wait_for(lambda m: m["type"] == "longalign.train" and m["data"].get("step") == 1, what="step 1")
        status, _ = server.request("/interrupt", {"prompt_id": prompt_id})
        assert status == 200
        entry = finished(server, prompt_id)
        ws.wait_for(lambda m: m["type"] == "longalign.train" and m["data"].get("status") == "cancelled",
                    what="the cancelled message")
        messages = list(ws.messages)
    assert entry["status"]["status_str"] == "error"
    assert any(m["type"] == "execution_interrupted" for m in messages)
    cancelled = [m["data"] for m in messages if m["type"] == "longalign.train" and m["data"].get("status")][-1]
    assert "resume" in cancelled["message"]
    checkpoints = os.listdir(os.path.join(_run_dir(server, name), "checkpoints"))
    assert checkpoints and all(c.startswith("step-") for c in checkpoints)
    assert not os.path.exists(_lora(server, name))

    resumed = finished(server, server.queue(train_prompt(name, steps=STEPS, resume=True))[1]["prompt_id"])
    assert resumed["status"]["status_str"] == "success", resumed["status"]
    a, b = load_tensors(_lora(server, "straight")), load_tensors(_lora(server, name))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4, msg=key)


BAD_INPUTS = [
    ("ckpt_name", {"ckpt_name": "missing.safetensors"}),
    ("prompts", {"prompts": "  \n "}),
    ("lora_name", {"lora_name": "../escape"}),
    ("lora_name", {"lora_name": "sub/dir"}),
    ("lora_name", {"lora_name": "straight"}),  # exists; neither resume nor overwrite
    ("reward_model", {"reward_model": None}),
]


@pytest.mark.parametrize("input_name, change", BAD_INPUTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_INPUTS)])
def test_a_bad_input_is_refused_naming_it_and_nothing_is_written(server, straight_run, input_name, change):
    prompt = train_prompt("refused", steps=STEPS)
    prompt[TRAIN]["inputs"].update(change)
    if change.get("reward_model", 0) is None:
        del prompt[TRAIN]["inputs"]["reward_model"]
        del prompt["1"]
    before = _written(server)
    status, body = server.queue(prompt)
    if status == 200:
        entry = finished(server, body["prompt_id"])
        assert entry["status"]["status_str"] == "error"
        error = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
        text = error["exception_message"]
    else:
        text = str(body["node_errors"][TRAIN])
    assert input_name in text, text
    assert _written(server) == before
