"""LongAlign Train LoRA's inputs in-process (fast): the prompts and the prompt file make one list, every
path input is read only inside ComfyUI's input folder or a registered models folder, and each refusal
names the node's own input (lora_name, ckpt_name), before anything is written or started."""
from __future__ import annotations

import importlib
import os

import pytest

pytestmark = pytest.mark.comfyui
NODE = "LongAlign Train LoRA"


@pytest.fixture
def train_module(pack):
    return importlib.import_module(pack.__name__ + ".nodes.train")


@pytest.fixture
def folders(comfy, tmp_path, model_folder):
    """A temporary input folder (with prompts.txt), a checkpoints folder holding a file with SD1.5's keys
    and one that is no checkpoint, and ``outside/`` (registered nowhere) holding a prompt file and a
    checkpoint-named file."""
    import folder_paths

    before = folder_paths.get_input_directory()
    inputs = tmp_path / "input"
    os.makedirs(inputs)
    (inputs / "prompts.txt").write_text("A cat on a mat.\n\nA dog in the fog.\n", encoding="utf-8")
    outside = tmp_path / "outside"
    os.makedirs(outside / "images")
    (outside / "secret.txt").write_text("A secret prompt.\n", encoding="utf-8")
    (outside / "elsewhere.safetensors").write_bytes(b"not a checkpoint")
    checkpoints = model_folder("checkpoints")
    _sd15_keys_file(str(checkpoints / "sd15_keys.safetensors"))
    (checkpoints / "not_a_model.safetensors").write_bytes(b"not a checkpoint")
    os.symlink(outside / "elsewhere.safetensors", checkpoints / "linked_out.safetensors")
    folder_paths.set_input_directory(str(inputs))
    yield {"input": inputs, "outside": outside, "checkpoints": checkpoints}
    folder_paths.set_input_directory(before)


def _inputs(**changes) -> dict:
    inputs = {"ckpt_name": "sd15_keys.safetensors", "stage": "reward", "prompts": "A red circle.", "steps": 2,
              "rank": 4, "lr": 1e-3, "resolution": 32, "lora_name": "refused_lora", "resume": False,
              "overwrite": False, "seed": 0}
    inputs.update(changes)
    return inputs


def test_the_prompts_and_the_prompt_file_make_one_list(train_module, folders):
    request = train_module.build_request(**_inputs(prompts=" A red circle. \n\n A blue square.", prompts_file="prompts.txt"))
    assert request.prompts == ["A red circle.", "A blue square.", "A cat on a mat.", "A dog in the fog."]
    assert request.checkpoint == os.path.join(str(folders["checkpoints"]), "sd15_keys.safetensors")
    assert request.name == "refused_lora" and request.reward_model is None and request.device in ("cpu", "auto")
    assert train_module.build_request(**_inputs(lora_name="mine.safetensors")).name == "mine"  # as LoraLoader lists it


@pytest.mark.parametrize("input_name, changes", [
    ("prompts_file", {"prompts_file": "../outside/secret.txt"}),
    ("prompts_file", {"prompts_file": "<outside>/secret.txt"}),
    ("prompts_file", {"prompts_file": "missing.txt"}),
    ("image_folder", {"stage": "align", "image_folder": "../outside/images"}),
    ("captioner", {"stage": "comat", "captioner": "<outside>"}),
    ("ckpt_name", {"ckpt_name": "linked_out.safetensors"}),  # a link out of the models folders
    ("ckpt_name", {"ckpt_name": "not_a_model.safetensors"}),  # in models/checkpoints, but no checkpoint
    ("lora_name", {"lora_name": "sub/dir"}),
    ("prompts", {"prompts": " \n "}),
    ("reward_model", {}),  # the reward stage without a Reward Model Loader
])
def test_a_bad_input_is_refused_naming_the_nodes_input_before_anything_is_written(
        pack, train_module, folders, input_name, changes):
    import folder_paths

    changes = {k: v.replace("<outside>", str(folders["outside"])) if isinstance(v, str) else v
               for k, v in changes.items()}
    node = pack.NODE_CLASS_MAPPINGS["LongAlignTrainLoRA"]()
    with pytest.raises(ValueError) as e:
        node.train(**_inputs(**changes))
    assert str(e.value).startswith(f"{NODE}: {input_name}: "), str(e.value)
    assert type(e.value).__name__ == "InputError"
    assert not os.path.exists(os.path.join(folder_paths.get_output_directory(), "longalign_runs", "refused_lora"))


def _sd15_keys_file(path: str) -> None:
    """A small safetensors file with SD1.5's LDM key layout (what the family detector reads)."""
    from tiny_models import SD15_KEYS, ldm_key_checkpoint

    ldm_key_checkpoint(path, SD15_KEYS)
