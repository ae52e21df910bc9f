"""The trainer reads SD1.5 as users have it: a diffusers folder or a single-file checkpoint (here:
the tiny preset's components written in both formats, read back through ``load_components``)."""
import json
import os

import torch

from tiny_models import _ldm_unet_state_dict, clip_ldm_state_dict
from training.config import ModelConfig
from training.models import SD15_CONFIG, load_components
from training.safe_io import ModelFileError, save_tensors


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k].float(), sb[k].float(), msg=k)


def _write_diffusers_folder(c, folder: str) -> None:
    c.unet.save_pretrained(os.path.join(folder, "unet"))
    c.vae.save_pretrained(os.path.join(folder, "vae"))
    c.text_encoder.save_pretrained(os.path.join(folder, "text_encoder"))
    c.tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    c.scheduler.save_pretrained(os.path.join(folder, "scheduler"))
    with open(os.path.join(SD15_CONFIG, "model_index.json"), encoding="utf-8") as f:
        index = json.load(f)
    with open(os.path.join(folder, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f)


def test_diffusers_folder_loads_the_same_components(tmp_path):
    tiny = load_components(ModelConfig(tiny=True))
    _write_diffusers_folder(tiny, str(tmp_path))
    loaded = load_components(ModelConfig(pretrained=str(tmp_path)))
    for name in ("unet", "vae", "text_encoder"):
        _same(getattr(tiny, name), getattr(loaded, name))
    assert loaded.tokenizer("a cat.")["input_ids"] == tiny.tokenizer("a cat.")["input_ids"]


def test_single_file_checkpoint_loads_with_shipped_style_configs(tmp_path, comfy):
    from comfy.diffusers_convert import convert_vae_state_dict

    tiny = load_components(ModelConfig(tiny=True))
    configs = tmp_path / "configs"
    tiny.unet.save_config(configs / "unet")
    tiny.vae.save_config(configs / "vae")
    tiny.text_encoder.config.save_pretrained(configs / "text_encoder")
    tiny.scheduler.save_config(configs / "scheduler")
    with open(os.path.join(SD15_CONFIG, "model_index.json"), encoding="utf-8") as f:
        (configs / "model_index.json").write_text(f.read())
    checkpoint = dict(_ldm_unet_state_dict(tiny.unet))
    checkpoint.update({"first_stage_model." + k: v for k, v in convert_vae_state_dict(tiny.vae.state_dict()).items()})
    checkpoint.update({"cond_stage_model.transformer." + k: v for k, v in clip_ldm_state_dict(tiny.text_encoder).items()})
    path = save_tensors(checkpoint, str(tmp_path / "tiny_sd15.safetensors"))
    loaded = load_components(ModelConfig(pretrained=path, config=str(configs)))
    for name in ("unet", "vae", "text_encoder"):
        _same(getattr(tiny, name), getattr(loaded, name))


def test_missing_or_wrong_paths_are_clear_errors(tmp_path):
    import pytest

    with pytest.raises(ModelFileError, match="does not exist"):
        load_components(ModelConfig(pretrained=str(tmp_path / "nope.safetensors")))
    with pytest.raises(ModelFileError, match="without model_index.json"):
        load_components(ModelConfig(pretrained=str(tmp_path)))
    with pytest.raises(ModelFileError, match="is not set"):
        load_components(ModelConfig())
