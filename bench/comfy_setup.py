"""In-process ComfyUI for the benchmarks (the tests' helpers, from ``tests/``)."""
from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")


def comfy_ready() -> None:
    """Import ComfyUI from ``LONGALIGN_COMFYUI`` (set by scripts/bench.sh) and the pack."""
    root = os.environ.get("LONGALIGN_COMFYUI", "")
    if not os.path.isfile(os.path.join(root, "main.py")):
        raise RuntimeError("LONGALIGN_COMFYUI must point at ComfyUI's folder: run `bash scripts/bench.sh`")
    if TESTS not in sys.path:
        sys.path.append(TESTS)
    from comfy_inprocess import import_comfy, load_pack

    import_comfy(root)
    load_pack()
