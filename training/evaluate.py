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
import csv
import io
import json
import os
import re
import sys
from collections import defaultdict
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .scoring import (DIRECTION_SOURCES, REFERENCE_W, decompose, image_features, read_prompt_file,
                     resolve_direction, text_features)
from .reward_models import REWARD_KINDS, load_reward_model
from .safe_io import ModelFileError, atomic_open

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
COLUMNS = ("total", "text_relevant", "text_irrelevant", "reweighted", "eta")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_LEADING_INDEX = re.compile(r"^(\d+)")


def _table_rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        if path.lower().endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        return list(csv.DictReader(f))


def load_prompts(path: str, images_dir: str) -> tuple[list[str], list[list[str]]]:
    """Prompts and, per prompt, its image files (see the module docstring)."""
    if path.lower().endswith(".txt"):
        prompts, rows = read_prompt_file(path), None
    elif path.lower().endswith((".jsonl", ".csv")):
        rows = _table_rows(path)
        key = next((k for k in ("caption", "prompt") if rows and k in rows[0]), None)
        if key is None:
            raise ValueError(f"prompt table {path!r} needs a 'caption' or 'prompt' column")
        image_key = next((k for k in ("path", "image") if k in rows[0]), None)
        prompts = [str(r[key]) for r in rows]
        if image_key is not None:
            unique = list(dict.fromkeys(prompts))
            groups: dict[str, list[str]] = defaultdict(list)
            for prompt, row in zip(prompts, rows):
                groups[prompt].append(os.path.join(images_dir, str(row[image_key])))
            return unique, [groups[p] for p in unique]
    else:
        raise ValueError(f"prompt file {path!r}: expected .txt, .jsonl or .csv")
    return prompts, _images_by_index(images_dir, len(prompts))


def _images_by_index(images_dir: str, n: int) -> list[list[str]]:
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(f"images folder {images_dir!r} does not exist")
    groups: list[list[str]] = [[] for _ in range(n)]
    for name in sorted(os.listdir(images_dir)):
        if not name.lower().endswith(IMAGE_SUFFIXES):
            continue
        match = _LEADING_INDEX.match(name)
        if match is None or int(match.group(1)) >= n:
            raise ValueError(f"image {name!r} in {images_dir!r}: its name must start with the 0-based index of "
                             f"its prompt (0..{n - 1}), e.g. 00012.png; or give a prompt table with a path column")
        groups[int(match.group(1))].append(os.path.join(images_dir, name))
    return groups


def load_image(path: str) -> torch.Tensor:
    """``(3, H, W)`` float in [0, 1]."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path!r} does not exist")
    with Image.open(path) as im:
        array = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


def evaluate(model, prompts: Sequence[str], images: Sequence[Sequence[str]], w: float = REFERENCE_W,
             direction: str = "builtin", reference: str | None = None, batch_size: int = 16,
             scale: float = 1.0) -> dict:
    """Per-prompt mean scores and their mean over prompts (prompts without images are listed, not averaged)."""
    f_T = text_features(model, prompts)
    v = resolve_direction(model, direction, f_T, reference)  # batch: v over all prompts of the file
    pairs = [(i, path) for i, paths in enumerate(images) for path in paths]
    sums = torch.zeros(len(prompts), len(COLUMNS), dtype=torch.float64)
    counts = torch.zeros(len(prompts), dtype=torch.long)
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start: start + batch_size]
            index = torch.tensor([i for i, _ in chunk])
            f_I = image_features(model, [load_image(p) for _, p in chunk])
            scores = decompose(f_T[index.to(f_T.device)], f_I, v, w, model.logit_scale)
            values = torch.stack([getattr(scores, c) for c in COLUMNS], dim=1).double().cpu()
            sums.index_add_(0, index, values)
            counts += torch.bincount(index, minlength=len(prompts))
    rows = []
    for i, prompt in enumerate(prompts):
        means = (sums[i] / counts[i] * scale).tolist() if counts[i] else [None] * len(COLUMNS)
        rows.append({"index": i, "prompt": prompt, "images": int(counts[i]), **dict(zip(COLUMNS, means))})
    scored = counts > 0
    overall = (sums[scored] / counts[scored].unsqueeze(1)).mean(dim=0) * scale if scored.any() else None
    return {
        "model": model.path, "kind": model.kind, "w": w, "direction": v.source, "note": v.note, "scale": scale,
        "prompts_scored": int(scored.sum()), "prompts_without_images": [i for i in range(len(prompts)) if not counts[i]],
        "mean": dict(zip(COLUMNS, overall.tolist())) if overall is not None else None, "rows": rows,
    }


def table_csv(table: dict) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["index", "prompt", "images", *COLUMNS])
    for row in table["rows"]:
        writer.writerow([row["index"], row["prompt"], row["images"], *(row[c] for c in COLUMNS)])
    if table["mean"] is not None:
        writer.writerow(["mean", "", sum(r["images"] for r in table["rows"]), *(table["mean"][c] for c in COLUMNS)])
    return out.getvalue()


def write_table(table: dict, path: str) -> None:
    """Write ``table`` as CSV or JSON (by extension), atomically."""
    if path.lower().endswith(".csv"):
        text = table_csv(table)
    elif path.lower().endswith(".json"):
        text = json.dumps(table, indent=1, ensure_ascii=False)
    else:
        raise ValueError(f"output {path!r}: expected a .csv or .json file name")
    with atomic_open(path, "w") as f:
        f.write(text)


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
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    model = load_reward_model(args.model, args.kind, args.device, DTYPES[args.dtype], args.architecture)
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
    except (ModelFileError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
