"""``python -m training.export_merged``: a UNet with LoRAs merged in, as a diffusers folder.

    W' = W + sum_i s_i (alpha_i / r_i) up_i @ down_i          (each LoRA in the order given)

LoRAs: our trainer's ``lora_weights.safetensors`` (kohya names) or LongSD's reference ``.pt`` lists,
each with a strength (``path`` or ``path:strength``). The folder is written beside its destination
and renamed when complete. An existing destination is replaced only if it is one of our outputs
(or a diffusers UNet folder of the same files); a folder holding anything else is refused, untouched.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

from .config import ModelConfig

UNET_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
"""What ``save_pretrained(safe_serialization=True)`` writes for one UNet."""
DTYPES = ("fp32", "fp16", "bf16")


def parse_lora(spec: str) -> tuple[str, float]:
    """``path`` or ``path:strength``."""
    path, sep, strength = spec.rpartition(":")
    if sep and os.path.exists(path):
        try:
            return path, float(strength)
        except ValueError:
            pass
    return spec, 1.0


def export_merged(model: ModelConfig, loras: list[tuple[str, float]], out: str, dtype: str) -> str:
    """Merge ``loras`` into ``model``'s UNet and write it to the folder ``out`` in ``dtype`` (fp32/fp16/bf16)."""
    import torch

    from .lora import merge_kohya_lora
    from .lora_format import load_reference_lora
    from .models import load_components
    from .safe_io import check_replaceable, commit_folder, load_tensors

    out = os.path.abspath(out)
    check_replaceable(out, UNET_FILES)  # before the model load: refuse at once, not after minutes
    unet = load_components(model).unet
    for path, strength in loras:
        named = (load_reference_lora(path, {k: v for k, v in unet.config.items() if not k.startswith("_")})
                 if path.lower().endswith((".pt", ".pth")) else load_tensors(path, "LoRA"))
        merge_kohya_lora(unet, named, strength)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(out) + ".", suffix=".tmp", dir=os.path.dirname(out))
    try:
        unet.to({"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]).save_pretrained(
            tmp, safe_serialization=True)
        return commit_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export_merged", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pretrained", help="SD1.5 diffusers folder or single-file checkpoint")
    source.add_argument("--tiny", action="store_true", help="the trainer's tiny preset UNet")
    parser.add_argument("--lora", action="append", required=True, metavar="PATH[:STRENGTH]",
                        help="LoRA to merge (repeatable, applied in order)")
    parser.add_argument("--out", required=True,
                        help="output folder (diffusers UNet: config.json + safetensors); a new or empty folder, or "
                             "one this command wrote before")
    parser.add_argument("--dtype", choices=DTYPES, default="fp16", help="precision of the written weights")
    args = parser.parse_args(argv)
    try:
        path = export_merged(ModelConfig(pretrained=args.pretrained, tiny=args.tiny),
                             [parse_lora(s) for s in args.lora], args.out, args.dtype)
    except ValueError as e:  # ModelFileError, OutputError, bad LoRA shapes
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
