"""TextAdapter (LaVi-Bridge) and LongSD's T5 branch: structure, save/load, T5 loading, ct5f conditioning."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from tiny_models import tiny_t5_encoder, tiny_text_adapter as tiny_adapter
from training.adapter import TextAdapter, load_text_adapter
from training.encode import SegmentOptions, encode_long_prompts
from training.safe_io import ModelFileError, save_tensors
from training.t5 import T5Branch, encode_ct5f, load_t5_encoder, t5_tokenizer


@pytest.fixture(scope="module")
def comfy_t5_tokenizer(comfy):
    return t5_tokenizer(os.path.join(comfy, "comfy", "text_encoders", "t5_tokenizer"))


def test_structure_and_formula():
    adapter = tiny_adapter(8, 12, 16)
    shapes = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
    assert shapes == {  # the released adapters' names: ff1.net.0.proj = GEGLU proj, ff1.net.2 = output Linear
        "ff1.net.0.proj.weight": (64, 8), "ff1.net.0.proj.bias": (64,), "ff1.net.2.weight": (12, 32), "ff1.net.2.bias": (12,),
        "ff2.net.0.proj.weight": (96, 12), "ff2.net.0.proj.bias": (96,), "ff2.net.2.weight": (16, 48), "ff2.net.2.bias": (16,),
        "norm1.weight": (8,), "norm1.bias": (8,), "norm2.weight": (12,), "norm2.bias": (12,),
    }
    x = torch.randn(2, 5, 8)
    sd = adapter.state_dict()

    def ff(h, i):
        a, b = F.linear(h, sd[f"ff{i}.net.0.proj.weight"], sd[f"ff{i}.net.0.proj.bias"]).chunk(2, dim=-1)
        return F.linear(a * F.gelu(b), sd[f"ff{i}.net.2.weight"], sd[f"ff{i}.net.2.bias"])

    h = ff(F.layer_norm(x, (8,), sd["norm1.weight"], sd["norm1.bias"]), 1)
    y = ff(F.layer_norm(h, (12,), sd["norm2.weight"], sd["norm2.bias"]), 2)
    assert torch.allclose(adapter(x).sample, y, atol=1e-6)
    assert adapter.train()(x).sample.ne(adapter.eval()(x).sample).any()  # Dropout(0.1) is there


def test_save_pretrained_loads_back_identically(tmp_path):
    adapter = tiny_adapter()
    adapter.save_pretrained(tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path / "adapter")) == ["config.json", "diffusion_pytorch_model.safetensors"]
    config = json.loads((tmp_path / "adapter" / "config.json").read_text())
    assert (config["in_dim"], config["int_dim"], config["out_dim"]) == (64, 48, 768)
    x = torch.randn(1, 7, 64)
    want = adapter(x).sample
    for loaded in (load_text_adapter(str(tmp_path / "adapter")), TextAdapter.from_pretrained(tmp_path / "adapter").eval()):
        assert not loaded.training
        assert torch.equal(loaded(x).sample, want)


def test_bad_adapter_folders_are_refused(tmp_path):
    tiny_adapter().save_pretrained(tmp_path / "a")
    os.remove(tmp_path / "a" / "config.json")
    with pytest.raises(ModelFileError, match=r"config\.json.* is missing"):
        load_text_adapter(str(tmp_path / "a"))
    tiny_adapter().save_pretrained(tmp_path / "b")
    os.remove(tmp_path / "b" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ModelFileError, match="no weights"):
        load_text_adapter(str(tmp_path / "b"))
    tiny_adapter(int_dim=32).save_pretrained(tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text(json.dumps({"in_dim": 64, "int_dim": 48, "out_dim": 768}))
    with pytest.raises(ModelFileError, match="does not match config"):
        load_text_adapter(str(tmp_path / "c"))


def test_t5_single_file_equals_folder(tmp_path):
    t5 = tiny_t5_encoder()
    t5.save_pretrained(tmp_path / "t5")
    single_file = {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}  # tied to shared
    save_tensors({"decoder.block.0.x": torch.zeros(1), **single_file}, str(tmp_path / "t5.safetensors"))
    ids = torch.randint(0, 32100, (2, 9))
    want = t5(input_ids=ids).last_hidden_state
    single = load_t5_encoder(str(tmp_path / "t5.safetensors"))
    assert (single.config.d_model, single.config.num_layers, single.config.num_heads, single.config.d_ff) == (64, 2, 4, 128)
    for loaded in (load_t5_encoder(str(tmp_path / "t5")), single):
        assert torch.allclose(loaded(input_ids=ids).last_hidden_state, want, atol=1e-6)
    with pytest.raises(ModelFileError, match="not a T5 encoder"):
        save_tensors({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
        load_t5_encoder(str(tmp_path / "other.safetensors"))


def test_ct5f_is_clip_concat_then_adapted_t5(tiny_clip_pair, comfy_t5_tokenizer):
    backend, _ = tiny_clip_pair
    branch = T5Branch(comfy_t5_tokenizer, tiny_t5_encoder(), tiny_adapter())
    texts = ["A red fox sleeps under a tree. Snow falls on the quiet forest; the moon is full.", ""]
    with torch.no_grad():
        out = encode_ct5f(texts, backend, branch, SegmentOptions())
        clip = encode_long_prompts(texts, backend, SegmentOptions()).cond
        ids = comfy_t5_tokenizer(texts, max_length=240, padding="max_length", truncation=True, return_tensors="pt").input_ids
        t5 = branch.adapter(branch.encoder(input_ids=ids).last_hidden_state).sample
    assert out.cond.shape == (2, 480, 768)
    assert torch.equal(out.cond[:, :240], clip)
    assert torch.allclose(out.cond[:, 240:], t5, atol=1e-6)
    assert ids[1, 0] == comfy_t5_tokenizer.eos_token_id and ids[1, 1] == comfy_t5_tokenizer.pad_token_id
    with pytest.raises(ValueError, match="needs token_length >= 1"):
        encode_ct5f(texts, backend, branch, SegmentOptions(token_length=0))
    with pytest.raises(ValueError, match="does not match the TextAdapter's in_dim"):
        T5Branch(comfy_t5_tokenizer, tiny_t5_encoder(d_model=32), tiny_adapter())


def test_node_gives_480_tokens_for_prompt_and_empty_prompt(pack, tiny_clip_pair, comfy_t5_tokenizer):
    backend, clip = tiny_clip_pair
    branch = T5Branch(comfy_t5_tokenizer, tiny_t5_encoder(), tiny_adapter())
    node = pack.nodes.encode.LongAlignTextEncode()
    pos = node.encode(clip, "A blue boat. A green sea.", "sentences", 240, "mean", True, t5_adapter=branch)[0]
    neg = node.encode(clip, "", "sentences", 240, "mean", True, t5_adapter=branch)[0]
    plain = node.encode(clip, "A blue boat. A green sea.", "sentences", 240, "mean", True)[0]
    assert pos[0][0].shape == neg[0][0].shape == (1, 480, 768)
    assert plain[0][0].shape == (1, 240, 768)
    assert torch.allclose(pos[0][0][:, :240], plain[0][0], atol=1e-5)  # the CLIP half is the plain node's output
    with torch.no_grad():
        direct = encode_ct5f([""], backend, branch).cond
    assert torch.allclose(neg[0][0], direct, atol=1e-4)  # node (ComfyUI CLIP) == trainer (transformers CLIP)
