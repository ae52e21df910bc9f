"""``python -m training.evaluate``: a table of decomposed preference scores for a folder of images.

    python -m training.evaluate --model models/reward_models/denscore --kind denscore \\
        --prompts prompts.txt --images outputs/ --out scores.csv --out scores.json

Prompts: a ``.txt`` file (one prompt per line) or a ``.jsonl`` / ``.csv`` table with a ``caption``
(or ``prompt``) column and optionally a ``path`` (or ``image``) column naming the image, relative to
``--images``. Without a path column, an image belongs to the prompt whose 0-based index is the
number its file name starts with (``00012.png``, ``12_seed3.png`` -> prompt 12); several images per
prompt are averaged. The table holds, per prompt, the mean total, text-relevant, text-irrelevant
and reweighted scores and eta, and their mean over the prompts (times ``--scale``; the paper reports
cosine x 100). ``--direction batch`` takes v from all prompts of the file. Outputs are written
atomically; ``.csv`` and ``.json`` by extension.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .reward_names import DIRECTION_SOURCES, REFERENCE_W, REWARD_KINDS

DTYPES = ("fp32", "fp16", "bf16")
"""Reward-model precisions; the command line is parsed before torch is imported (``--help`` answers at once)."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in ``--help``; a required option says so instead."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return f"{action.help} (required)" if action.required else super()._get_help_string(action)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=_HelpFormatter)
    p.add_argument("--model", required=True, help="reward model folder or checkpoint (local; nothing is downloaded)")
    p.add_argument("--kind", required=True, choices=REWARD_KINDS,
                   help="what --model is: denscore/pickscore (transformers CLIPModel folder), hpsv2/clip (open_clip)")
    p.add_argument("--architecture", default="ViT-H-14", help="open_clip architecture or JSON config (single-file hpsv2/clip)")
    p.add_argument("--prompts", required=True, help=".txt (one per line), .jsonl or .csv (caption[, path])")
    p.add_argument("--images", required=True, help="folder of images (named by prompt index without a path column)")
    p.add_argument("--out", action="append", required=True, help=".csv or .json; may be repeated")
    p.add_argument("--w", type=float, default=REFERENCE_W, help="weight of the text-irrelevant part (paper: 0.3)")
    p.add_argument("--direction", choices=DIRECTION_SOURCES, default="builtin",
                   help="where the common direction v comes from: the model's built-in one, the prompts of this "
                        "file (batch), or --reference")
    p.add_argument("--reference", default=None, help="reference prompt file for --direction reference")
    p.add_argument("--batch-size", type=int, default=16, help="images scored at a time")
    p.add_argument("--scale", type=float, default=1.0, help="multiply scores (100 for the paper's tables)")
    p.add_argument("--device", default="auto", help="torch device, e.g. cpu or cuda:1; auto: cuda when available")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="reward model precision")
    args = p.parse_args(argv)
    for out in args.out:
        if not out.lower().endswith((".csv", ".json")):
            p.error(f"--out {out!r}: expected a .csv or .json file name")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    from .reward_models import load_reward_model
    from .score_table import evaluate, load_prompts, write_table

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    model = load_reward_model(args.model, args.kind, device, dtype, args.architecture)
    prompts, images = load_prompts(args.prompts, args.images)
    table = evaluate(model, prompts, images, args.w, args.direction, args.reference, args.batch_size, args.scale)
    for out in args.out:
        write_table(table, out)
    if table["prompts_without_images"]:
        print(f"warning: {len(table['prompts_without_images'])} prompt(s) have no images", file=sys.stderr)
    print(json.dumps({"mean": table["mean"], "prompts_scored": table["prompts_scored"],
                      "direction": table["direction"], "note": table["note"]}))
    return table


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # ModelFileError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
