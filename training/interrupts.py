"""Stopping a run cleanly on SIGTERM (schedulers, spot instances) or SIGINT (Ctrl-C).

The first signal only asks: the trainer finishes the optimizer step it is in, writes a checkpoint
and exits 0. Before the first step (models still loading) a single process has nothing new to save
and stops at once, also with 0 (:class:`StoppedInSetup`). A second signal exits at once (status
128 + signal number), writing nothing more; the last complete checkpoint stays on disk. On several
processes each one may see the signal at a different time, so the stop is agreed at every step end
(:meth:`StopRequest.agreed`).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import FrameType

import torch

SIGNALS = (signal.SIGTERM, signal.SIGINT)
PARENT_PID_ENV = "LONGALIGN_PARENT_PID"
"""Set by a program that runs the trainer as its child (``training/graph_job.py``): the trainer watches
that process (:func:`watch_parent`) and stops as on SIGTERM when it dies."""


class StoppedInSetup(Exception):
    """The first signal arrived before the first optimizer step of a single-process run."""


class StopRequest:
    """A context manager that installs the handlers (main thread only) and restores the old ones.
    ``stop_in_setup``: until :meth:`training_started`, the first signal raises :class:`StoppedInSetup`
    (only where one process runs: several must stop together, at a step end)."""

    def __init__(self, signals: tuple[signal.Signals, ...] = SIGNALS, stop_in_setup: bool = False):
        self.signals = signals
        self.stop_in_setup = stop_in_setup
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
        if self.stop_in_setup:
            raise StoppedInSetup(name)
        print(f"\n[train] {name}: stopping after this optimizer step and writing a checkpoint "
              "(send it again to exit at once)", file=sys.stderr, flush=True)

    def training_started(self) -> None:
        """From now on the first signal waits for the end of the optimizer step."""
        self.stop_in_setup = False

    def agreed(self, accelerator) -> bool:
        """Whether any process was asked to stop; every process must call this at the same step."""
        if accelerator.num_processes == 1:
            return self.received is not None
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def watch_parent(pid: int, poll_s: float = 1.0) -> threading.Thread:
    """Send this process SIGTERM once it no longer is ``pid``'s child (that process died: e.g. the ComfyUI
    server that started the job stopped or crashed), so the run ends as on SIGTERM: the step finishes, a
    checkpoint is written, the process exits (no trainer goes on alone). A daemon thread."""
    def watch() -> None:
        while os.getppid() == pid:
            time.sleep(poll_s)
        print(f"[train] the process that started this run ({pid}) is gone: stopping", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="longalign-parent-watch", daemon=True)
    thread.start()
    return thread
