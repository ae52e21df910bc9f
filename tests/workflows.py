"""The API-format example workflows, shrunk for CPU tests (tiny checkpoint, 64x64, 2 steps).

``example_workflows/`` holds the UI-format templates the front end lists; their API-format twins
(what ``POST /prompt`` takes) live in ``example_workflows_api/``."""
from __future__ import annotations

import copy
import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "example_workflows")
API_EXAMPLES = os.path.join(REPO, "example_workflows_api")


def load_example(name: str) -> dict:
    """An API-format example from :data:`API_EXAMPLES`."""
    with open(os.path.join(API_EXAMPLES, name), encoding="utf-8") as f:
        return json.load(f)


def shrink(workflow: dict, ckpt_name: str, steps: int = 2, size: int = 64, prefix: str | None = None,
           lora_name: str | None = None) -> dict:
    """The same graph on the tiny checkpoint (and LoRA): every loader, latent size and sampler made small."""
    wf = copy.deepcopy(workflow)
    for node in wf.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = ckpt_name
        elif node["class_type"] == "EmptyLatentImage":
            inputs["width"] = inputs["height"] = size
        elif node["class_type"] == "KSampler":
            inputs["steps"] = steps
        elif node["class_type"] == "LoraLoader" and lora_name:
            inputs["lora_name"] = lora_name
        elif node["class_type"] == "SaveImage" and prefix:
            inputs["filename_prefix"] = prefix
    return wf


def replace_encoder_with_stock(workflow: dict) -> dict:
    """The control graph: every LongAlign Text Encode swapped for the stock CLIP Text Encode."""
    wf = copy.deepcopy(workflow)
    for node in wf.values():
        if node["class_type"] == "LongAlignTextEncode":
            node["class_type"] = "CLIPTextEncode"
            node["inputs"] = {"clip": node["inputs"]["clip"], "text": node["inputs"]["text"]}
    return wf
