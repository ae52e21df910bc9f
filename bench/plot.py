"""``python -m bench.plot results.json out.png``: bars of each comparison's ratio (ours / baseline)
against its target, for the README. Drawn with Pillow (no plotting library needed)."""
from __future__ import annotations

import json
import math
import re
import sys

from PIL import Image, ImageDraw

from training.safe_io import atomic_path

ROW, LABEL, BAR, PAD = 28, 430, 420, 12


def _target(text: str) -> float | None:
    match = re.search(r"[<>]=\s*([0-9.]+)x?", text)
    return float(match.group(1)) if match else None


def draw(results: list[dict], title: str) -> Image.Image:
    rows = [r for r in results if isinstance(r.get("ratio"), float) and math.isfinite(r["ratio"])]
    scale = max([1.5] + [r["ratio"] * 1.1 for r in rows] + [(_target(r["target"]) or 0) * 1.1 for r in rows])
    image = Image.new("RGB", (LABEL + BAR + 2 * PAD + 60, PAD * 3 + ROW * (len(rows) + 1)), "white")
    draw = ImageDraw.Draw(image)
    draw.text((PAD, PAD), title, fill="black")
    for i, r in enumerate(rows):
        y = PAD * 2 + ROW * (i + 1)
        draw.text((PAD, y + 6), r["name"][:70], fill="black")
        width = int(BAR * r["ratio"] / scale)
        target = _target(r["target"])
        higher_is_better = r["target"].lstrip().startswith(">=")
        ok = r["passed"] if r["passed"] is not None else (
            target is None or (r["ratio"] >= target if higher_is_better else r["ratio"] <= target))
        draw.rectangle((LABEL, y + 4, LABEL + width, y + ROW - 6), fill="#3a7d44" if ok else "#c0392b")
        draw.text((LABEL + width + 4, y + 6), f"{r['ratio']:.2f}x", fill="black")
        if target is not None:
            x = LABEL + int(BAR * target / scale)
            draw.line((x, y + 1, x, y + ROW - 3), fill="black", width=2)
    return image


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m bench.plot RESULTS.json OUT.png", file=sys.stderr)
        return 2
    with open(args[0], encoding="utf-8") as f:
        data = json.load(f)
    image = draw(data["results"], f"ours / baseline (lower is better, MFU higher; black line = target) - {data['device']}, "
                                  f"{data['date']}, quick={data['quick']}")
    with atomic_path(args[1]) as tmp:
        image.save(tmp, format="PNG")
    print(args[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
