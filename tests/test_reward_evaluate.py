"""``python -m training.evaluate``: prompt file + images folder -> CSV/JSON table of decomposed scores."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_models import PROMPTS, build_tiny_clipmodel
from training.evaluate import main
from training.score_table import load_image
from training.scoring import common_direction, score_images, text_features
from training.reward_models import load_reward_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    build_tiny_clipmodel(str(root / "denscore"))
    (root / "prompts.txt").write_text("\n".join(PROMPTS + ["A prompt nobody drew."]) + "\n")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, size in [("00000.png", 64), ("00000_seed2.png", 64), ("1-b.jpg", 80), ("2.png", 40), ("notes.txt", 0)]:
        if size:
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(images / name)
        else:
            (images / name).write_text("ignored")
    return root


def test_table_holds_per_prompt_means_and_their_mean(setup, tmp_path):
    root = setup
    table = main(["--model", str(root / "denscore"), "--kind", "denscore", "--prompts", str(root / "prompts.txt"),
                  "--images", str(root / "images"), "--out", str(tmp_path / "t.csv"), "--out", str(tmp_path / "t.json"),
                  "--direction", "batch", "--batch-size", "2", "--scale", "100"])
    model = load_reward_model(str(root / "denscore"), "denscore")
    prompts = PROMPTS + ["A prompt nobody drew."]
    v = common_direction(text_features(model, prompts))
    torch.testing.assert_close(torch.tensor(table["rows"][0]["total"]) / 100, _expected(model, root, ["00000.png", "00000_seed2.png"], PROMPTS[0], v), rtol=1e-4, atol=1e-6)
    assert [r["images"] for r in table["rows"]] == [2, 1, 1, 0]
    assert table["prompts_without_images"] == [3] and table["direction"] == "batch"
    assert table["mean"]["reweighted"] == pytest.approx(np.mean([r["reweighted"] for r in table["rows"][:3]]))
    with open(tmp_path / "t.json") as f:
        assert json.load(f)["rows"] == json.loads(json.dumps(table["rows"]))
    with open(tmp_path / "t.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["index"] for r in rows] == ["0", "1", "2", "3", "mean"]
    assert float(rows[1]["text_relevant"]) == pytest.approx(table["rows"][1]["text_relevant"])
    assert sorted(os.listdir(tmp_path)) == ["t.csv", "t.json"]  # atomic writes leave no temporaries


def _expected(model, root, names, prompt, v):
    """The mean total of ``names`` against ``prompt``, straight from the library with the file's v."""
    from training.scoring import Direction, decompose, image_features

    f_I = image_features(model, [load_image(str(root / "images" / n)) for n in names])
    return decompose(text_features(model, [prompt]), f_I, Direction(v, "batch")).total.mean()


def test_jsonl_with_paths_and_the_module_entry_point(setup, tmp_path):
    root = setup
    rows = [{"caption": PROMPTS[0], "path": "2.png"}, {"caption": PROMPTS[1], "path": "1-b.jpg"},
            {"caption": PROMPTS[0], "path": "00000.png"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "scores.json"
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-m", "training.evaluate", "--model", str(root / "denscore"),
                           "--kind", "denscore", "--prompts", str(tmp_path / "p.jsonl"), "--images", str(root / "images"),
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = json.loads(out.read_text())
    assert [r["prompt"] for r in table["rows"]] == PROMPTS[:2] and [r["images"] for r in table["rows"]] == [2, 1]
    model = load_reward_model(str(root / "denscore"), "denscore")
    direct = score_images(model, [load_image(str(root / "images" / "1-b.jpg"))], [PROMPTS[1]], direction="builtin")
    assert table["rows"][1]["reweighted"] == pytest.approx(direct.reweighted.item(), rel=1e-4)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["direction"] == "builtin"


def test_bad_names_and_outputs_are_refused(setup, tmp_path):
    root = setup
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "cat.png")
    args = ["--model", str(root / "denscore"), "--kind", "denscore", "--prompts", str(root / "prompts.txt")]
    with pytest.raises(ValueError, match="'cat.png'.*must start with the 0-based index"):
        main(args + ["--images", str(tmp_path / "images"), "--out", str(tmp_path / "x.csv")])
    with pytest.raises(SystemExit):
        main(args + ["--images", str(root / "images"), "--out", str(tmp_path / "x.xlsx")])
    assert not (tmp_path / "x.csv").exists()
