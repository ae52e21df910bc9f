"""Convert a LongSD reference LoRA list (``.pt``) to named safetensors for ComfyUI's stock LoraLoader.

    python -m training.convert_lora s28750_lora_vis.pt longsd_align.safetensors

The ``.pt`` is read with weights-only unpickling (nothing in it can run), its 224 layers are matched
to the SD1.5 UNet in reference order with every shape checked (:mod:`.lora_format`), and the output
holds kohya names (``lora_unet_....lora_up.weight`` / ``.lora_down.weight`` / ``.alpha = rank``),
written atomically. Apply several converted files in the reference order: alignment, then reward.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


def convert(src: str, dst: str, unet_config: dict | None = None) -> dict[str, str]:
    """Convert ``src`` to ``dst``; returns the metadata written into the safetensors header."""
    from .lora_format import REFERENCE_RANK, load_reference_lora, lora_layers, sd15_unet_config
    from .safe_io import save_tensors

    config = sd15_unet_config() if unet_config is None else unet_config
    named = load_reference_lora(src, config)
    ranks = sorted({int(v) for k, v in named.items() if k.endswith(".alpha")})
    metadata = {
        "format": "kohya lora (lora_unet_*), converted from the LongSD reference list format",
        "source": src,
        "layers": str(len(lora_layers(config))),
        "rank": ",".join(map(str, ranks)),
        "ss_network_dim": str(ranks[0] if len(ranks) == 1 else REFERENCE_RANK),
        "ss_network_alpha": str(ranks[0] if len(ranks) == 1 else REFERENCE_RANK),
        "ss_base_model_version": "sd_v1",
        "longalign_unet_config": json.dumps(config, sort_keys=True),
    }
    save_tensors(named, dst, metadata=metadata)
    return metadata


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.convert_lora",
        description="Convert a LongSD LoRA list (.pt: [up_0, down_0, ...], fp16, SD1.5 UNet order) to a "
                    "safetensors LoRA that ComfyUI's stock LoraLoader reads (kohya names, alpha = rank).",
    )
    parser.add_argument("src", metavar="IN.pt", help="reference LoRA list, e.g. s28750_lora_vis.pt or sd15-reward-3750.pt")
    parser.add_argument("dst", metavar="OUT.safetensors", help="output file (written atomically)")
    parser.add_argument("--unet-config", metavar="CONFIG.json",
                        help="diffusers UNet2DConditionModel config.json (default: the SD1.5 config shipped with the pack)")
    args = parser.parse_args(argv)
    if not args.dst.lower().endswith(".safetensors"):
        parser.error(f"OUT must end with .safetensors, got {args.dst!r}")
    from .safe_io import ModelFileError, load_json_object  # after parsing: --help answers before torch loads

    try:
        config = load_json_object(args.unet_config, "--unet-config") if args.unet_config else None
        meta = convert(args.src, args.dst, config)
    except (ModelFileError, OSError) as e:  # OSError: the output could not be written (disk full, permissions)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}: {meta['layers']} layers, rank {meta['rank']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
