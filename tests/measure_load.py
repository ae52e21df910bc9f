"""Run model loaders on given folders, each in a forked child of this fresh process, and print one
JSON line per case: the outcome, the seconds the call took and how far the child's resident memory
rose above what it held before the call (peak ``VmHWM`` minus ``VmRSS``, the peak reset first).

    python tests/measure_load.py '[["adapter", "/path/to/folder"], ...]'

A child gets an address-space cap of 3 GiB above what it has mapped and a 30 s alarm, so a loader
that tries to build a huge model fails in the child instead of taking the machine down.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import open_clip  # noqa: E402,F401  (libraries imported before the children fork: not counted in any case)
import torch  # noqa: E402

from training.adapter import load_text_adapter  # noqa: E402
from training.captioner import load_captioner  # noqa: E402
from training.reward_models import load_reward_model  # noqa: E402
from training.safe_io import ModelFileError  # noqa: E402
from training.t5 import load_t5_encoder  # noqa: E402

LOADERS = {
    "adapter": load_text_adapter,
    "t5": load_t5_encoder,
    "open_clip": lambda path: load_reward_model(path, "clip"),
    "clip": lambda path: load_reward_model(path, "denscore"),
    "captioner": load_captioner,
    "allocate_mb": lambda mb: torch.ones(int(mb) * 2**18),  # control: the measurement sees memory
}
CAP_BYTES = 3 * 2**30
ALARM_S = 30


def _status_mb(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _child(loader: str, arg: str, out: int) -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    before = _status_mb("VmRSS")
    mapped = int(_status_mb("VmSize") * 2**20)
    resource.setrlimit(resource.RLIMIT_AS, (mapped + CAP_BYTES, mapped + CAP_BYTES))
    signal.alarm(ALARM_S)
    start = time.perf_counter()
    try:
        LOADERS[loader](arg)
        outcome = "loaded"
    except ModelFileError as e:
        outcome = f"refused: {e}"
    except BaseException as e:  # noqa: BLE001  (reported, judged by the test)
        outcome = f"failed: {type(e).__name__}: {e}"
    seconds = time.perf_counter() - start
    grew = _status_mb("VmHWM") - before
    os.write(out, json.dumps({"outcome": outcome[:2000], "seconds": seconds, "grew_mb": grew}).encode())


def main(cases: list[list[str]]) -> None:
    torch.set_num_threads(1)
    for loader, arg in cases:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            try:
                _child(loader, arg, write)
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
        result = json.loads(data) if data else {"outcome": f"died: wait status {status}", "seconds": None,
                                                "grew_mb": None}
        print(json.dumps({"loader": loader, "arg": arg, **result}), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
