"""Config bombs: a tiny config.json naming huge sizes or thousands of layers, next to a tiny weight
file, is refused in under 2 s with the process grown by under 200 MB, for every loader that builds a
model from a user's config (TextAdapter, T5, open_clip and transformers CLIP reward models, BLIP
captioner). Each load runs in a forked child of a fresh process (``tests/measure_load.py``), which
measures its peak resident memory and caps its address space, so a regression fails here instead of
taking the machine down."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from test_comat import make_tiny_blip
from tiny_models import TINY_OPEN_CLIP, build_tiny_clipmodel, build_tiny_open_clip, tiny_t5_encoder, tiny_text_adapter
from training.safe_io import save_tensors

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_SECONDS = 2.0
MAX_GROWTH_MB = 200


def _json(path, data) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def _edit_json(path, edit) -> None:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    edit(data)
    _json(path, data)


def _tiny_weights(path: str) -> None:
    """A 68-byte-class safetensors file: one 1-element tensor."""
    save_tensors({"x": torch.zeros(1)}, path)


def _adapter(root, name, dims, real_weights=False) -> str:
    folder = os.path.join(root, name)
    os.makedirs(folder)
    _json(os.path.join(folder, "config.json"), dims)
    weights = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    if real_weights:
        save_tensors(tiny_text_adapter(8, 8, 8).state_dict(), weights)
    else:
        _tiny_weights(weights)
    return folder


def _t5(root, name, **config) -> str:
    folder = os.path.join(root, name)
    tiny_t5_encoder(d_model=32).save_pretrained(folder)
    _edit_json(os.path.join(folder, "config.json"), lambda c: c.update(config))
    return folder


def _t5_file_with_many_blocks(root, name, blocks) -> str:
    """One safetensors file whose tensor names claim ``blocks`` encoder blocks (T5's config is read off them)."""
    state = {k: v.clone() for k, v in tiny_t5_encoder(d_model=32).state_dict().items() if k != "encoder.embed_tokens.weight"}
    state.update({f"encoder.block.{i}.layer.0.layer_norm.weight": torch.zeros(1) for i in range(2, blocks)})
    return save_tensors(state, os.path.join(root, name + ".safetensors"))


def _open_clip(root, name, tiny, vision=None, text=None) -> str:
    cfg = copy.deepcopy(TINY_OPEN_CLIP)
    cfg["vision_cfg"].update(vision or {})
    cfg["text_cfg"].update(text or {})
    folder = os.path.join(root, name)
    os.makedirs(folder)
    _json(os.path.join(folder, "open_clip_config.json"), {"model_cfg": cfg})
    os.link(os.path.join(tiny["hub"], "open_clip_model.safetensors"), os.path.join(folder, "open_clip_model.safetensors"))
    return folder


def _transformers(root, name, build, text=None, vision=None) -> str:
    folder = os.path.join(root, name)
    build(folder)

    def edit(c):
        c["text_config"].update(text or {})
        c["vision_config"].update(vision or {})
    _edit_json(os.path.join(folder, "config.json"), edit)
    return folder


WIDE = {"hidden_size": 16384, "intermediate_size": 65536, "num_attention_heads": 16}
DEEP = {"num_hidden_layers": 2000}

CASES = {
    # name: (loader, how to build the folder, what the refusal must say)
    "adapter_beyond_bounds": ("adapter", lambda r, t: _adapter(r, "a1", {"in_dim": 10**6, "int_dim": 10**6, "out_dim": 768}),
                              "in_dim is 1000000; expected a number from 0 to 16,384"),
    "adapter_wide_within_bounds": ("adapter", lambda r, t: _adapter(r, "a2", {"in_dim": 16384, "int_dim": 16384, "out_dim": 16384}),
                                   "does not match config"),
    "adapter_wide_real_weights": ("adapter", lambda r, t: _adapter(r, "a3", {"in_dim": 8, "int_dim": 12000, "out_dim": 8}, True),
                                  "does not match config"),
    "t5_wide": ("t5", lambda r, t: _t5(r, "t1", d_model=16384, d_ff=65536, num_heads=128, d_kv=128), "weights do not match"),
    "t5_huge_vocab": ("t5", lambda r, t: _t5(r, "t2", vocab_size=10**8), "vocab_size is 100000000"),
    "t5_deep": ("t5", lambda r, t: _t5(r, "t3", num_layers=5000), "num_layers is 5000"),
    "t5_file_with_thousands_of_blocks": ("t5", lambda r, t: _t5_file_with_many_blocks(r, "t4", 3000), "num_layers is 3000"),
    "open_clip_2000_layers": ("open_clip", lambda r, t: _open_clip(r, "o1", t, {"layers": 2000}, {"layers": 2000}),
                              "vision_cfg.layers is 2000"),
    "open_clip_250_layers_tiny_file": ("open_clip", lambda r, t: _open_clip(r, "o2", t, {"layers": 250}, {"layers": 250}),
                                       "layers but the weights hold only"),
    "open_clip_wide": ("open_clip", lambda r, t: _open_clip(r, "o3", t, {"width": 16384, "head_width": 128},
                                                            {"width": 16384, "heads": 128}), "does not match open_clip"),
    "open_clip_wide_beyond_bounds": ("open_clip", lambda r, t: _open_clip(r, "o4", t, {"width": 10**7}), "width is 10000000"),
    "clip_wide": ("clip", lambda r, t: _transformers(r, "c1", build_tiny_clipmodel, WIDE, WIDE), "parameters but the weights hold"),
    "clip_deep": ("clip", lambda r, t: _transformers(r, "c2", build_tiny_clipmodel, DEEP, DEEP), "num_hidden_layers is 2000"),
    "captioner_wide": ("captioner", lambda r, t: _transformers(r, "b1", make_tiny_blip, WIDE, WIDE), "parameters but the weights hold"),
    "captioner_deep": ("captioner", lambda r, t: _transformers(r, "b2", make_tiny_blip, DEEP, DEEP), "num_hidden_layers is 2000"),
}


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict[str, dict]:
    root = str(tmp_path_factory.mktemp("bombs"))
    _, tiny_open_clip = build_tiny_open_clip(os.path.join(root, "tiny"))
    cases = {name: [loader, build(root, tiny_open_clip)] for name, (loader, build, _) in CASES.items()}
    cases["control_adapter_loads"] = ["adapter", _adapter(root, "ok", {"in_dim": 8, "int_dim": 8, "out_dim": 8}, True)]
    cases["control_allocate_300_mb"] = ["allocate_mb", "300"]
    out = subprocess.run([sys.executable, os.path.join(HERE, "measure_load.py"), json.dumps(list(cases.values()))],
                         capture_output=True, text=True, timeout=600)
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == len(cases), out.stdout[-3000:] + out.stderr[-3000:]
    return dict(zip(cases, lines))


def test_the_measurement_sees_a_load_and_an_allocation(measured):
    """Controls: a good folder loads in the child, and 300 MB allocated there is measured as such."""
    assert measured["control_adapter_loads"]["outcome"] == "loaded", measured["control_adapter_loads"]
    assert measured["control_allocate_300_mb"]["grew_mb"] > 250, measured["control_allocate_300_mb"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_bomb_is_refused_at_once_in_little_memory(measured, case):
    result, expected = measured[case], CASES[case][2]
    assert result["outcome"].startswith("refused: ") and expected in result["outcome"], result
    assert result["seconds"] < MAX_SECONDS, result
    assert result["grew_mb"] < MAX_GROWTH_MB, result
