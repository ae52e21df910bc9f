"""Model families: detected from a diffusers folder and from a single file before any weight is built;
SD2.x and unknown models refused by name; parts made for another family refused (issue #17)."""
import json
import os
import shutil

import pytest

from tiny_models import SD15_KEYS, SDXL_KEYS, ldm_key_checkpoint
from training.config import ModelConfig
from training.families import SD15, SDXL, detect
from training.lora import add_lora, kohya_state_dict
from training.models import load_components
from training.safe_io import ModelFileError, save_tensors
from training.tiny import tiny_sdxl_unet, tiny_unet

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "training", "configs")
SD2_MESSAGE = r"SD2\.x \(v-prediction\) is not supported for training; use SD1\.5 or SDXL"


def _folder(tmp_path, family: str, edit=None) -> str:
    """A diffusers folder of configs only (no weights): a copy of the shipped configs, edited."""
    folder = str(tmp_path / family)
    shutil.copytree(os.path.join(CONFIGS, "sdxl" if family.startswith("sdxl") else "sd15"), folder)
    if edit:
        edit(folder)
    return folder


def _edit_json(folder: str, name: str, **changes) -> None:
    path = os.path.join(folder, name)
    with open(path) as f:
        data = json.load(f)
    data.update(changes)
    with open(path, "w") as f:
        json.dump(data, f)


def _sd2(folder: str) -> None:
    _edit_json(folder, "unet/config.json", cross_attention_dim=1024)
    _edit_json(folder, "scheduler/scheduler_config.json", prediction_type="v_prediction")


def _flux(folder: str) -> None:
    _edit_json(folder, "model_index.json", _class_name="FluxPipeline")


def test_folders_are_detected_from_their_configs(tmp_path):
    assert detect(_folder(tmp_path, "sd15")) is SD15
    assert detect(_folder(tmp_path, "sdxl")) is SDXL


@pytest.mark.parametrize("edit, message", [
    (_sd2, SD2_MESSAGE),
    (_flux, r"not a model family the trainer supports \(pipeline 'FluxPipeline'"),
    (lambda f: _edit_json(f, "scheduler/scheduler_config.json", prediction_type="v_prediction"),
     r"predicts 'v_prediction'"),
])
def test_other_folders_are_refused_naming_what_was_found(tmp_path, edit, message):
    with pytest.raises(ModelFileError, match=message):
        detect(_folder(tmp_path, "sd15", edit))


def test_sdxl_folder_without_text_encoder_2_is_refused_before_loading(tmp_path):
    folder = _folder(tmp_path, "sdxl", lambda f: shutil.rmtree(os.path.join(f, "text_encoder_2")))
    with pytest.raises(ModelFileError, match=r"SDXL folder .* has no text_encoder_2/config\.json"):
        load_components(ModelConfig(pretrained=folder))


def test_sd2_folder_is_refused_before_any_weight_loads(tmp_path):
    """The folder holds configs only: a load would fail on the missing weights, the refusal comes first."""
    with pytest.raises(ModelFileError, match=SD2_MESSAGE):
        load_components(ModelConfig(pretrained=_folder(tmp_path, "sd15", _sd2)))


SD2_KEYS = ["model.diffusion_model.input_blocks.1.1.proj_in.", "cond_stage_model.model.transformer.resblocks.0.attn."]


@pytest.mark.parametrize("ckpt", [False, True])
def test_single_files_are_detected_from_their_keys(tmp_path, ckpt):
    ext = ".ckpt" if ckpt else ".safetensors"
    assert detect(ldm_key_checkpoint(tmp_path / f"sd15{ext}", SD15_KEYS, ckpt)) is SD15
    assert detect(ldm_key_checkpoint(tmp_path / f"sdxl{ext}", SDXL_KEYS, ckpt)) is SDXL
    with pytest.raises(ModelFileError, match=SD2_MESSAGE):
        detect(ldm_key_checkpoint(tmp_path / f"sd2{ext}", SD2_KEYS, ckpt))


def test_unknown_single_files_are_refused_naming_their_keys(tmp_path):
    flux = ldm_key_checkpoint(tmp_path / "flux.safetensors", ["double_blocks.0.img_attn.", "img_in."])
    with pytest.raises(ModelFileError, match=r"keys start with \['double_blocks\.0', 'img_in\.weight'\]"):
        load_components(ModelConfig(pretrained=flux))
    refiner = ldm_key_checkpoint(tmp_path / "refiner.safetensors", ["conditioner.embedders.0.model.transformer.",
                                                             "model.diffusion_model.label_emb.0.0."])
    with pytest.raises(ModelFileError, match=r"an SDXL refiner"):
        detect(refiner)
    with open(tmp_path / "broken.safetensors", "wb") as f:
        f.write(b"\x01")
    with pytest.raises(ModelFileError, match=r"broken\.safetensors' is not a readable \.safetensors file"):
        detect(str(tmp_path / "broken.safetensors"))


def test_family_setting_must_agree_with_the_model(tmp_path):
    with pytest.raises(ModelFileError, match=r"model\.family is 'sdxl' but model\.pretrained .* is SD1\.x"):
        load_components(ModelConfig(pretrained=_folder(tmp_path, "sd15"), family="sdxl"))


def _lora_file(unet, path, metadata=None) -> str:
    add_lora(unet, 4, 4.0)
    return save_tensors(kohya_state_dict(unet, 4.0), str(path), metadata=metadata)


def test_sd15_lora_as_init_lora_of_sdxl_is_refused(tmp_path):
    sd15_lora = _lora_file(tiny_unet(), tmp_path / "sd15.safetensors")
    with pytest.raises(ModelFileError, match=r"model\.init_lora: .*sd15\.safetensors' has \d+ LoRA layers that are not "
                                             r"layers of this SDXL UNet"):
        load_components(ModelConfig(tiny=True, family="sdxl", init_lora=[sd15_lora]))
    tagged = _lora_file(tiny_unet(), tmp_path / "tagged.safetensors", SD15.lora_metadata())
    with pytest.raises(ModelFileError, match=r"was trained for sd_v1; this model is SDXL"):
        load_components(ModelConfig(tiny=True, family="sdxl", init_lora=[tagged]))
    sdxl_lora = _lora_file(tiny_sdxl_unet(), tmp_path / "sdxl.safetensors", SDXL.lora_metadata())
    assert load_components(ModelConfig(tiny=True, family="sdxl", init_lora=[sdxl_lora])).family is SDXL
    with pytest.raises(ModelFileError, match=r"this model is SD1\.x"):
        load_components(ModelConfig(tiny=True, init_lora=[sdxl_lora]))


@pytest.mark.parametrize("key, value, message", [
    ("t5", "some/t5", r"model\.t5: the T5 branch .* is SD1\.5-only and this model is SDXL"),
    ("adapter", "some/adapter", r"model\.adapter: the T5 branch .* is SD1\.5-only"),
    ("init_lora", ["longsd_lora.pt"], r"model\.init_lora: 'longsd_lora\.pt' is not a \.safetensors LoRA; LongSD's list"),
])
def test_sd15_only_parts_with_sdxl_are_refused(key, value, message):
    with pytest.raises(ModelFileError, match=message):
        load_components(ModelConfig(tiny=True, family="sdxl", **{key: value}))
