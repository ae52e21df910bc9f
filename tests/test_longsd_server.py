"""Integration: LongSD Loader, T5 Adapter Loader and the ct5f conditioning in the real ComfyUI server."""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from tiny_models import TINY_UNET_CONFIG, reference_lora_list, tiny_t5_encoder, tiny_text_adapter, tiny_unet
from training.convert_lora import convert
from workflows import load_example, shrink

pytestmark = pytest.mark.server
PROMPT = "A lighthouse on a cliff at dusk. Waves crash on black rocks; a red boat rocks at the pier."


@pytest.fixture(scope="module")
def longsd_models(comfy_server):
    """Tiny LongSD files in the server's model folders: two .pt lists, their conversions, T5 + adapter."""
    loras, encoders = comfy_server.model_folder("loras"), comfy_server.model_folder("text_encoders")
    unet = tiny_unet(0)
    for seed, name in ((1, "tiny_align"), (2, "tiny_reward")):
        torch.save(reference_lora_list(unet, rank=4, seed=seed, up_std=0.2), os.path.join(loras, name + ".pt"))
        convert(os.path.join(loras, name + ".pt"), os.path.join(loras, name + ".safetensors"), TINY_UNET_CONFIG)
    tiny_t5_encoder().save_pretrained(os.path.join(encoders, "tiny-t5"))
    tiny_text_adapter().save_pretrained(os.path.join(encoders, "tiny_adapter"))
    return comfy_server


def _graph(model_nodes: dict, model_ref: list, prefix: str) -> dict:
    wf = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": PROMPT}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": model_ref, "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 7, "steps": 2, "cfg": 7.5,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }
    wf.update(copy.deepcopy(model_nodes))
    return wf


def test_object_info_lists_the_longsd_nodes(longsd_models):
    info = longsd_models.get("/object_info/LongAlignLongSDLoader")["LongAlignLongSDLoader"]
    required = info["input"]["required"]
    assert {"tiny_align.pt", "tiny_align.safetensors", "None"} <= set(required["alignment_lora"][0])
    assert info["output"] == ["MODEL", "CLIP"] and info["display_name"].startswith("LongSD Loader")
    old = longsd_models.get("/object_info/LongSDLoader")["LongSDLoader"]  # the old id: loads, marked deprecated
    assert old["deprecated"] is True and old["input"] == info["input"] and "deprecated" not in info
    t5 = longsd_models.get("/object_info/LongAlignT5AdapterLoader")["LongAlignT5AdapterLoader"]["input"]["required"]
    assert t5["t5_name"][0] == ["tiny-t5/"]  # the folder, not the weight files inside it
    assert t5["adapter_name"][0] == ["tiny_adapter/"]
    encode = longsd_models.get("/object_info/LongAlignTextEncode")["LongAlignTextEncode"]["input"]
    assert encode["optional"]["t5_adapter"][0] == "T5_ADAPTER"


def test_stock_loraloader_on_converted_files_gives_the_same_image(longsd_models):
    """LongSD Loader on the .pt lists == two stock LoraLoaders on the converted safetensors (same
    seed), and both differ from the model without LoRA; no LoRA key is left unloaded."""
    server = longsd_models
    ours = server.image(_graph({"10": {"class_type": "LongSDLoader", "inputs": {
        "model": ["1", 0], "alignment_lora": "tiny_align.pt", "alignment_strength": 1.0,
        "reward_lora": "tiny_reward.pt", "reward_strength": 1.0}}}, ["10", 0], "longsd"))
    stock = server.image(_graph({
        "10": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": "tiny_align.safetensors",
                                                      "strength_model": 1.0, "strength_clip": 1.0}},
        "11": {"class_type": "LoraLoader", "inputs": {"model": ["10", 0], "clip": ["10", 1], "lora_name": "tiny_reward.safetensors",
                                                      "strength_model": 1.0, "strength_clip": 1.0}},
    }, ["11", 0], "stock"))
    plain = server.image(_graph({}, ["1", 0], "plain"))
    assert np.array_equal(ours, stock)
    assert np.abs(ours - plain).max() > 0
    assert "lora key not loaded" not in server.log() and "NOT LOADED" not in server.log()


def test_longsd_example_workflow_runs_with_ct5f_conditioning(longsd_models):
    wf = shrink(load_example("longsd_long_prompt_api.json"), "tiny_sd15.safetensors", prefix="longsd_example")
    loader, t5 = wf["2"]["inputs"], wf["3"]["inputs"]
    assert (loader["alignment_lora"], loader["reward_lora"]) == ("s28750_lora_vis.pt", "sd15-reward-3750.pt")
    loader.update(alignment_lora="tiny_align.pt", reward_lora="tiny_reward.pt")
    t5.update(t5_name="tiny-t5/", adapter_name="tiny_adapter/")
    assert wf["4"]["inputs"]["t5_adapter"] == wf["5"]["inputs"]["t5_adapter"] == ["3", 0]
    entry = longsd_models.run(wf)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["outputs"]["9"]["images"]
