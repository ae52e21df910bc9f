"""The one check for every path a node input names (a model name, ``reference_file``): it must
resolve, links followed (``realpath``), inside ComfyUI's input folder or a registered models
folder. Anything else is refused with one message that says nothing about the file: the same text
whether it exists or not, so a request cannot probe the disk.
"""
from __future__ import annotations

import os
from typing import Sequence

NOT_MODEL_FOLDERS = frozenset({"custom_nodes"})
"""``folder_paths`` keys that are not model folders (code, not data)."""


class PathRefused(ValueError):
    """A node input names a path outside the folders a node may read."""


def allowed_roots() -> list[str]:
    """Real paths of ComfyUI's input folder and of every registered models folder."""
    import folder_paths

    roots = [folder_paths.get_input_directory()]
    for key, (paths, _) in folder_paths.folder_names_and_paths.items():
        if key not in NOT_MODEL_FOLDERS:
            roots.extend(paths)
    return sorted({os.path.realpath(root) for root in roots})


def _inside(real: str, roots: Sequence[str]) -> bool:
    return any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def confined(path: str, what: str, given: str | None = None) -> str:
    """``path`` if its real path (links followed) lies inside :func:`allowed_roots`, else
    :class:`PathRefused` naming only the input ``what`` and the value given (``given``, default
    ``path``)."""
    try:
        real = os.path.realpath(path)
    except (ValueError, OSError):  # a NUL byte, a name too long
        real = ""
    if not real or not _inside(real, allowed_roots()):
        raise PathRefused(f"{what}: {path if given is None else given!r} is refused: a node may only read files inside "
                          "ComfyUI's input folder or a registered models folder (links included; add other folders "
                          "in extra_model_paths.yaml)")
    return path


def resolve_in(value: str, what: str, folders: Sequence[str]) -> str:
    """The first existing ``folder/value`` of ``folders`` (``value`` relative; an absolute one stands
    for itself), every candidate checked with :func:`confined` first; FileNotFoundError (naming the
    folders) when none exists."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what}: expected a file name, got {value!r}")
    for folder in folders:
        candidate = confined(os.path.join(folder, value), what, value)
        if os.path.exists(candidate):
            return candidate
    raise FileNotFoundError(f"{what}: {value!r} is not in {', '.join(folders) or 'any registered folder'}")
