"""``python -m bench --quick`` completes and prints one row per comparison (CPU timings are
reported, not asserted: the targets are for the GPU run)."""
import json
import os
import subprocess
import sys

from comfy_inprocess import REPO


def test_quick_benchmark_suite_runs_to_the_end(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--json", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = proc.stdout
    for name in ("encode 49 tokens", "reward scorer tiny", "LoRA load+patch", "KSampler s/it, 240 vs 77",
                 "reward step s/sample", "SDXL reward step s/sample", "align step s/sample", "UNet MFU",
                 "CLI --help start-up"):
        assert name in table, table
    data = json.loads(out.read_text())
    assert data["quick"] is True and len(data["results"]) >= 13
    measured = [r for r in data["results"] if "not measured" not in r["note"]]  # CUDA-only rows say so
    assert {r["name"] for r in data["results"] if r not in measured} <= {
        "reward backward peak memory b8", "reward step peak GPU memory", "SDXL reward step peak GPU memory",
        "UNet MFU, no-grad call (SD1.5, b16, ctx 480, bf16)"}
    assert all(r["ours"] > 0 and r["baseline"] > 0 for r in measured)
