"""The evaluation table of :mod:`.evaluate`: prompts matched to images, decomposed scores per prompt and
their mean, written as CSV or JSON (see ``python -m training.evaluate --help``)."""
from __future__ import annotations

import csv
import io
import json
import os
import re
from collections import defaultdict
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .reward_names import REFERENCE_W
from .safe_io import atomic_open
from .scoring import decompose, image_features, read_prompt_file, resolve_direction, text_features

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
COLUMNS = ("total", "text_relevant", "text_irrelevant", "reweighted", "eta")
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
