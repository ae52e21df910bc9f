"""The LongSD reference LoRA list format: order, shapes, names, merging through ComfyUI, bad files."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from tiny_models import TINY_UNET_CONFIG, reference_lora_list, reference_lora_targets, tiny_unet
from training import lora_format
from training.lora_format import (
    list_from_named, load_reference_lora, lora_layers, sd15_reference_order, sd15_unet_config, unet_config_from_ldm,
)
from training.safe_io import ModelFileError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SDXL_UNET_CONFIG = dict(
    block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True, layers_per_block=2,
)


def meta_unet(config):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)


@pytest.fixture(scope="module")
def tiny_lists(tmp_path_factory):
    """Two reference-format LoRAs (alignment, reward) for the tiny UNet, saved as the reference does."""
    unet = tiny_unet(0)
    folder = tmp_path_factory.mktemp("lists")
    paths = []
    for seed, name in ((1, "align.pt"), (2, "reward.pt")):
        path = str(folder / name)
        torch.save(reference_lora_list(unet, rank=4, seed=seed), path)
        paths.append(path)
    return paths


def test_sd15_order_is_the_reference_walk_224_layers():
    layers = lora_layers()  # the shipped SD1.5 config
    reference = reference_lora_targets(meta_unet(sd15_unet_config()))
    assert [layer.name for layer in layers] == [name for name, _ in reference]
    assert [layer.weight_shape for layer in layers] == [tuple(m.weight.shape) for _, m in reference]
    assert len(layers) == 224
    resnet = [layer for layer in layers if ".resnets." in layer.name]
    assert len(resnet) == 80 and sum(layer.name.endswith("conv_shortcut") for layer in resnet) == 14
    # registration order, not forward order: down, up, then mid; attentions before resnets
    assert layers[0].name == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert layers[-1].name == "mid_block.resnets.1.conv2"
    names = {layer.name for layer in layers}
    assert not any(n.endswith(("proj_in", "proj_out", "ff.net.2")) for n in names)  # not targets (SPEC §4)
    first_up = next(i for i, layer in enumerate(layers) if layer.name.startswith("up_blocks"))
    assert layers[first_up - 1].name == "down_blocks.3.resnets.1.conv2"


def test_the_shipped_sd15_table_is_the_rebuild_from_the_shipped_config():
    """The fixed table (training/assets/sd15_lora_order.json) equals, name by name and shape by shape,
    what the installed diffusers rebuilds from training/configs/sd15/unet, and is what lora_layers gives."""
    table = sd15_reference_order()
    rebuilt = lora_format._layers_for(json.dumps(sd15_unet_config(), sort_keys=True, default=list))
    assert len(table) == 224 and table == rebuilt
    assert lora_layers() is table and lora_layers(unet_config_from_ldm(SD15_LDM)) is table
    with open(lora_format.SD15_ORDER_FILE, encoding="utf-8") as f:
        assert [name for name, _ in json.load(f)["layers"]] == [layer.name for layer in rebuilt]


SD15_LDM = {"model_channels": 320, "channel_mult": [1, 2, 4, 4], "num_res_blocks": [2, 2, 2, 2],
            "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1, "context_dim": 768,
            "num_heads": 8}


def _sd15_list(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).half() for layer in sd15_reference_order() for shape in layer.lora_shapes(1)]


def test_a_reordered_rebuild_is_detected_and_the_shipped_order_is_used(monkeypatch, tmp_path):
    """A diffusers release that registered attn1's to_k before to_q (equal shapes: no shape check can
    see it) would put LongSD's to_q weights on to_k; the table catches it and keeps the reference order."""
    table = sd15_reference_order()
    swapped = list(table)
    swapped[0], swapped[1] = swapped[1], swapped[0]  # ...attn1.to_q <-> ...attn1.to_k, both (320, 320)
    assert swapped[0].weight_shape == swapped[1].weight_shape
    monkeypatch.setattr(lora_format, "_layers_for", lambda config_json: tuple(swapped))
    with pytest.warns(UserWarning, match=r"another order .*layer 0: .*attn1\.to_k, expected .*attn1\.to_q"):
        layers = lora_layers(unet_config_from_ldm(SD15_LDM))
    assert layers == table
    tensors = _sd15_list()
    torch.save(tensors, tmp_path / "s28750_lora_vis.pt")
    with pytest.warns(UserWarning, match="another order"):
        named = load_reference_lora(str(tmp_path / "s28750_lora_vis.pt"))
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1"
    assert torch.equal(named[f"{stem}_to_q.lora_up.weight"], tensors[0])  # up_0 is to_q's, as LongSD saved it
    assert torch.equal(named[f"{stem}_to_k.lora_up.weight"], tensors[2])


def test_a_rebuild_with_other_layers_is_not_the_table():
    """Only exactly SD1.5's layers get the table: the tiny UNet and SDXL keep their rebuilt layers."""
    for config in (TINY_UNET_CONFIG, SDXL_UNET_CONFIG):
        layers = lora_layers(config)
        assert layers == lora_format._layers_for(json.dumps(dict(config), sort_keys=True, default=list))
        assert len(layers) != 224


@pytest.mark.parametrize("damage", ["short", "duplicate", "shape"])
def test_a_damaged_table_is_refused(tmp_path, damage):
    with open(lora_format.SD15_ORDER_FILE, encoding="utf-8") as f:
        data = json.load(f)
    if damage == "short":
        data["layers"].pop()
    elif damage == "duplicate":
        data["layers"][1] = data["layers"][0]
    else:
        data["layers"][5][1] = [320]
    path = tmp_path / "order.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(RuntimeError, match="expected 224 distinct layers"):
        sd15_reference_order(str(path))


@pytest.mark.comfyui  # ComfyUI's loaders in-process: rerun on every ComfyUI version
def test_comfyui_detected_configs_give_the_same_layers(comfy, tiny_sd15_checkpoint):
    """ComfyUI's LDM-style unet_config (what a loaded MODEL carries) maps back to the same layers,
    for SD1.5 and for the tiny test checkpoint, and every kohya name is one ComfyUI maps."""
    import comfy.model_detection
    import comfy.sd
    import comfy.utils

    sd15_ldm = comfy.model_detection.unet_config_from_diffusers_unet(meta_unet(sd15_unet_config()).state_dict())
    tiny = comfy.sd.load_checkpoint_guess_config(tiny_sd15_checkpoint, output_vae=False, output_clip=False)[0]
    assert type(tiny.model.model_config).__name__ == "SD15"
    for ldm, config in ((sd15_ldm, sd15_unet_config()), (tiny.model.model_config.unet_config, TINY_UNET_CONFIG)):
        assert lora_layers(unet_config_from_ldm(ldm)) == lora_layers(config)
        mapped = {"lora_unet_" + k[: -len(".weight")].replace(".", "_") for k in comfy.utils.unet_to_diffusers(ldm)}
        assert {layer.kohya_name for layer in lora_layers(config)} <= mapped


def test_named_weights_round_trip_and_alpha(tiny_lists):
    tensors = torch.load(tiny_lists[0], weights_only=True)
    named = load_reference_lora(tiny_lists[0], TINY_UNET_CONFIG)
    layers = lora_layers(TINY_UNET_CONFIG)
    assert len(named) == 3 * len(layers) == 3 * 53
    assert all(float(v) == 4.0 for k, v in named.items() if k.endswith(".alpha"))  # alpha = rank: scale 1
    back = list_from_named(named, layers)
    assert all(torch.equal(a, b) for a, b in zip(back, tensors)) and len(back) == len(tensors)
    named[f"{layers[0].kohya_name}.alpha"] = torch.tensor(2.0)  # alpha/r = 0.5 folds into up
    assert torch.equal(list_from_named(named, layers)[0], tensors[0] * 0.5)


def _merged_diffusers(unet, lists) -> dict[str, torch.Tensor]:
    """Every target layer merged in diffusers: W + sum_lists up @ down (the reference's collapse)."""
    out = {}
    targets = reference_lora_targets(unet)
    for name, layer in targets:
        out[name] = layer.weight.detach().clone()
    for tensors in lists:
        for i, (name, layer) in enumerate(targets):
            up, down = tensors[2 * i].float(), tensors[2 * i + 1].float()
            out[name] += (up.flatten(1) @ down.flatten(1)).reshape(layer.weight.shape)
    return out


@pytest.mark.comfyui  # ComfyUI's loaders in-process: rerun on every ComfyUI version
def test_longsd_loader_merge_equals_diffusers_merge_layer_by_layer(comfy, pack, tiny_sd15_checkpoint, tiny_lists):
    """Alignment then reward list, loaded by the node and patched by ComfyUI, equals merging both
    into the diffusers UNet directly, for every one of the targeted layers; other weights untouched."""
    import comfy.sd
    import comfy.utils
    import folder_paths

    folder_paths.add_model_folder_path("loras", os.path.dirname(tiny_lists[0]))
    model = comfy.sd.load_checkpoint_guess_config(tiny_sd15_checkpoint, output_vae=False, output_clip=False)[0]
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    patched, clip = pack.nodes.longsd.LongSDLoader().load(model, "align.pt", 1.0, "reward.pt", 1.0)
    assert clip is None and patched is not model

    unet = tiny_unet(0).half().float()  # the checkpoint stores fp16
    lists = [torch.load(p, weights_only=True) for p in tiny_lists]
    expected = _merged_diffusers(unet, lists)
    to_ldm = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    patched.patch_model()
    try:
        after = {k: v.detach().clone() for k, v in patched.model.diffusion_model.state_dict().items()}
    finally:
        patched.unpatch_model()
    targeted = set()
    for name, weight in expected.items():
        key = to_ldm[name + ".weight"]
        targeted.add(key)
        assert torch.allclose(after[key], weight, atol=1e-5, rtol=1e-5), name
        assert not torch.allclose(after[key], before[key]), name  # the LoRA did change it
    assert len(targeted) == 53
    for key in before.keys() - targeted:
        assert torch.equal(after[key], before[key]), key
    assert torch.equal(model.model.diffusion_model.state_dict()[key], before[key])  # input model unpatched


@pytest.mark.comfyui  # ComfyUI's loaders in-process: rerun on every ComfyUI version
def test_strength_scales_the_delta(comfy, pack, tiny_sd15_checkpoint, tiny_lists):
    import comfy.sd

    model = comfy.sd.load_checkpoint_guess_config(tiny_sd15_checkpoint, output_vae=False, output_clip=False)[0]
    key = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    base = model.model.diffusion_model.state_dict()[key].clone()
    deltas = []
    for strength in (1.0, 0.5):
        patched, _ = pack.nodes.longsd.apply_lora(model, None, tiny_lists[0], strength, "alignment")
        patched.patch_model()
        deltas.append(patched.model.diffusion_model.state_dict()[key].clone() - base)
        patched.unpatch_model()
    assert deltas[0].abs().max() > 0
    assert torch.allclose(deltas[1], 0.5 * deltas[0], atol=1e-6)


def test_converter_cli_writes_kohya_safetensors(tmp_path, capsys):
    from training.convert_lora import main

    out = tmp_path / "align.safetensors"
    sd15 = tmp_path / "sd15.pt"
    g = torch.Generator().manual_seed(0)
    sd15_tensors = [torch.randn(shape, generator=g).half() for layer in lora_layers() for shape in layer.lora_shapes(1)]
    torch.save(sd15_tensors, sd15)
    run = subprocess.run([sys.executable, "-m", "training.convert_lora", str(sd15), str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "224 layers" in run.stdout
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        first = f.get_tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight")
        alpha = f.get_tensor("lora_unet_mid_block_resnets_1_conv2.alpha")
    assert len(keys) == 3 * 224 and meta["layers"] == "224" and meta["rank"] == "1" and float(alpha) == 1.0
    assert torch.equal(first, sd15_tensors[0])
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # atomic write left nothing behind
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0 and "OUT.safetensors" in capsys.readouterr().out


def test_converter_refuses_a_list_for_another_unet(tiny_lists, tmp_path, capsys):
    from training.convert_lora import main

    assert main([tiny_lists[0], str(tmp_path / "x.safetensors")]) == 2  # a tiny-UNet list is not SD1.5
    err = capsys.readouterr().err
    assert "expected 448 tensors (224 layers" in err and "found 106" in err
    assert not os.path.exists(tmp_path / "x.safetensors")


def test_sdxl_list_is_refused_for_sd15(tmp_path):
    sdxl_layers = lora_layers(SDXL_UNET_CONFIG)
    tensors = []
    for layer in sdxl_layers:
        up, down = layer.lora_shapes(1)
        tensors += [torch.zeros(up, dtype=torch.float16), torch.zeros(down, dtype=torch.float16)]
    path = tmp_path / "sdxl.pt"
    torch.save(tensors, path)
    with pytest.raises(ModelFileError, match=rf"expected 448 tensors .* found {len(tensors)}"):
        load_reference_lora(str(path))


def test_wrong_shape_names_the_layer(tiny_lists, tmp_path):
    tensors = torch.load(tiny_lists[0], weights_only=True)
    tensors[7] = tensors[7][:, :100]  # down of layer 3 (attn1.to_out.0) with the wrong in-features
    path = tmp_path / "bad.pt"
    torch.save(tensors, path)
    with pytest.raises(ModelFileError, match=r"layer 3 \(down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1\.to_out\.0.*"
                                             r"expects up \(320, 4\) and down \(4, 320\).*\(4, 100\)"):
        load_reference_lora(str(path), TINY_UNET_CONFIG)


def test_truncated_file_is_refused(tiny_lists, tmp_path):
    data = open(tiny_lists[0], "rb").read()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="could not be loaded as a weights-only"):
        load_reference_lora(str(path), TINY_UNET_CONFIG)


class _Sentinel:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_code_pickle_is_refused_without_running(tmp_path):
    sentinel = tmp_path / "ran.txt"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump([torch.zeros(2), _Sentinel(str(sentinel))], f)
    with pytest.raises(ModelFileError, match="weights-only"):
        load_reference_lora(str(path), TINY_UNET_CONFIG)
    assert not sentinel.exists()


def test_other_objects_are_refused(tmp_path):
    for obj, found in (({"a": torch.zeros(1)}, "dict"), ([torch.zeros(1), 3], "list containing Tensor, int")):
        path = tmp_path / "other.pt"
        torch.save(obj, path)
        with pytest.raises(ModelFileError, match=f"expected a plain list of tensors .* found {found}"):
            load_reference_lora(str(path), TINY_UNET_CONFIG)


@pytest.mark.comfyui  # ComfyUI's loaders in-process: rerun on every ComfyUI version
def test_safetensors_lora_for_another_model_is_refused(comfy, pack, tiny_sd15_checkpoint, tmp_path):
    """An SDXL-named safetensors LoRA matches no layer of the SD1.5 model: refused, not skipped."""
    import comfy.sd
    from training.safe_io import save_tensors

    layer = lora_layers(SDXL_UNET_CONFIG)[-30]  # a transformer_blocks.1+ layer SD1.5 does not have
    up, down = layer.lora_shapes(2)
    path = str(tmp_path / "sdxl.safetensors")
    save_tensors({f"{layer.kohya_name}.lora_up.weight": torch.zeros(up), f"{layer.kohya_name}.lora_down.weight": torch.zeros(down)}, path)
    model = comfy.sd.load_checkpoint_guess_config(tiny_sd15_checkpoint, output_vae=False, output_clip=False)[0]
    with pytest.raises(ValueError, match=r"2 keys that match no layer of this model"):
        pack.nodes.longsd.apply_lora(model, None, path, 1.0, "reward")
