"""Train from the graph: one run of the bundled trainer as a child process, for a ComfyUI node.

The node (``nodes/train.py``) builds a :class:`.job_request.JobRequest` from its inputs and calls
:func:`run_job` in ComfyUI's worker thread. Training never shares the server's Python process: the job writes a
config file into the run folder (atomically) and starts

    <ComfyUI's python> -m training.<reward|align> --config <run folder>/job_config.yaml

with the pack's folder as working directory, in its own process session, its output going to
``train.log``. While the child trains, the job follows ``metrics.jsonl`` (``run.log_every`` 1) and
``samples/`` and hands each row and each new validation grid to the node (:class:`Progress`,
:class:`Sample`). Cancel sends SIGTERM once: the trainer finishes its optimizer step, writes a
checkpoint and exits (:mod:`.interrupts`); the job raises :class:`JobCancelled` naming it, and the same
request with ``resume`` continues the run. Checkpoints are also written at the stage's own interval
(``run.save_every``) and at the end. When the child ends well, its LoRA is copied atomically to
``loras_dir/<name>.safetensors``, never over an existing file unless ``resume`` or ``overwrite`` asks.

The child watches the job's process (:func:`.interrupts.watch_parent`): if it dies (the server stopped
or crashed), the trainer stops as on Cancel, with a checkpoint.

The request is checked and turned into the trainer's config by :mod:`.job_request`; the run folder is
locked (:mod:`.job_lock`) while the job and its child live.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Union

from .job_lock import RunLock
from .job_request import (JOB_FILE, PROMPTS_FILE, STAGE_RUNS, JobRequest, check_request, recorded_inputs, request_prompts,
                          settings, write_config)

CONFIG_FILE = "job_config.yaml"
LOG_FILE = "train.log"
LORA_FILE = "lora_weights.safetensors"
"""What the trainer writes into its output folder (:data:`.trainer.LORA_FILE`)."""
METRICS_FILE = "metrics.jsonl"
SAMPLES = "samples"
LOG_TAIL_LINES = 40


class JobError(RuntimeError):
    """A job that started but did not produce its LoRA."""


class JobFailed(JobError):
    """The trainer exited with an error; the message holds its error line and the log's tail."""

    def __init__(self, message: str, returncode: int, log_path: str):
        super().__init__(message)
        self.returncode, self.log_path = returncode, log_path


class JobCancelled(JobError):
    """The job was cancelled (or the trainer stopped by a signal): the trainer wrote ``checkpoint``
    (None: stopped before its first step, nothing to save) and queueing the request again with
    ``resume`` continues from it."""

    def __init__(self, message: str, checkpoint: str | None, run_dir: str, step: int):
        super().__init__(message)
        self.checkpoint, self.run_dir, self.step = checkpoint, run_dir, step


@dataclass
class Progress:
    """One optimizer step done: the trainer's logged scalars (loss, reward, lr, ...)."""

    step: int
    total: int
    scalars: dict[str, float]


@dataclass
class Sample:
    """A new validation grid (PNG) of the model at ``step``."""

    path: str
    step: int


Event = Union[Progress, Sample]


@dataclass
class JobResult:
    lora_path: str
    run_dir: str
    steps: int
    history: list[dict[str, float]]
    """The ``metrics.jsonl`` rows this job logged (``step`` and the scalars)."""
    samples: list[str]


# -- running it ------------------------------------------------------------------------------------


def pack_root() -> str:
    """The folder holding ``training/``: the child's working directory."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_command(req: JobRequest) -> list[str]:
    return [sys.executable, "-m", f"training.{STAGE_RUNS[req.stage][0]}", "--config",
            os.path.join(os.path.abspath(req.run_dir), CONFIG_FILE)]


class _Tail:
    """New complete rows of ``metrics.jsonl`` and new PNGs in ``samples/`` since the job started."""

    def __init__(self, run_dir: str):
        self.metrics = os.path.join(run_dir, METRICS_FILE)
        self.samples = os.path.join(run_dir, SAMPLES)
        self.inode, self.offset = self._stat()
        self.seen = set(self._pngs())
        self.history: list[dict[str, float]] = []
        self.sample_paths: list[str] = []

    def _stat(self) -> tuple[int | None, int]:
        try:
            st = os.stat(self.metrics)
            return st.st_ino, st.st_size
        except OSError:
            return None, 0

    def _pngs(self) -> list[tuple[str, int]]:
        try:
            names = sorted(n for n in os.listdir(self.samples) if n.endswith(".png") and not n.startswith("."))
        except OSError:
            return []
        out = []
        for n in names:
            with contextlib.suppress(OSError):
                out.append((n, os.stat(os.path.join(self.samples, n)).st_mtime_ns))
        return out

    def events(self, total: int) -> list[Event]:
        events: list[Event] = []
        inode, size = self._stat()
        if inode != self.inode or size < self.offset:  # replaced (run.overwrite starts an empty log)
            self.inode, self.offset = inode, 0
        if size > self.offset:
            with open(self.metrics, "rb") as f:
                f.seek(self.offset)
                chunk = f.read(size - self.offset)
            done = chunk.rfind(b"\n") + 1
            self.offset += done
            for line in chunk[:done].decode("utf-8", "replace").splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    row = json.loads(line)
                    step = int(row.pop("step"))
                    self.history.append({"step": step, **row})
                    events.append(Progress(step, total, row))
        for name, mtime in self._pngs():
            if (name, mtime) not in self.seen:
                self.seen.add((name, mtime))
                path = os.path.join(self.samples, name)
                self.sample_paths.append(path)
                digits = "".join(c for c in name if c.isdigit())
                events.append(Sample(path, int(digits) if digits else 0))
        return sorted(events, key=lambda e: (e.step, isinstance(e, Sample)))  # a step's grid after its row


def log_tail(path: str, start: int = 0, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` non-empty lines of the log written since ``start`` (a progress bar's
    carriage-return redraws shown as their last state)."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    rows = [row.split("\r")[-1] for row in text.splitlines()]
    return "\n".join([row for row in rows if row.strip()][-lines:])


def _error_line(tail: str) -> str | None:
    """The trainer's own ``error: ...`` line (its refusals), else a traceback's last line."""
    lines = tail.splitlines()
    found = [line[len("error: "):] for line in lines if line.startswith("error: ")]
    found = found or [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b.*:", line)]
    return found[-1] if found else None


def _stop_group(proc: subprocess.Popen) -> None:
    """Whatever the child left in its session (it has exited) is killed."""
    if os.name != "nt":
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)


def run_job(req: JobRequest, on_event: Callable[[Event], None], should_cancel: Callable[[], bool],
            poll_s: float = 0.2, cancel_grace_s: float = 900.0) -> JobResult:
    """Run ``req`` to its LoRA (see the module docstring). ``on_event`` gets every :class:`Progress`
    and :class:`Sample` in order; ``should_cancel`` is polled every ``poll_s`` seconds: on True the
    child gets SIGTERM once, and after its checkpoint :class:`JobCancelled` is raised (unless that step was
    the last: then the LoRA is published as for a finished run). A child still
    running ``cancel_grace_s`` after SIGTERM is killed (the last complete checkpoint stays). An
    exception from either callback cancels the same way, then propagates."""
    check_request(req)
    lock = RunLock(req.run_dir).acquire()
    try:
        return _run_locked(req, lock, on_event, should_cancel, poll_s, cancel_grace_s)
    finally:
        lock.release()


def _run_locked(req: JobRequest, lock: RunLock, on_event, should_cancel, poll_s: float,
                cancel_grace_s: float) -> JobResult:
    from .safe_io import atomic_open

    run_dir = os.path.abspath(req.run_dir)
    values = settings(req)
    total = values["run.max_steps"]
    if req.stage != "align":
        with atomic_open(os.path.join(run_dir, PROMPTS_FILE)) as f:
            f.write("".join(p + "\n" for p in request_prompts(req)))
    with atomic_open(os.path.join(run_dir, JOB_FILE)) as f:
        json.dump({"written_by": "LongAlign Train LoRA", "inputs": recorded_inputs(req), "config": CONFIG_FILE}, f, indent=1)
    write_config(os.path.join(run_dir, CONFIG_FILE), values)
    log_path = os.path.join(run_dir, LOG_FILE)
    lora_before = _signature(os.path.join(run_dir, LORA_FILE))
    command = child_command(req)
    tail = _Tail(run_dir)
    with open(log_path, "ab") as log:
        log_start = log.tell()
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode("utf-8"))
        log.flush()
        from .interrupts import PARENT_PID_ENV

        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
               PARENT_PID_ENV: str(os.getpid())}  # the trainer stops (checkpoint) if this process dies
        kwargs: dict[str, Any] = {} if os.name == "nt" else {"start_new_session": True, "pass_fds": (lock.fd,)}
        proc = subprocess.Popen(command, cwd=pack_root(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, **kwargs)
    lock.record(f"job pid {os.getpid()}, trainer pid {proc.pid}")
    cancelled_at: float | None = None
    try:
        while True:
            done = proc.poll() is not None
            for event in tail.events(total):
                on_event(event)
            if done:
                break
            if cancelled_at is None and should_cancel():
                cancelled_at = _terminate(proc)
            elif cancelled_at is not None and time.monotonic() - cancelled_at > cancel_grace_s:
                proc.kill()
            time.sleep(poll_s)
    except BaseException:
        if proc.poll() is None:
            if cancelled_at is None:
                _terminate(proc)
            try:
                proc.wait(timeout=cancel_grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _stop_group(proc)
        raise
    _stop_group(proc)
    return _outcome(req, total, proc.returncode, cancelled_at is not None, tail, log_path, log_start, lora_before)


def _terminate(proc: subprocess.Popen) -> float:
    """SIGTERM to the trainer (once: a second signal would exit without a checkpoint)."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    return time.monotonic()


def _signature(path: str) -> tuple[int, int] | None:
    """(inode, mtime) of a file, None if absent: the trainer writes its LoRA by renaming a new file over it."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _outcome(req: JobRequest, total: int, returncode: int, cancelled: bool, tail: _Tail, log_path: str,
             log_start: int, lora_before: tuple[int, int] | None) -> JobResult:
    from .run_state import latest_checkpoint

    run_dir = os.path.abspath(req.run_dir)
    lora = os.path.join(run_dir, LORA_FILE)
    last_step = tail.history[-1]["step"] if tail.history else 0
    written = _signature(lora)
    finished = returncode == 0 and written is not None and written != lora_before  # a cancel in the last step: done
    killed = returncode == -getattr(signal, "SIGKILL", 9)  # past cancel_grace_s
    signalled = cancelled and (killed or returncode == -signal.SIGTERM)  # SIGTERM before its handler was installed
    if (returncode == 0 and not finished) or signalled:
        checkpoint = latest_checkpoint(run_dir)
        why = ("cancelled; the trainer did not stop in time and was killed" if signalled and killed else
               "cancelled" if cancelled else "stopped by a signal")
        where = (f"checkpoint {checkpoint}: queue it again with resume on to continue" if checkpoint else
                 "no checkpoint yet (stopped before its first step): queue it again to start over")
        raise JobCancelled(f"training {why} after step {last_step}; {where}", checkpoint, run_dir, last_step)
    if returncode != 0:
        text = log_tail(log_path, log_start)
        error = _error_line(text)
        headline = f"training failed: {error}" if error else f"training failed (exit status {returncode})"
        raise JobFailed(f"{headline}\n--- last lines of {log_path} ---\n{text}", returncode, log_path)
    _publish(lora, req.lora_path, replace=req.resume or req.overwrite)
    return JobResult(req.lora_path, run_dir, total, tail.history, tail.sample_paths)


def _publish(source: str, destination: str, replace: bool) -> None:
    """Copy ``source`` to ``destination`` atomically (a complete hidden copy first, then one rename or
    link). An existing destination is replaced only if ``replace``; otherwise :class:`JobFailed` (the
    file appeared while the job ran) and it is left alone."""
    import shutil

    from .safe_io import atomic_path

    if replace:
        with atomic_path(destination) as tmp:
            shutil.copyfile(source, tmp)
        return
    folder, name = os.path.split(os.path.abspath(destination))
    staging = os.path.join(folder, f".{name}.{os.getpid()}.staging")
    with atomic_path(staging) as tmp:
        shutil.copyfile(source, tmp)
    try:
        os.link(staging, destination)  # fails if the destination exists: never replaces it
    except FileExistsError:
        raise JobFailed(f"{destination!r} appeared while the job ran and is left alone; the LoRA is {source}", 0,
                        "") from None
    except OSError:  # a file system without hard links
        if os.path.lexists(destination):
            raise JobFailed(f"{destination!r} appeared while the job ran and is left alone; the LoRA is {source}", 0,
                            "") from None
        os.replace(staging, destination)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(staging)
