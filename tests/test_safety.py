"""Model files from strangers: no loader of the pack runs code from a file, and every refusal names
the file, the format expected and what was found."""
from __future__ import annotations

import json
import os
import pickle
import shlex
import struct

import pytest
import torch
from safetensors.torch import save_file

from tiny_models import TINY_OPEN_CLIP, tiny_clip_model, tiny_t5_encoder
from training import convert_lora
from training.adapter import load_text_adapter
from training.data import DataError, read_records
from training.lora_format import load_reference_lora
from training.reward_models import load_reward_model
from training.safe_io import ModelFileError, load_pickle, load_tensors
from training.t5 import load_t5_encoder


class RunsCode:
    """Unpickling this runs ``touch <sentinel>``: what a hostile ``.pt`` does with ``torch.load``."""

    def __init__(self, sentinel: str):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.sentinel)}",)


@pytest.fixture
def sentinel(tmp_path):
    path = str(tmp_path / "PWNED")
    yield path
    assert not os.path.exists(path), "a loader ran code from a model file"


def hostile_files(folder, sentinel: str) -> dict[str, str]:
    """The payload as a plausible state dict, as a LoRA list, and as a bare (non-zip) pickle."""
    files = {
        "state_dict.pt": {"weight": torch.zeros(2), "payload": RunsCode(sentinel)},
        "lora_list.pt": [torch.zeros(2), RunsCode(sentinel)],
    }
    out = {}
    for name, obj in files.items():
        out[name] = str(folder / name)
        torch.save(obj, out[name])
    out["bare.pt"] = str(folder / "bare.pt")
    with open(out["bare.pt"], "wb") as f:
        pickle.dump(RunsCode(sentinel), f)
    return out


def test_the_hostile_files_really_run_code_when_unpickled_unsafely(tmp_path):
    """Control: the payload is live, so the refusals below mean something."""
    sentinel = str(tmp_path / "PWNED")
    for path in hostile_files(tmp_path, sentinel).values():
        if path.endswith("bare.pt"):
            with open(path, "rb") as f:
                pickle.load(f)
        else:
            torch.load(path, weights_only=False)
        assert os.path.exists(sentinel), path
        os.remove(sentinel)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
@pytest.mark.parametrize("kind", ["state_dict.pt", "lora_list.pt", "bare.pt"])
def test_safe_io_refuses_code_in_every_pickle_suffix(tmp_path, sentinel, kind, suffix):
    path = hostile_files(tmp_path, sentinel)[kind]
    renamed = path[: -len(".pt")] + suffix
    os.replace(path, renamed)
    for load in (load_tensors, load_pickle):
        with pytest.raises(ModelFileError) as e:
            load(renamed, "test weights")
        assert repr(renamed) in str(e.value) and "weights-only" in str(e.value)


def test_reference_lora_loader_and_converter_refuse_code(tmp_path, sentinel, capsys):
    files = hostile_files(tmp_path, sentinel)
    for name in ("lora_list.pt", "bare.pt"):
        with pytest.raises(ModelFileError, match="LongSD LoRA list"):
            load_reference_lora(files[name])
        dst = str(tmp_path / f"{name}.safetensors")
        assert convert_lora.main([files[name], dst]) == 2
        assert not os.path.exists(dst)
        assert files[name] in capsys.readouterr().err


def test_reward_model_loaders_refuse_code(tmp_path, sentinel):
    files = hostile_files(tmp_path, sentinel)
    config = tmp_path / "tiny_open_clip.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP))
    with pytest.raises(ModelFileError, match="hpsv2 checkpoint"):
        load_reward_model(files["state_dict.pt"], "hpsv2", architecture=str(config))
    hub = tmp_path / "hub"  # open_clip hub layout with a pickle as its weights
    hub.mkdir()
    (hub / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP}))
    os.replace(files["bare.pt"], hub / "open_clip_pytorch_model.bin")
    with pytest.raises(ModelFileError, match="weights-only"):
        load_reward_model(str(hub), "clip")
    folder = tmp_path / "denscore"  # a transformers CLIPModel folder with a hostile pytorch_model.bin
    tiny_clip_model().config.save_pretrained(folder)
    os.replace(files["state_dict.pt"], folder / "pytorch_model.bin")
    with pytest.raises(ModelFileError, match="could not be read"):
        load_reward_model(str(folder), "denscore")


def test_t5_and_adapter_loaders_refuse_code(tmp_path, sentinel):
    files = hostile_files(tmp_path, sentinel)
    with pytest.raises(ModelFileError, match="T5 encoder weights"):
        load_t5_encoder(files["state_dict.pt"])
    t5 = tmp_path / "t5"
    tiny_t5_encoder().config.save_pretrained(t5)
    torch.save({"encoder.x": RunsCode(sentinel)}, t5 / "pytorch_model.bin")
    with pytest.raises(ModelFileError, match="T5 encoder weights"):
        load_t5_encoder(str(t5))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "config.json").write_text(json.dumps({"in_dim": 8, "int_dim": 8, "out_dim": 8}))
    os.replace(files["bare.pt"], adapter / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelFileError, match="TextAdapter weights"):
        load_text_adapter(str(adapter))


def test_single_file_base_model_refuses_code(tmp_path, sentinel):
    """``model.pretrained`` as a ``.ckpt`` goes through diffusers, which unpickles weights-only too."""
    from training.config import ModelConfig
    from training.models import load_components

    path = hostile_files(tmp_path, sentinel)["state_dict.pt"]
    ckpt = path.replace(".pt", ".ckpt")
    os.replace(path, ckpt)
    # diffusers' wording, or the pack's own when it reads the file first through safe_io
    with pytest.raises(Exception, match="Unable to load weights from checkpoint file|could not be loaded as a weights-only"):
        load_components(ModelConfig(pretrained=ckpt))


def test_yaml_config_cannot_construct_python_objects(tmp_path, sentinel):
    from training.config import ConfigError, read_config_file

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f'optim: !!python/object/apply:os.system ["touch {sentinel}"]\n')
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_config_file(str(cfg))
    assert not os.path.exists(sentinel)


# -- type and size checks: every refusal names the file, what was expected and what was found --

def _truncated_safetensors(path):
    save_file({"w": torch.randn(64, 64)}, path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _huge_header(path):
    with open(path, "wb") as f:  # header length field claims 2^60 bytes
        f.write(struct.pack("<Q", 1 << 60) + b"{}")


def _pickle_named_safetensors(path):
    torch.save({"w": torch.zeros(2)}, path)


def _truncated_pt(path):
    torch.save({"w": torch.randn(256, 256)}, path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("make, name, expected", [
    (_truncated_safetensors, "cut.safetensors", "not a readable safetensors file"),
    (_huge_header, "huge.safetensors", "not a readable safetensors file"),
    (_pickle_named_safetensors, "pickle.safetensors", "not a readable safetensors file"),
    (_truncated_pt, "cut.pt", "could not be loaded as a weights-only PyTorch file"),
    (lambda p: torch.save([torch.zeros(2)], p), "list.pt", "holds a list, expected a dict of tensors"),
    (lambda p: torch.save({"w": torch.zeros(2), "epoch": 3}, p), "mixed.pt", "entry 'epoch' is a int"),
    (lambda p: open(p, "wb").close(), "empty.safetensors", "is empty (0 bytes)"),
    (lambda p: os.mkdir(p), "folder.safetensors", "is not a file"),
    (lambda p: save_file({"w": torch.zeros(2)}, p), "weights.gguf", "unknown extension; expected one of .safetensors"),
    (lambda p: None, "missing.safetensors", "does not exist"),
])
def test_bad_model_files_are_refused_with_a_clear_error(tmp_path, make, name, expected):
    path = str(tmp_path / name)
    make(path)
    with pytest.raises(ModelFileError) as e:
        load_tensors(path, "test weights")
    message = str(e.value)
    assert message.startswith(f"test weights: {path!r}") and expected in message, message


def test_lora_list_of_the_wrong_shape_is_refused_naming_layer_and_shapes(tmp_path):
    path = str(tmp_path / "wrong.pt")
    torch.save([torch.zeros(320, 4), torch.zeros(4, 999)] * 224, path)
    with pytest.raises(ModelFileError, match=r"layer 0 .* expects up .* found tensors 0 and 1 with shapes"):
        load_reference_lora(path)


# -- data files: undecodable text is a DataError naming the file, never a traceback --

def test_undecodable_caption_and_table_files_are_data_errors(tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    (folder / "a.txt").write_bytes(b"caption \xff\xfe not utf-8")
    with pytest.raises(DataError, match=r"a\.txt: not readable as UTF-8 text"):
        read_records(str(folder), need_images=True)
    table = tmp_path / "rows.jsonl"
    table.write_text('{"caption": "fine"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"rows\.jsonl:2: expected a JSON object, found list"):
        read_records(str(table), need_images=False)
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"ok\n\x80\x81\n")
    with pytest.raises(DataError, match=r"prompts\.txt: not readable as UTF-8 text"):
        read_records(str(prompts), need_images=False)
