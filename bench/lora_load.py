"""LongSD Loader on a reference ``.pt`` list vs ComfyUI's stock LoraLoader on the converted file (issue 5).

One LoRA in both forms (rank 32, every target layer; the tiny test UNet in ``--quick``, SD1.5 size
otherwise), one in-process ComfyUI model built from its detected config (weights left uninitialised:
loading and patching do not read them). Each side is its node's whole call: read the file, name and
check the tensors (ours: weights-only unpickling, layer order rebuilt from the architecture, every
shape checked), hand them to ComfyUI's ModelPatcher. Interleaved, medians; target ours <= 1.2x.
"""
from __future__ import annotations

import os
import tempfile
import time

import torch

from .common import Result, paired_median_times
from .comfy_setup import comfy_ready, comfy_sd15_model

RANK = 32


def run(quick: bool) -> list[Result]:
    comfy_ready(quick)
    import folder_paths
    import nodes as comfy_nodes
    from comfy_inprocess import load_pack

    from training.convert_lora import convert
    from training.lora_format import _layers_for, lora_layers, unet_config_from_ldm

    pack = load_pack()
    model, ldm = comfy_sd15_model(quick)
    config = unet_config_from_ldm(ldm)
    layers = lora_layers(config)
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(shape, generator=g).half() * 0.01 for layer in layers for shape in layer.lora_shapes(RANK)]
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(tensors, os.path.join(tmp, "longsd.pt"))
        convert(os.path.join(tmp, "longsd.pt"), os.path.join(tmp, "longsd.safetensors"), config)
        size_mb = os.path.getsize(os.path.join(tmp, "longsd.safetensors")) / 2**20
        folder_paths.add_model_folder_path("loras", tmp)
        ours_node = pack.NODE_CLASS_MAPPINGS["LongAlignLongSDLoader"]()

        def ours():
            return ours_node.load(model, "longsd.pt", 1.0, "None", 0.0)

        def stock():  # a fresh node each call: LoraLoader caches the last file it read
            return comfy_nodes.LoraLoader().load_lora(model, None, "longsd.safetensors", 1.0, 0.0)

        _layers_for.cache_clear()
        start = time.perf_counter()
        ours()
        cold = time.perf_counter() - start
        t_ours, t_stock = paired_median_times(ours, stock, repeats=5 if quick else 7, warmup=1)
    name = "tiny UNet" if quick else "SD1.5"
    ratio = t_ours / t_stock
    return [Result(
        name=f"LoRA load+patch, {len(layers)} layers r{RANK} ({name})", ours=t_ours, baseline=t_stock, unit="s",
        target="<= 1.2x", passed=None if quick else ratio <= 1.2,  # CPU timings are reported, not asserted
        note=f"{size_mb:.0f} MB; ours cold (layer order rebuilt on a meta UNet) {cold:.3f} s",
    )]
