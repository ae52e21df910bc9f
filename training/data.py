"""Training data: image-caption pairs for ``align``, prompts for the reward stages.

Sources (``data.path``):
* a folder of images, each with a ``.txt`` caption beside it (``cat.png`` + ``cat.txt``);
* ``.jsonl`` / ``.csv`` / ``.parquet`` tables with ``path`` (relative to the table) and ``caption``;
* a prompts file for the reward stages: ``.txt`` with one prompt per line, or any table above
  (only ``caption`` is read; ``prompt`` / ``text`` are accepted as the column name too).
A missing, corrupt or refused image (one over ``data.max_image_pixels``, PIL's decompression-bomb
guard) is skipped and counted, never fatal: the collate step drops it and the trainer reports the count.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
import warnings
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_COLUMNS = ("caption", "prompt", "text")
TABLE_COLUMNS = (f"'path' (the image file, relative to the table) and 'caption' (or {' or '.join(map(repr, CAPTION_COLUMNS[1:]))})")


class DataError(ValueError):
    """A dataset that cannot be used at all (missing, empty, unreadable table)."""


@dataclass(frozen=True)
class Record:
    caption: str
    image_path: str | None = None


def _read_text(path: str) -> str:
    """A caption, prompts or table file as text; unreadable or non-UTF-8 files raise :class:`DataError`."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not readable as UTF-8 text ({e})") from e


def _read_table(path: str) -> list[dict]:
    if path.endswith(".jsonl"):
        rows = []
        for n, line in enumerate(_read_text(path).split("\n"), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not a JSON line ({e})") from e
                if not isinstance(rows[-1], dict):
                    raise DataError(f"{path}:{n}: expected a JSON object, found {type(rows[-1]).__name__}")
        return rows
    if path.endswith(".csv"):
        try:
            return list(csv.DictReader(io.StringIO(_read_text(path))))
        except csv.Error as e:
            raise DataError(f"{path}: not a readable CSV table ({e})") from e
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from e
        try:
            return pq.read_table(path).to_pylist()
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"{path}: not a readable Parquet table ({e})") from e
    raise DataError(f"{path}: expected a folder, .jsonl, .csv, .parquet or (prompts) .txt")


def _caption(row: dict, where: str) -> str:
    for column in CAPTION_COLUMNS:
        if column in row and row[column] is not None:
            return str(row[column]).replace("\n\n", " ").strip()
    raise DataError(f"{where}: no caption column (expected one of {', '.join(CAPTION_COLUMNS)}; a table's columns: "
                    f"{TABLE_COLUMNS})")


def read_records(path: str | None, need_images: bool) -> list[Record]:
    """All records of a data source; images are only located here, opened at load time."""
    if not path:
        raise DataError("data.path is not set: give a folder, a table or a prompts file")
    if not os.path.exists(path):
        raise DataError(f"data.path {path!r} does not exist")
    if os.path.isdir(path):
        records = []
        images = [name for name in sorted(os.listdir(path)) if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES]
        for name in images:
            caption_file = os.path.join(path, os.path.splitext(name)[0] + ".txt")
            if os.path.isfile(caption_file):
                records.append(Record(_read_text(caption_file).strip(), os.path.join(path, name)))
        if images and not records:
            raise DataError(f"data.path {path!r} holds no usable records: its {len(images)} images have no captions; "
                            f"each image needs a caption file of the same name beside it ({images[0]} + "
                            f"{os.path.splitext(images[0])[0]}.txt), or give a table with the columns {TABLE_COLUMNS}")
        if not images:
            raise DataError(f"data.path {path!r} holds no usable records: no images ({', '.join(IMAGE_SUFFIXES)}) "
                            f"with a same-named .txt caption")
    elif path.endswith(".txt"):
        if need_images:
            raise DataError(f"{path}: a .txt prompts file has no images; the align stage needs image-caption pairs")
        records = [Record(line.strip()) for line in _read_text(path).split("\n") if line.strip()]
    else:
        base = os.path.dirname(os.path.abspath(path))
        records = []
        for i, row in enumerate(_read_table(path)):
            caption = _caption(row, f"{path} row {i}")
            image = None
            if need_images:
                if not row.get("path"):
                    raise DataError(f"{path} row {i}: no 'path' column; the align stage needs images: expected the "
                                    f"columns {TABLE_COLUMNS}")
                image = os.path.join(base, str(row["path"]))
            records.append(Record(caption, image))
    if not records:
        raise DataError(f"data.path {path!r} holds no usable records")
    return records


def warn_if_batch_exceeds_data(records: list[Record], batch_size: int, processes: int = 1) -> None:
    """Tell the user (stderr) when one step asks for more samples than the data holds: every batch is
    then the whole data set, smaller than configured, and an epoch is a single step."""
    wanted = batch_size * processes
    if wanted > len(records):
        print(f"[data] warning: data.batch_size {batch_size} x {processes} process(es) = {wanted} samples per step, "
              f"but the data holds only {len(records)}: each batch is the whole data set ({len(records)} samples), "
              f"one step per epoch", file=sys.stderr, flush=True)


class ImageCaptionDataset(torch.utils.data.Dataset):
    """(pixel_values in [-1, 1], caption); ``None`` for an image that is missing, corrupt, or larger than
    ``max_pixels`` (PIL's decompression-bomb guard: refused, never decoded)."""

    def __init__(self, records: list[Record], resolution: int, max_pixels: int | None = Image.MAX_IMAGE_PIXELS):
        self.records, self.resolution, self.max_pixels = records, resolution, max_pixels

    def __len__(self) -> int:
        return len(self.records)

    def _open(self, path: str) -> Image.Image:
        """The RGB image; PIL's bomb warning (over ``max_pixels``) is an error here, as its 2x error is."""
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, self.max_pixels
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    return im.convert("RGB")
        finally:
            Image.MAX_IMAGE_PIXELS = limit

    def __getitem__(self, i: int) -> dict | None:
        record = self.records[i]
        try:
            image = self._open(record.image_path)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError,
                Image.DecompressionBombWarning):
            return None
        # resize the short side to the resolution, centre crop (as the reference)
        w, h = image.size
        scale = self.resolution / min(w, h)
        image = image.resize((max(self.resolution, round(w * scale)), max(self.resolution, round(h * scale))),
                             Image.BILINEAR)
        w, h = image.size
        left, top = (w - self.resolution) // 2, (h - self.resolution) // 2
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        pixels = pixels.view(self.resolution, self.resolution, 3).permute(2, 0, 1).float() / 127.5 - 1.0
        return {"pixel_values": pixels, "caption": record.caption, "index": i}


class PromptDataset(torch.utils.data.Dataset):
    def __init__(self, records: list[Record]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        return {"caption": self.records[i].caption}


def collate(examples: list[dict | None]) -> dict:
    """Stack the usable examples; ``skipped`` counts the unreadable ones dropped from this batch."""
    good = [e for e in examples if e is not None]
    batch: dict = {"caption": [e["caption"] for e in good], "skipped": len(examples) - len(good)}
    if good and "pixel_values" in good[0]:
        batch["pixel_values"] = torch.stack([e["pixel_values"] for e in good])
        batch["index"] = [e["index"] for e in good]
    return batch
