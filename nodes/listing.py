"""Model-folder lists for ``INPUT_TYPES``, off ComfyUI's event loop.

ComfyUI builds ``/object_info`` inside its event loop, so a list that takes long (a huge or slow
folder) stalls every request of the server. Each list is computed in one worker thread (the walk
itself is bounded, :mod:`training.folder_walk`); the caller waits for it at most
:data:`WAIT_SECONDS` and otherwise gets the last complete list (empty the first time) while the
walk finishes in the background for the next call.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable, TypeVar

T = TypeVar("T")
WAIT_SECONDS = 1.0
_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="longalign-listing")
_LOCK = threading.RLock()  # re-entered when a run ends before its callback is added
_RUNNING: dict[str, Future] = {}
_LAST: dict[str, object] = {}


def listed(key: str, compute: Callable[[], T], empty: T, wait: float = WAIT_SECONDS) -> T:
    """``compute()`` run in the listing thread (one run per ``key`` at a time): its result if it ends
    within ``wait`` seconds, else the last result for ``key`` (``empty`` before the first)."""
    with _LOCK:
        future = _RUNNING.get(key)
        if future is None:
            future = _RUNNING[key] = _POOL.submit(compute)
            future.add_done_callback(lambda done: _finished(key, done))
    try:
        return future.result(timeout=wait)
    except FutureTimeout:
        logging.warning("LongAlign: listing %s takes over %g s; showing the last complete list", key, wait)
        with _LOCK:
            return _LAST.get(key, empty)  # type: ignore[return-value]


def _finished(key: str, future: Future) -> None:
    with _LOCK:
        if _RUNNING.get(key) is future:
            del _RUNNING[key]
        if future.exception() is None:
            _LAST[key] = future.result()
