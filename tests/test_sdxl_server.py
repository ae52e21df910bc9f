"""The SDXL example in a real ComfyUI server (issue #17, items 4-5): stock ``CheckpointLoaderSimple``
detects an SDXL-format file as SDXL, stock ``LoraLoader`` loads every key of a LoRA written by the
trainer's own code (kohya ``lora_unet_*`` on that checkpoint's UNet, ``lora_te1_`` / ``lora_te2_`` on
CLIP-L and bigG), and the image changes with the LoRA's strength.

The checkpoint (SPEC §9: full-size text encoders, ~1.9 GB fp16) is built once per machine into the
tiny cache; the server is this module's own (the session's shared server has only SD1.5)."""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from comfy_inprocess import REPO
from ui_workflows import check_against_object_info, load_ui, ui_to_api
from workflows import load_example, shrink

pytestmark = pytest.mark.server
PACK_NAME = "ComfyUI-LongAlign"
CKPT, LORA = "tiny_sdxl.safetensors", "tiny_sdxl_lora.safetensors"


def _perturb_up(module: torch.nn.Module, std: float, seed: int) -> None:
    """Non-zero LoRA ``up`` (peft's B) weights: the trainer starts them at 0, a trained LoRA has moved them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def build_sdxl_lora(path: str) -> dict[str, torch.Tensor]:
    """A rank-4 kohya LoRA for the detected-SDXL checkpoint's UNet and both text encoders, written with
    the trainer's export (``add_lora`` + ``kohya_state_dict``; ``add_text_encoder_lora`` +
    ``text_encoder_kohya_state_dict`` with SDXL's prefixes) and its SDXL metadata."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tiny_models import SDXL_CLIP_G, SDXL_CLIP_L, detected_sdxl_unet
    from training.families import SDXL
    from training.lora import add_lora, add_text_encoder_lora, kohya_state_dict, text_encoder_kohya_state_dict
    from training.safe_io import save_tensors

    unet = detected_sdxl_unet()
    add_lora(unet, 4, 4.0)
    _perturb_up(unet, 0.05, 0)
    lora = kohya_state_dict(unet, 4.0)
    del unet
    for prefix, cls, widths in zip(SDXL.lora_te_prefixes, (CLIPTextModel, CLIPTextModelWithProjection),
                                   (SDXL_CLIP_L, SDXL_CLIP_G)):
        torch.manual_seed(0)  # two layers at the full widths: keys for layers 0-1 of the full encoders
        encoder = cls(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **{**widths, "num_hidden_layers": 2}))
        add_text_encoder_lora(encoder, 4, 4.0)
        _perturb_up(encoder, 0.05, 1)
        lora.update(text_encoder_kohya_state_dict(encoder, 4.0, prefix=prefix))
    save_tensors(lora, path, metadata=SDXL.lora_metadata())
    return lora


@pytest.fixture(scope="module")
def sdxl_server(tmp_path_factory, tiny_sdxl_checkpoint):
    """A ComfyUI server with this pack, the detected-SDXL checkpoint and the trainer-format SDXL LoRA."""
    from comfy_server import ComfyServer
    from conftest import comfyui_dir

    base = tmp_path_factory.mktemp("comfy-sdxl")
    os.makedirs(base / "custom_nodes")
    os.symlink(REPO, base / "custom_nodes" / PACK_NAME)
    server = ComfyServer(comfyui_dir(), str(base), str(base / "server.log"))
    os.symlink(tiny_sdxl_checkpoint, os.path.join(server.model_folder("checkpoints"), CKPT))
    server.lora = build_sdxl_lora(os.path.join(server.model_folder("loras"), LORA))
    server.start()
    yield server
    server.stop()


def test_sdxl_example_runs_with_the_trained_lora_on_a_checkpoint_comfyui_detects_as_sdxl(sdxl_server):
    workflow = shrink(load_example("long_prompt_sdxl_api.json"), CKPT, lora_name=LORA, prefix="sdxl")
    positive = workflow["2"]["inputs"]
    assert positive["clip"] == ["8", 1] and len(positive["text"]) > 1000
    positive["text"] = ". ".join(positive["text"].split(". ")[:2]) + "."  # one segment: ComfyUI runs bigG in fp16 on CPU
    assert {n["class_type"] for n in workflow.values()} >= {"CheckpointLoaderSimple", "LongAlignTextEncode",
                                                            "LoraLoader", "KSampler", "VAEDecode", "SaveImage"}
    (lora_node,) = [n for n in workflow.values() if n["class_type"] == "LoraLoader"]
    with_lora = sdxl_server.image(workflow)
    off = copy.deepcopy(workflow)
    for node in off.values():
        if node["class_type"] == "LoraLoader":
            node["inputs"]["strength_model"] = node["inputs"]["strength_clip"] = 0.0
    without = sdxl_server.image(off)
    log = sdxl_server.log()
    assert "model_type EPS" in log and "Requested to load SDXL\n" in log.replace("\r", ""), log[-3000:]
    assert "SDXLClipModel" in log
    assert "lora key not loaded" not in log, [l for l in log.splitlines() if "lora key not loaded" in l][:5]
    assert lora_node["inputs"]["strength_model"] == 1.0
    assert with_lora.shape == without.shape == (64, 64, 3)
    assert np.abs(with_lora - without).mean() > 1.0
    stems = {k.rsplit(".", 2)[0] if ".lora_" in k else k.rsplit(".", 1)[0] for k in sdxl_server.lora}
    assert {s.split("_")[1] for s in stems} == {"unet", "te1", "te2"}
    assert "lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_attn2_to_k" in stems  # the 10-deep blocks, bigG-wide context


def test_sdxl_template_is_the_graph_of_its_api_twin(sdxl_server):
    object_info = sdxl_server.get("/object_info")
    ui = load_ui("long_prompt_sdxl.json")
    check_against_object_info(ui, object_info)
    api = load_example("long_prompt_sdxl_api.json")
    for node in api.values():
        node.pop("_meta", None)
    assert ui_to_api(ui, object_info) == api
    loaders = {n["type"]: n["widgets_values"][0] for n in ui["nodes"] if n["type"] in ("CheckpointLoaderSimple", "LoraLoader")}
    assert loaders == {"CheckpointLoaderSimple": "sd_xl_base_1.0.safetensors",
                       "LoraLoader": "longalign_sdxl_align.safetensors"}  # real names; the tests substitute tiny ones
    (latent,) = [n for n in ui["nodes"] if n["type"] == "EmptyLatentImage"]
    assert latent["widgets_values"][:2] == [1024, 1024]
