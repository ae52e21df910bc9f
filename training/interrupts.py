"""Stopping a run cleanly on SIGTERM (schedulers, spot instances) or SIGINT (Ctrl-C).

The first signal only asks: the trainer finishes the optimizer step it is in, writes a checkpoint
and exits 0. A second signal exits at once (status 128 + signal number), writing nothing more; the
last complete checkpoint stays on disk. On several processes each one may see the signal at a
different time, so the stop is agreed at every step end (:meth:`StopRequest.agreed`).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType

import torch

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """A context manager that installs the handlers (main thread only) and restores the old ones."""

    def __init__(self, signals: tuple[signal.Signals, ...] = SIGNALS):
        self.signals = signals
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            print(f"\n[train] second signal ({name}): exiting now, nothing more is written", file=sys.stderr,
                  flush=True)
            os._exit(128 + signum)
        self.received = name
        print(f"\n[train] {name}: stopping after this optimizer step and writing a checkpoint "
              "(send it again to exit at once)", file=sys.stderr, flush=True)

    def agreed(self, accelerator) -> bool:
        """Whether any process was asked to stop; every process must call this at the same step."""
        if accelerator.num_processes == 1:
            return self.received is not None
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)
