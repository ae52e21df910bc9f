"""Errors a user can act on: an empty reward_models folder says so in the model list and names the
files to put there; a LongSD Loader error names the input and the file it expected."""
from __future__ import annotations

import inspect
import os

import pytest
import torch

pytestmark = pytest.mark.comfyui  # the nodes in-process in ComfyUI: rerun on every ComfyUI version


@pytest.fixture
def empty_reward_models(pack, tmp_path, monkeypatch):
    import folder_paths

    empty = tmp_path / "reward_models"
    empty.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "reward_models",
                        ([str(empty)], folder_paths.folder_names_and_paths["reward_models"][1]))
    return pack.NODE_CLASS_MAPPINGS["LongAlignRewardModelLoader"]


def test_an_empty_reward_models_folder_shows_what_to_do_in_the_list(empty_reward_models):
    (entry,) = empty_reward_models.INPUT_TYPES()["required"]["model_name"][0]
    assert "models/reward_models" in entry and "Denscore" in entry and "HPSv2" in entry


def test_loading_the_empty_entry_says_where_to_put_which_files(empty_reward_models):
    (entry,) = empty_reward_models.INPUT_TYPES()["required"]["model_name"][0]
    with pytest.raises(FileNotFoundError) as e:
        empty_reward_models().load(entry, "denscore", "cpu", "fp32")
    for words in ("model_name", "ComfyUI/models/reward_models", "CLIPModel folder", "config.json", "open_clip", ".safetensors"):
        assert words in str(e.value), words


def test_validation_replaces_value_not_in_list_with_the_same_advice(empty_reward_models):
    validate = empty_reward_models.VALIDATE_INPUTS
    # ComfyUI skips its own "Value not in list" check for inputs VALIDATE_INPUTS takes by name
    assert "model_name" in inspect.getfullargspec(validate).args
    (entry,) = empty_reward_models.INPUT_TYPES()["required"]["model_name"][0]
    for name in (entry, "Denscore"):  # the empty entry, a workflow naming a model this machine lacks
        message = validate(model_name=name)
        assert isinstance(message, str) and "models/reward_models" in message and "CLIPModel folder" in message


def test_validation_accepts_a_listed_model(pack, tmp_path, monkeypatch):
    import folder_paths
    from tiny_models import build_tiny_clipmodel

    build_tiny_clipmodel(str(tmp_path / "tiny_denscore"))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "reward_models",
                        ([str(tmp_path)], folder_paths.folder_names_and_paths["reward_models"][1]))
    assert pack.NODE_CLASS_MAPPINGS["LongAlignRewardModelLoader"].VALIDATE_INPUTS(model_name="tiny_denscore") is True


@pytest.fixture(scope="module")
def sd15_model(comfy, tiny_sd15_checkpoint):
    import comfy.sd

    return comfy.sd.load_checkpoint_guess_config(tiny_sd15_checkpoint, output_vae=False, output_clip=False)[0]


@pytest.mark.parametrize("role", ["alignment", "reward"])
def test_longsd_loader_names_the_input_and_the_file_it_expected(pack, sd15_model, tmp_path, monkeypatch, role):
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras",
                        ([str(tmp_path)], folder_paths.folder_names_and_paths["loras"][1]))
    torch.save({"up": torch.zeros(2, 2)}, tmp_path / "state_dict.pt")
    names = {"alignment": ("state_dict.pt", "None"), "reward": ("None", "state_dict.pt")}[role]
    loader = pack.NODE_CLASS_MAPPINGS["LongAlignLongSDLoader"]()
    with pytest.raises(ValueError) as e:
        loader.load(sd15_model, names[0], 1.0, names[1], 1.0)
    message = str(e.value)
    assert message.startswith(f"LongSD Loader: {role}_lora 'state_dict.pt': expected LongSD's {role} LoRA list")
    assert {"alignment": "s28750_lora_vis.pt", "reward": "sd15-reward-3750.pt"}[role] in message
    assert "found dict" in message and os.path.basename(str(tmp_path)) in message
