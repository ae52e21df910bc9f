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


def test_component_configs_larger_than_their_weights_are_refused_before_loading(tmp_path):
    """``safe_io.check_pretrained_folder`` on each component folder of a diffusers SD folder: the real
    configs pass; a config naming more layers or wider blocks than the weights hold (which
    ``from_pretrained`` would fill with random weights, in real memory) is refused, on the meta device."""
    import pytest
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from training.safe_io import check_pretrained_folder

    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
    tiny = load_components(ModelConfig(tiny=True))
    _write_diffusers_folder(tiny, str(tmp_path))
    for sub, model_class in classes.items():
        check_pretrained_folder(model_class, str(tmp_path / sub), sub)
    for sub, change, expected in [
        ("unet", {"layers_per_block": 3}, "parameters but the weights hold"),
        ("unet", {"block_out_channels": [4096]}, "parameters but the weights hold"),
        ("vae", {"layers_per_block": 4}, "parameters but the weights hold"),
        ("text_encoder", {"num_hidden_layers": 60}, "60 layers but the weights hold only"),
        ("text_encoder", {"num_hidden_layers": 2000}, "num_hidden_layers is 2000; expected a number from 0 to 256"),
        ("text_encoder", {"hidden_size": 1536, "intermediate_size": 6144}, "parameters but the weights hold"),
    ]:
        config = tmp_path / sub / "config.json"
        original = config.read_text()
        config.write_text(json.dumps({**json.loads(original), **change}))
        with pytest.raises(ModelFileError, match=expected):
            check_pretrained_folder(classes[sub], str(tmp_path / sub), f"model.pretrained {sub}")
        with pytest.raises(ModelFileError, match=f"{sub}/.*{expected}"):  # the trainer's loader checks first
            load_components(ModelConfig(pretrained=str(tmp_path)))
        config.write_text(original)


def test_single_file_configs_larger_than_the_file_are_refused_before_loading(tmp_path, comfy):
    """A single file read with the user's ``model.config``: configs beyond the size bounds, or describing
    more parameters than the file holds, are refused on the meta device before anything is built."""
    import pytest

    test_single_file_checkpoint_loads_with_shipped_style_configs(tmp_path, comfy)
    path, configs = str(tmp_path / "tiny_sd15.safetensors"), tmp_path / "configs"
    for sub, change, expected in [
        ("text_encoder", {"num_hidden_layers": 2000}, "num_hidden_layers is 2000; expected a number from 0 to 256"),
        ("text_encoder", {"num_hidden_layers": 200}, "parameters but the file holds"),
        ("unet", {"block_out_channels": [2048]}, "parameters but the file holds"),
    ]:
        config = configs / sub / "config.json"
        original = config.read_text()
        config.write_text(json.dumps({**json.loads(original), **change}))
        with pytest.raises(ModelFileError, match=expected):
            load_components(ModelConfig(pretrained=path, config=str(configs)))
        config.write_text(original)
