"""Every node input that names a file (reference_file, the reward model, the LongSD LoRAs, the T5 and
adapter folders) is read only inside ComfyUI's input folder or a registered models folder, links
followed; anything else is refused with one message that says nothing about the file."""
from __future__ import annotations

import json
import os

import pytest
import torch

from tiny_models import PROMPTS, build_tiny_clipmodel
from training.reward_models import load_reward_model

pytestmark = pytest.mark.comfyui  # the nodes in-process in ComfyUI: rerun on every ComfyUI version


@pytest.fixture(scope="module")
def paths_module(pack):
    import importlib

    return importlib.import_module("comfyui_longalign.nodes.paths")


@pytest.fixture
def input_dir(comfy, tmp_path):
    """A temporary ComfyUI input folder holding ``prompts.txt``; ``tmp_path/outside`` is not registered."""
    import folder_paths

    before = folder_paths.get_input_directory()
    folder = tmp_path / "input"
    os.makedirs(folder)
    (folder / "prompts.txt").write_text("A cat on a mat.\nA dog in the fog.\n", encoding="utf-8")
    os.makedirs(tmp_path / "outside")
    (tmp_path / "outside" / "secret.txt").write_text("A secret prompt.\n", encoding="utf-8")
    folder_paths.set_input_directory(str(folder))
    yield folder
    folder_paths.set_input_directory(before)


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("paths_reward") / "tiny_denscore"
    build_tiny_clipmodel(str(folder))
    return load_reward_model(str(folder), "denscore")


def _score(pack, model, reference: str):
    images = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return pack.NODE_CLASS_MAPPINGS["LongAlignDecomposedRewardScore"]().score(
            images, model, PROMPTS[0], 0.3, "reference", reference)


def _refusal(call, value: str) -> str:
    """The message ``call`` is refused with, the value given replaced by ``<value>``."""
    with pytest.raises(ValueError, match="is refused: a node may only read files inside ComfyUI's input folder") as e:
        call()
    assert type(e.value).__name__ == "PathRefused"
    return str(e.value).replace(repr(value), "<value>")


def test_reference_file_inside_the_input_folder_is_read(pack, reward_model, input_dir):
    assert json.loads(_score(pack, reward_model, "prompts.txt")["result"][4])["direction"] == "reference"
    absolute = str(input_dir / "prompts.txt")  # an absolute path inside the input folder is fine too
    assert json.loads(_score(pack, reward_model, absolute)["result"][4])["direction"] == "reference"
    os.symlink("prompts.txt", input_dir / "link.txt")  # a link that stays inside
    assert json.loads(_score(pack, reward_model, "link.txt")["result"][4])["direction"] == "reference"


def test_reference_file_outside_is_refused_with_one_message_existing_or_not(pack, reward_model, input_dir, tmp_path):
    os.symlink(tmp_path / "outside" / "secret.txt", input_dir / "leak.txt")
    os.symlink(tmp_path / "outside" / "missing.txt", input_dir / "dangling.txt")
    values = [
        "../outside/secret.txt", "../outside/missing.txt",  # '..' out of the input folder
        "../../../../../../../../etc/passwd", "../../../../../../../../etc/no_such_file",
        str(tmp_path / "outside" / "secret.txt"), str(tmp_path / "outside" / "missing.txt"),  # absolute
        "/etc/passwd", "/etc/no_such_file",
        "leak.txt", "dangling.txt",  # links in the input folder that lead out
        "a\x00b.txt",  # not a path at all
    ]
    messages = {_refusal(lambda v=v: _score(pack, reward_model, v), v) for v in values}
    assert len(messages) == 1, messages  # the same words whether the file exists or not
    assert "secret" not in messages.pop()


def test_reference_file_not_utf8_gets_a_clear_message(pack, reward_model, input_dir):
    (input_dir / "latin1.txt").write_bytes("Un caf\xe9 au lait.\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"prompt file .*latin1\.txt' is not UTF-8 text \(it holds the byte 0xe9\)"):
        _score(pack, reward_model, "latin1.txt")


def test_reward_model_name_outside_its_folder_is_refused(pack, model_folder, tmp_path):
    rewards = model_folder("reward_models")
    os.makedirs(tmp_path / "outside")
    (tmp_path / "outside" / "hps.safetensors").write_bytes(b"x")
    os.symlink(tmp_path / "outside" / "hps.safetensors", rewards / "linked_out.safetensors")
    loader = pack.NODE_CLASS_MAPPINGS["LongAlignRewardModelLoader"]()
    for name in ("../../outside/hps.safetensors", str(tmp_path / "outside" / "hps.safetensors"), "linked_out.safetensors",
                 "/etc/passwd"):
        _refusal(lambda n=name: loader.load(n, "hpsv2", "cpu", "fp32"), name)


def test_longsd_lora_names_outside_the_loras_folders_are_refused(pack, model_folder, tmp_path):
    loras = model_folder("loras")
    os.makedirs(tmp_path / "outside")
    torch.save([torch.zeros(2, 2)], tmp_path / "outside" / "lora.pt")
    os.symlink(tmp_path / "outside" / "lora.pt", loras / "linked_out.pt")
    loader = pack.NODE_CLASS_MAPPINGS["LongSDLoader"]()
    for name in ("../../outside/lora.pt", str(tmp_path / "outside" / "lora.pt"), "linked_out.pt", "../../../../../etc/passwd"):
        _refusal(lambda n=name: loader.load(object(), n, 1.0, "None", 1.0), name)
        _refusal(lambda n=name: loader.load(object(), "None", 1.0, n, 1.0), name)


def test_t5_and_adapter_entries_linked_out_of_text_encoders_are_refused(pack, model_folder, tmp_path):
    encoders = model_folder("text_encoders")
    outside = tmp_path / "outside"
    os.makedirs(outside / "adapter")
    (outside / "adapter" / "config.json").write_text(json.dumps({"in_dim": 8, "int_dim": 8, "out_dim": 8}))
    (outside / "t5.safetensors").write_bytes(b"x")
    os.symlink(outside / "adapter", encoders / "adapter_out")
    os.symlink(outside / "t5.safetensors", encoders / "t5_out.safetensors")
    loader = pack.NODE_CLASS_MAPPINGS["T5AdapterLoader"]
    required = loader.INPUT_TYPES()["required"]
    assert "t5_out.safetensors" in required["t5_name"][0] and "adapter_out/" in required["adapter_name"][0]
    _refusal(lambda: loader().load("t5_out.safetensors", "adapter_out/", "fp32"), "t5_out.safetensors")
    (encoders / "t5_in.safetensors").write_bytes(b"x")
    _refusal(lambda: loader().load("t5_in.safetensors", "adapter_out/", "fp32"), "adapter_out/")


def test_the_check_is_one_helper(paths_module, comfy, input_dir, tmp_path):
    """confined(): inside the input folder or any registered models folder, links resolved."""
    import folder_paths

    assert paths_module.confined(str(input_dir / "prompts.txt"), "x") == str(input_dir / "prompts.txt")
    models = folder_paths.get_folder_paths("checkpoints")[0]
    assert paths_module.confined(os.path.join(models, "any.safetensors"), "x")
    for path in (str(tmp_path / "outside" / "secret.txt"), str(input_dir / ".." / "outside" / "secret.txt"),
                 str(input_dir) + "_sibling/file.txt"):
        _refusal(lambda p=path: paths_module.confined(p, "x"), path)
