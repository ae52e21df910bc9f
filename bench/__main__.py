"""``python -m bench [--quick] [--only NAME ...] [--json PATH]``: every benchmark, one table.

``--quick`` uses tiny models on the CPU (CI runs it to check that everything completes; CPU timings
are reported, not asserted). Without it, full-size models are built from config (GPU targets).
"""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time

import torch

from .common import format_table

SUITES = ["encode", "reward", "lora_load", "sampling", "train", "sdxl", "align", "mfu", "cli"]
EXTRA_SUITES = ["train_low", "sdxl_1024"]
"""Run only when named with ``--only`` (GPU rows that take long)."""


def _write_json(path: str, quick: bool, device: str, results: list) -> None:
    from training.safe_io import atomic_open

    with atomic_open(path) as f:
        json.dump({"device": device, "quick": quick, "date": time.strftime("%Y-%m-%d"),
                   "torch": torch.__version__, "results": [r.as_dict() for r in results]}, f, indent=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models on CPU; timings reported, not asserted")
    parser.add_argument("--only", nargs="*", choices=SUITES + EXTRA_SUITES, help="run only these suites")
    parser.add_argument("--json", metavar="PATH",
                        help="also write the results as JSON (atomically, after each suite: a run cut short keeps its rows)")
    args = parser.parse_args(argv)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "CPU"
    results = []
    for name in args.only or SUITES:
        try:
            module = importlib.import_module(f".{name}", __package__)
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{name}":
                raise
            print(f"[bench] {name}: not available yet", file=sys.stderr)
            continue
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        rows = module.run(args.quick)
        print(format_table(rows), file=sys.stderr, flush=True)  # each suite's rows as soon as they exist
        results.extend(rows)
        if args.json:
            _write_json(args.json, args.quick, device, results)
    print(f"device: {device}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}; quick={args.quick}")
    print(format_table(results))
    return 1 if any(r.passed is False for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
