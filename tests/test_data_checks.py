"""Training data that cannot be used as given: an image PIL refuses (a decompression bomb, over
``data.max_image_pixels``) is skipped and counted like any unreadable image; images without captions
and tables without the expected columns get a message saying what is expected; a batch larger than
the data is warned about."""
from __future__ import annotations

import os
import struct
import zlib

import pytest
from PIL import Image

from trainer_helpers import make_image_folder
from training.config import TrainConfig
from training.data import DataError, ImageCaptionDataset, Record, collate, read_records, warn_if_batch_exceeds_data


def _bomb_png(path: str, width: int = 30_000, height: int = 30_000) -> str:
    """A PNG whose header claims ``width x height`` pixels (9e8 > 2x PIL's limit): a few bytes on disk,
    gigabytes if decoded. PIL refuses it at ``Image.open`` with DecompressionBombError."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_skipped_and_counted_not_fatal(tmp_path):
    folder = make_image_folder(str(tmp_path / "pairs"), n=2, size=32)
    _bomb_png(os.path.join(folder, "bomb.png"))
    with open(os.path.join(folder, "bomb.txt"), "w", encoding="utf-8") as f:
        f.write("a caption for an image nobody can decode")
    records = read_records(folder, need_images=True)
    dataset = ImageCaptionDataset(records, 32)
    batch = collate([dataset[i] for i in range(len(dataset))])
    assert batch["skipped"] == 1 and len(batch["caption"]) == 2 and batch["pixel_values"].shape[0] == 2
    assert Image.MAX_IMAGE_PIXELS == TrainConfig().data.max_image_pixels  # PIL's limit, left as it was


@pytest.mark.parametrize("limit", [6_000, 2_000])  # 100 x 100 = 10k pixels: PIL's warning range, then its error range
def test_images_over_the_pixel_limit_are_skipped_in_both_of_pils_ranges(tmp_path, limit):
    Image.new("RGB", (100, 100), "red").save(tmp_path / "big.png")
    Image.new("RGB", (40, 40), "blue").save(tmp_path / "small.png")
    records = [Record("big", str(tmp_path / "big.png")), Record("small", str(tmp_path / "small.png"))]
    dataset = ImageCaptionDataset(records, 32, max_pixels=limit)
    assert dataset[0] is None and dataset[1] is not None
    assert ImageCaptionDataset(records, 32, max_pixels=20_000)[0] is not None


def test_the_pixel_limit_is_a_documented_option_defaulting_to_pils():
    from training.cli import DESCRIPTIONS
    from training.config import build_parser

    assert TrainConfig().data.max_image_pixels == Image.MAX_IMAGE_PIXELS
    text = " ".join(build_parser("align", DESCRIPTIONS["align"]).format_help().split())
    assert "--data.max_image_pixels V images with more pixels" in text and f"(default: {Image.MAX_IMAGE_PIXELS})" in text


def test_a_folder_of_images_without_captions_says_each_needs_a_same_named_txt(tmp_path):
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i:03d}.jpg")
    with pytest.raises(DataError) as e:
        read_records(str(tmp_path), need_images=True)
    message = str(e.value)
    assert "3 images have no captions" in message and "000.jpg + 000.txt" in message
    assert "'path'" in message and "'caption'" in message  # the alternative: a table, and its columns


@pytest.mark.parametrize("table, need_images, expected", [
    ("rows.jsonl", True, "no 'path' column"),
    ("rows.csv", True, "no 'path' column"),
    ("rows.csv", False, "no caption column"),
])
def test_a_table_without_the_expected_columns_names_them(tmp_path, table, need_images, expected):
    path = tmp_path / table
    if table.endswith(".jsonl"):
        path.write_text('{"caption": "a red circle", "file": "a.png"}\n')
    elif need_images:
        path.write_text("caption,file\na red circle,a.png\n")
    else:
        path.write_text("description\na red circle\n")
    with pytest.raises(DataError) as e:
        read_records(str(path), need_images=need_images)
    assert expected in str(e.value)
    assert "'path' (the image file, relative to the table) and 'caption'" in str(e.value)


def test_a_batch_larger_than_the_data_is_warned_about(capsys):
    records = [Record(f"prompt {i}") for i in range(3)]
    warn_if_batch_exceeds_data(records, 2, processes=2)
    err = capsys.readouterr().err
    assert "warning" in err and "data.batch_size 2 x 2 process(es) = 4" in err and "only 3" in err
    warn_if_batch_exceeds_data(records, 3)
    assert capsys.readouterr().err == ""


def test_the_trainer_warns_about_the_batch_and_applies_the_pixel_limit(tmp_path, capsys):
    """A real (tiny, in-process) align run: the batch warning reaches the user, and an image over
    ``data.max_image_pixels`` is skipped and counted in metrics.jsonl instead of stopping the run."""
    import json

    from trainer_helpers import train_in_process

    folder = make_image_folder(str(tmp_path / "pairs"), n=3, size=64)
    Image.new("RGB", (90, 90), "red").save(os.path.join(folder, "big.png"))  # 8100 pixels > the limit below
    with open(os.path.join(folder, "big.txt"), "w", encoding="utf-8") as f:
        f.write("a red picture larger than the pixel limit")
    out = tmp_path / "run"
    train_in_process("align", "--data.path", folder, "--data.batch_size", "8", "--data.max_image_pixels", "5000",
                     "--run.max_steps", "1", "--run.grad_accum", "1", "--run.output_dir", str(out))
    assert "data.batch_size 8 x 1 process(es) = 8 samples per step, but the data holds only 4" in capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_images"] == 1
