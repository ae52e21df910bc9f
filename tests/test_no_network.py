"""No loader of the pack opens a connection. ``conftest.py`` fails any test that tries to reach a
non-loopback address (``tests/network_guard.py``); here every loader runs on folders whose configs
name hub models, hub tokenizers and pretrained towers, and must load from the local files or refuse
with a :class:`ModelFileError` naming the file and the field, without a connection attempt."""
from __future__ import annotations

import copy
import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading

import pytest
import torch

import network_guard
from test_comat import make_tiny_blip
from tiny_models import (TINY_OPEN_CLIP, build_tiny_clipmodel, build_tiny_open_clip, reference_lora_list, tiny_t5_encoder,
                         tiny_text_adapter)
from training.safe_io import ModelFileError, save_tensors

HUB_ID = "openai/clip-vit-large-patch14"


# -- the guard itself --------------------------------------------------------------------------

@pytest.mark.parametrize("attempt", [
    lambda: socket.create_connection(("203.0.113.7", 443), timeout=0.2),
    lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(("198.51.100.1", 80)),
    lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).connect_ex(("192.0.2.1", 80)),
    lambda: socket.getaddrinfo("huggingface.co", 443),
    lambda: socket.gethostbyname("example.com"),
])
def test_the_guard_refuses_and_records_every_kind_of_attempt(attempt):
    with pytest.raises(network_guard.NetworkBlocked):
        attempt()
    assert len(network_guard.take_attempts()) == 1  # taken: this test made it on purpose


def test_the_guard_catches_a_hub_download_that_the_library_swallows(monkeypatch):
    """huggingface_hub retries and wraps network errors; the attempt is still recorded, so a loader
    that catches every exception cannot hide one."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "1")
    with pytest.raises(Exception):
        huggingface_hub.hf_hub_download(HUB_ID, "config.json", cache_dir=os.devnull + "-none")
    tried = network_guard.take_attempts()
    assert tried and "huggingface.co" in " ".join(tried), tried


def test_the_guard_covers_the_python_processes_the_tests_start():
    """The trainer CLIs and the ComfyUI server run in subprocesses: they install the guard at start
    (``tests/netguard_site``) and log each attempt, which fails the test that started them."""
    server = socket.create_server(("127.0.0.1", 0))
    code = ("import socket\n"
            f"socket.create_connection(('127.0.0.1', {server.getsockname()[1]}), timeout=5).close()\n"
            "socket.create_connection(('203.0.113.9', 80), timeout=0.2)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    server.close()
    assert out.returncode != 0 and "NetworkBlocked" in out.stderr, out.stderr[-2000:]
    tried = network_guard.take_attempts()
    assert len(tried) == 1 and "203.0.113.9" in tried[0], tried


def test_the_guard_lets_loopback_through():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    accepted = []
    thread = threading.Thread(target=lambda: [accepted.append(server.accept()[0]) for _ in range(3)])
    thread.start()
    for host in ("127.0.0.1", "localhost"):
        socket.create_connection((host, port), timeout=5).close()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        assert s.connect_ex(("127.0.0.1", port)) == 0
    thread.join(5)
    server.close()
    assert len(accepted) == 3 and network_guard.take_attempts() == []


# -- reward models: open_clip configs that would download ----------------------------------------

HOSTILE_OPEN_CLIP = {
    "timm_pretrained": ("vision_cfg.timm_model_pretrained",
                        {"vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": True,
                                        "image_size": 32}}),
    "hf_text_tower": ("text_cfg.hf_model_name", {"text_cfg": {"hf_model_name": "roberta-base", "hf_model_pretrained": False}}),
    "hf_pretrained_flag": ("text_cfg.hf_model_pretrained", {"text_cfg": {**TINY_OPEN_CLIP["text_cfg"], "hf_model_pretrained": True}}),
    "hf_tokenizer": ("text_cfg.hf_tokenizer_name", {"text_cfg": {**TINY_OPEN_CLIP["text_cfg"], "hf_tokenizer_name": "timm/ViT-B-16-SigLIP"}}),
    "top_level_pretrained": ("pretrained", {"pretrained": "laion2b_s32b_b79k"}),
}


@pytest.fixture(scope="module")
def open_clip_files(tmp_path_factory):
    return build_tiny_open_clip(str(tmp_path_factory.mktemp("open_clip")))[1]


def _hostile_open_clip_config(change: dict) -> dict:
    cfg = copy.deepcopy(TINY_OPEN_CLIP)
    cfg.update(copy.deepcopy(change))
    return cfg


@pytest.mark.parametrize("case", sorted(HOSTILE_OPEN_CLIP))
def test_open_clip_hub_folder_with_a_download_field_is_refused_offline(case, open_clip_files, tmp_path):
    from training.reward_models import load_reward_model

    field, change = HOSTILE_OPEN_CLIP[case]
    folder = tmp_path / "hostile"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": _hostile_open_clip_config(change)}))
    os.link(os.path.join(open_clip_files["hub"], "open_clip_model.safetensors"), folder / "open_clip_model.safetensors")
    with pytest.raises(ModelFileError) as e:
        load_reward_model(str(folder), "clip")
    assert str(folder / "open_clip_config.json") in str(e.value) and f"field {field} " in str(e.value), str(e.value)
    assert "local files only" in str(e.value)


@pytest.mark.parametrize("case", sorted(HOSTILE_OPEN_CLIP))
def test_hpsv2_checkpoint_with_a_downloading_architecture_file_is_refused_offline(case, open_clip_files, tmp_path):
    from training.reward_models import load_reward_model

    field, change = HOSTILE_OPEN_CLIP[case]
    config = tmp_path / "arch.json"
    config.write_text(json.dumps(_hostile_open_clip_config(change)))
    with pytest.raises(ModelFileError, match=f"{config}.*field {field} .*local files only"):
        load_reward_model(open_clip_files["pt"], "hpsv2", architecture=str(config))


@pytest.mark.parametrize("architecture, field", [("mt5-base-ViT-B-32", "text_cfg.hf_model_name"),
                                                 ("nllb-clip-base", "text_cfg.hf_model_name")])
def test_built_in_architectures_with_hub_towers_are_refused_offline(architecture, field, open_clip_files):
    from training.reward_models import load_reward_model

    with pytest.raises(ModelFileError, match=f"{architecture}.*field {field} "):
        load_reward_model(open_clip_files["safetensors"], "clip", architecture=architecture)


def test_open_clip_models_load_offline(open_clip_files):
    from training.reward_models import load_reward_model

    for path, kind, arch in [(open_clip_files["hub"], "clip", "ViT-H-14"),
                             (open_clip_files["pt"], "hpsv2", open_clip_files["config"])]:
        model = load_reward_model(path, kind, architecture=arch)
        assert model.encode_text(model.tokenize(["a cat"])).shape == (1, TINY_OPEN_CLIP["embed_dim"])


# -- reward models: transformers folders naming hub models ----------------------------------------

def _name_the_hub(folder) -> None:
    """Every name a transformers folder can carry, pointed at the hub (and at remote code)."""
    config = json.loads((folder / "config.json").read_text())
    config.update({"_name_or_path": HUB_ID, "auto_map": {"AutoModel": "evil/repo--modeling.Model"}})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps({"name_or_path": HUB_ID, "tokenizer_file": HUB_ID}))


@pytest.mark.parametrize("kind", ["denscore", "pickscore"])
def test_transformers_reward_folders_naming_the_hub_load_offline(kind, tmp_path):
    from training.clip_text import clip_tokenizer
    from training.reward_models import load_reward_model

    bare = tmp_path / "bare"  # no tokenizer files: the built-in CLIP BPE
    build_tiny_clipmodel(str(bare))
    _name_the_hub(bare)
    with_tokenizer = tmp_path / "with_tokenizer"  # the folder's own tokenizer files, next to hub names
    build_tiny_clipmodel(str(with_tokenizer))
    clip_tokenizer().save_pretrained(str(with_tokenizer))
    _name_the_hub(with_tokenizer)
    for folder in (bare, with_tokenizer):
        model = load_reward_model(str(folder), kind)
        assert model.encode_text(model.tokenize(["a cat"])).shape == (1, 16)


def test_a_hub_id_as_a_reward_model_is_refused_offline():
    from training.reward_models import load_reward_model

    for kind in ("denscore", "pickscore", "hpsv2", "clip"):
        with pytest.raises(ModelFileError, match="does not exist"):
            load_reward_model(HUB_ID, kind)


# -- T5, TextAdapter, captioner, aesthetic head, LongSD files, trainer's models ----------------------

@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory, comfy):
    folder = tmp_path_factory.mktemp("t5")
    tiny_t5_encoder().save_pretrained(str(folder))
    tokenizer = os.path.join(comfy, "comfy", "text_encoders", "t5_tokenizer")
    for name in os.listdir(tokenizer):
        shutil.copy(os.path.join(tokenizer, name), folder / name)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_name_or_path": "google/t5-v1_1-large"}))
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**tok_config, "name_or_path": "google/t5-v1_1-large"}))
    return folder


def test_t5_encoder_and_tokenizer_naming_the_hub_load_offline(t5_folder, tmp_path):
    from training.t5 import load_t5_branch, load_t5_encoder, t5_tokenizer

    assert load_t5_encoder(str(t5_folder)).config.d_model == 64
    assert t5_tokenizer(str(t5_folder))("a cat").input_ids
    single = save_tensors({k: v.clone() for k, v in tiny_t5_encoder().state_dict().items()
                           if k != "encoder.embed_tokens.weight"}, str(tmp_path / "t5.safetensors"))
    assert load_t5_encoder(single).config.num_layers == 2
    branch = load_t5_branch(single, None, str(t5_folder), out_dim=768)
    assert branch.encode(["a cat"], 8).shape == (1, 8, 768)


@pytest.mark.parametrize("name", ["google/t5-v1_1-xxl", "t5-large"])
def test_t5_tokenizer_and_branch_from_a_hub_name_are_refused_offline(name, t5_folder):
    from training.t5 import load_t5_branch, load_t5_encoder, t5_tokenizer

    with pytest.raises(ModelFileError, match="not a local folder"):
        t5_tokenizer(name)
    with pytest.raises(ModelFileError, match="no T5 tokenizer"):
        load_t5_branch(str(t5_folder), None, name)
    with pytest.raises(ModelFileError):
        load_t5_encoder(name)


def test_text_adapter_naming_the_hub_loads_offline_and_a_hub_id_is_refused(tmp_path):
    from training.adapter import load_text_adapter

    folder = tmp_path / "adapter"
    tiny_text_adapter(8, 8, 8).save_pretrained(str(folder))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_name_or_path": "LongSD/s28750_adapter",
                                                    "pretrained_model_name_or_path": "LongSD/s28750_adapter"}))
    assert load_text_adapter(str(folder)).config.out_dim == 8
    with pytest.raises(ModelFileError, match="is not a folder"):
        load_text_adapter("LongSD/s28750_adapter")


def test_captioner_naming_the_hub_loads_offline_and_a_hub_id_is_refused(tmp_path):
    from training.captioner import load_captioner

    folder = tmp_path / "blip"
    make_tiny_blip(str(folder))
    for name, key in (("config.json", "_name_or_path"), ("tokenizer_config.json", "name_or_path")):
        data = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**data, key: "Salesforce/blip-image-captioning-large"}))
    captioner = load_captioner(str(folder))
    assert captioner.token_count(["a red circle"]) > 0
    with pytest.raises(ModelFileError, match="expected a folder"):
        load_captioner("Salesforce/blip-image-captioning-large")


def test_aesthetic_head_loads_offline_and_a_hub_id_is_refused(tmp_path):
    from training.aesthetic import load_aesthetic_head

    head = torch.nn.Sequential(torch.nn.Linear(16, 4), torch.nn.Linear(4, 1))
    path = save_tensors({f"layers.{k}": v for k, v in head.state_dict().items()}, str(tmp_path / "head.safetensors"))
    assert load_aesthetic_head(path, 16)(torch.randn(2, 16)).shape == (2,)
    with pytest.raises(ModelFileError, match="does not exist"):
        load_aesthetic_head("camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth", 768)


def test_longsd_lora_list_loads_offline_and_a_hub_id_is_refused(tmp_path):
    from diffusers import UNet2DConditionModel

    from training.lora_format import load_reference_lora, sd15_unet_config

    config = {k: v for k, v in sd15_unet_config().items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    path = str(tmp_path / "s28750_lora_vis.pt")
    torch.save(reference_lora_list(unet, rank=1), path)
    assert len(load_reference_lora(path)) == 3 * 224
    with pytest.raises(ModelFileError, match="does not exist"):
        load_reference_lora("LongSD/s28750_lora_vis.pt")


def test_trainer_models_naming_the_hub_load_offline_and_hub_ids_are_refused(tmp_path, tiny_sd15_checkpoint):
    from test_models import _write_diffusers_folder
    from training.config import ModelConfig
    from training.models import load_components

    tiny = load_components(ModelConfig(tiny=True))
    _write_diffusers_folder(tiny, str(tmp_path))
    for sub in ("unet", "vae", "text_encoder"):
        config = tmp_path / sub / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "_name_or_path": "runwayml/stable-diffusion-v1-5"}))
    assert load_components(ModelConfig(pretrained=str(tmp_path))).unet is not None
    with pytest.raises(ModelFileError, match="does not exist"):
        load_components(ModelConfig(pretrained="runwayml/stable-diffusion-v1-5"))
    with pytest.raises((ModelFileError, OSError), match="runwayml/stable-diffusion-v1-5"):  # never looked up
        load_components(ModelConfig(pretrained=tiny_sd15_checkpoint, config="runwayml/stable-diffusion-v1-5"))


# -- the nodes: the same loaders through ComfyUI's model folders ------------------------------------

def test_nodes_load_offline_and_refuse_downloading_configs(pack, open_clip_files, t5_folder, tmp_path):
    import folder_paths

    reward_root = tmp_path / "reward_models"
    timm = reward_root / "timm_pretrained"
    timm.mkdir(parents=True)
    field, change = HOSTILE_OPEN_CLIP["timm_pretrained"]
    (timm / "open_clip_config.json").write_text(json.dumps({"model_cfg": _hostile_open_clip_config(change)}))
    os.link(os.path.join(open_clip_files["hub"], "open_clip_model.safetensors"), timm / "open_clip_model.safetensors")
    build_tiny_clipmodel(str(reward_root / "denscore_naming_the_hub"))
    _name_the_hub(reward_root / "denscore_naming_the_hub")
    folder_paths.add_model_folder_path("reward_models", str(reward_root))
    adapter = tmp_path / "adapter_naming_the_hub"
    tiny_text_adapter(64, 8, 768).save_pretrained(str(adapter))
    (adapter / "config.json").write_text(json.dumps({**json.loads((adapter / "config.json").read_text()),
                                                     "_name_or_path": "LongSD/s28750_adapter"}))
    nodes = pack.NODE_CLASS_MAPPINGS
    longsd = importlib.import_module(pack.__name__ + ".nodes.longsd")  # the T5 Adapter Loader's loading
    pack_error = importlib.import_module(pack.__name__ + ".training.safe_io").ModelFileError  # the pack's own copy

    with torch.inference_mode():  # as ComfyUI executes nodes
        with pytest.raises(pack_error, match=f"field {field} "):
            nodes["LongAlignRewardModelLoader"]().load("timm_pretrained", "clip", "cpu", "fp32")
        (model,) = nodes["LongAlignRewardModelLoader"]().load("denscore_naming_the_hub", "denscore", "cpu", "fp32")
        assert model.kind == "denscore"
        branch = longsd.load_t5_branch(str(t5_folder), str(adapter), torch.float32)
        assert branch.encode(["a cat"], 8).shape == (1, 8, 768)
        t5_file = save_tensors({k: v.clone() for k, v in tiny_t5_encoder().state_dict().items()
                                if k != "encoder.embed_tokens.weight"}, str(tmp_path / "t5.safetensors"))
        branch = longsd.load_t5_branch(t5_file, str(adapter), torch.float32)  # ComfyUI's own T5 tokenizer
        assert branch.encode(["a cat"], 8).shape == (1, 8, 768)
