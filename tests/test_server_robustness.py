"""50 prompts queued at once into the real ComfyUI server, a quarter of them broken: the valid ones
all complete, the invalid ones fail with our messages (validation errors as HTTP 400 with
node_errors, runtime errors in /history), no file runs code, and the server keeps serving."""
from __future__ import annotations

import copy
import os
import random
import time

import pytest
import torch

from test_safety import RunsCode
from workflows import load_example, shrink

pytestmark = pytest.mark.server
N_PROMPTS = 50
DEADLINE_S = 480
TEXTS = ["A cat. A hat.", "", "((a:1.2) b:", "(:) \\( 😀 “naïve” — café. " * 12, "word " * 120, "\x00\u200b."]


@pytest.fixture(scope="module")
def bad_loras(comfy_server, tmp_path_factory):
    """Broken LoRA files in the server's models/loras: (file name, the message we expect)."""
    loras = comfy_server.model_folder("loras")
    sentinel = str(tmp_path_factory.mktemp("sentinel") / "PWNED")
    with open(os.path.join(loras, "robust_corrupt.safetensors"), "wb") as f:
        f.write(os.urandom(4096))
    open(os.path.join(loras, "robust_empty.safetensors"), "wb").close()
    torch.save([torch.zeros(4, 4), RunsCode(sentinel)], os.path.join(loras, "robust_hostile.pt"))
    torch.save([torch.zeros(4, 4)] * 2, os.path.join(loras, "robust_wrong_shape.pt"))
    yield {
        "robust_corrupt.safetensors": "is not a readable safetensors file",
        "robust_empty.safetensors": "is empty (0 bytes)",
        "robust_hostile.pt": "could not be loaded as a weights-only PyTorch file",
        "robust_wrong_shape.pt": "the file was made for a different architecture",
    }
    assert not os.path.exists(sentinel), "a LoRA file ran code inside the server"


_ENCODER: dict = {}


def valid_prompt(rng: random.Random) -> dict:
    """The example graph at 64x64, 1 step, a new seed; every third prompt also new encoder inputs
    (the others reuse them, so ComfyUI's cache skips the full-size CLIP and the loop stays short)."""
    wf = shrink(load_example("long_prompt_sd15_api.json"), "tiny_sd15.safetensors", steps=1, prefix="robust")
    if not _ENCODER or rng.random() < 1 / 3:
        _ENCODER.update(positive=dict(text=rng.choice(TEXTS), token_length=rng.choice([0, 1, 77, 240, 1000]),
                                      split=rng.choice(["sentences", "native"]), pad=rng.choice(["mean", "none"]),
                                      keep_bos=rng.choice([True, False])),
                        negative=rng.choice(TEXTS))  # the negative keeps 240 tokens: lengths may differ
    wf["2"]["inputs"].update(_ENCODER["positive"])
    wf["3"]["inputs"]["text"] = _ENCODER["negative"]
    wf["5"]["inputs"]["seed"] = rng.randrange(2**32)
    return wf


def with_longsd_loader(wf: dict, lora: str) -> dict:
    wf = copy.deepcopy(wf)
    wf["10"] = {"class_type": "LongSDLoader", "inputs": {
        "model": ["1", 0], "alignment_lora": lora, "alignment_strength": 1.0, "reward_lora": "None",
        "reward_strength": 1.0}}
    wf["5"]["inputs"]["model"] = ["10", 0]
    return wf


def validation_error(rng: random.Random, i: int) -> tuple[dict, str, str]:
    """A prompt ComfyUI refuses before running it: (workflow, node id, a word of the error)."""
    wf = valid_prompt(rng)
    case = i % 4
    if case == 0:
        wf["2"]["inputs"]["split"] = "words"
        return wf, "2", "split"
    if case == 1:
        wf["2"]["inputs"]["token_length"] = -5
        return wf, "2", "token_length"
    if case == 2:
        del wf["2"]["inputs"]["text"]
        return wf, "2", "text"
    return with_longsd_loader(wf, "no_such_lora.pt"), "10", "alignment_lora"


def history_message(entry: dict) -> str:
    for event, data in entry["status"].get("messages", []):
        if event == "execution_error":
            return f"{data.get('node_type')}: {data.get('exception_message')}"
    return ""


def test_fifty_queued_prompts_some_broken_and_the_server_keeps_serving(comfy_server, bad_loras):
    rng = random.Random(8)
    kinds = ["valid"] * 36 + ["validation"] * 6 + ["runtime"] * 8
    rng.shuffle(kinds)
    kinds[-1], kinds[kinds.index("valid")] = "valid", kinds[-1]  # the last prompt is a valid one
    assert len(kinds) == N_PROMPTS
    queued: list[tuple[str, str, str]] = []  # (prompt id, kind, expected message)
    refused = 0
    for i, kind in enumerate(kinds):
        if kind == "validation":
            wf, node, word = validation_error(rng, i)
            status, body = comfy_server.queue(wf)
            assert status == 400, (status, body)
            assert node in body["node_errors"], body
            assert word in str(body["node_errors"][node]), body
            refused += 1
            continue
        if kind == "runtime":
            lora = sorted(bad_loras)[i % len(bad_loras)]
            wf, expected = with_longsd_loader(valid_prompt(rng), lora), bad_loras[lora]
        else:
            wf, expected = valid_prompt(rng), ""
        status, body = comfy_server.queue(wf)
        assert status == 200, (status, body)
        queued.append((body["prompt_id"], kind, expected))
    assert refused == 6

    deadline = time.monotonic() + DEADLINE_S
    results: dict[str, dict] = {}
    while len(results) < len(queued) and time.monotonic() < deadline:
        for prompt_id, _, _ in queued:
            if prompt_id not in results:
                entry = comfy_server.get(f"/history/{prompt_id}").get(prompt_id)
                if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
                    results[prompt_id] = entry
        time.sleep(0.5)
    assert len(results) == len(queued), f"{len(queued) - len(results)} prompts unfinished after {DEADLINE_S}s"

    for prompt_id, kind, expected in queued:
        entry = results[prompt_id]
        if kind == "valid":
            assert entry["status"]["status_str"] == "success", (prompt_id, history_message(entry))
            assert entry["outputs"]["7"]["images"], prompt_id
        else:
            assert entry["status"]["status_str"] == "error", prompt_id
            message = history_message(entry)
            assert message.startswith("LongSDLoader: ") and expected in message, message
    assert comfy_server.request("/object_info")[0] == 200
    assert comfy_server.request("/queue")[1] == {"queue_running": [], "queue_pending": []}
