"""Walking a model folder whatever it holds: links are followed (models are often linked in), but
never into a folder already visited (a link loop, two links to one folder), and the walk stops at a
depth, an entry count and a time limit. ComfyUI lists model folders inside ``/object_info``, so
an unbounded walk there freezes the whole server.
"""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from typing import Iterator

log = logging.getLogger(__name__)
MAX_DEPTH = 8
"""Folder levels below the root that are entered."""
MAX_ENTRIES = 50_000
"""Files and folders looked at in one walk."""
MAX_SECONDS = 3.0
"""Wall time of one walk."""


def walk_folder(root: str, max_depth: int = MAX_DEPTH, max_entries: int = MAX_ENTRIES,
                max_seconds: float = MAX_SECONDS) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk(root, followlinks=True)`` top-down, breadth first (shallow names win: a folder
    reached again through a link keeps its shortest name; names sorted), bounded: a folder whose
    real path was visited is skipped, folders deeper than ``max_depth`` below ``root`` are not entered, and
    past ``max_entries`` entries or ``max_seconds`` the walk ends with a logged warning naming the bound
    (what was found so far is kept). The caller may prune the yielded folder list in place.
    Unreadable folders are skipped."""
    deadline = time.monotonic() + max_seconds
    seen: set[str] = set()
    queue = deque([(root, 0)])
    entries = 0
    while queue:
        folder, depth = queue.popleft()
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        dirs: list[str] = []
        files: list[str] = []
        try:
            with os.scandir(folder) as it:
                for entry in it:
                    entries += 1
                    if entries > max_entries or time.monotonic() > deadline:
                        bound = f"{max_entries} entries" if entries > max_entries else f"{max_seconds:g} s"
                        log.warning("listing %r stopped after %s: the folder is too large or too slow to read; "
                                    "the list is incomplete", root, bound)
                        return
                    try:
                        is_dir = entry.is_dir()  # follows links
                    except OSError:
                        is_dir = False
                    (dirs if is_dir else files).append(entry.name)
        except OSError:
            continue
        dirs.sort()
        files.sort()
        yield folder, dirs, files
        if depth < max_depth:
            queue.extend((os.path.join(folder, d), depth + 1) for d in dirs)
