"""The one place that reads model files and writes outputs.

Reading: safetensors first; ``.pt/.pth/.bin/.ckpt`` only through ``torch.load(weights_only=True)``
(a pickle that would run code is refused by torch's restricted unpickler and nothing runs). Every
error names the file, the format expected and what was found.

Writing: every output goes to a temporary file in the destination's folder, is flushed and
fsync'ed, then renamed over the destination, so a reader sees the old complete file or the new
complete file, never a partial one. A writer killed mid-write leaves its temporary file behind as a
hidden ``.<name>.<random>.tmp`` beside the destination (nothing can clean up after SIGKILL); no
reader of this pack or ComfyUI lists such names. Folders (checkpoints, adapters) are written under
a ``.tmp`` name and committed with :func:`commit_folder`.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import IO, Any, Callable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class ModelFileError(ValueError):
    """A model file that is missing, of the wrong format, or holds the wrong content."""


def _check_file(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise ModelFileError(f"{what}: {path!r} does not exist")
    if not os.path.isfile(path):
        raise ModelFileError(f"{what}: {path!r} is not a file")
    if os.path.getsize(path) == 0:
        raise ModelFileError(f"{what}: {path!r} is empty (0 bytes)")


def load_tensors(path: str, what: str = "model file", device: str = "cpu") -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` dict from a safetensors or (weights-only) pickle file."""
    _check_file(path, what)
    lower = path.lower()
    if lower.endswith(SAFETENSORS_SUFFIXES):
        try:
            return load_file(path, device=device)
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelFileError(f"{what}: {path!r} is not a readable safetensors file ({e})") from e
    if lower.endswith(PICKLE_SUFFIXES):
        obj = load_pickle(path, what, device)
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise ModelFileError(f"{what}: {path!r} holds a {type(obj).__name__}, expected a dict of tensors")
        bad = next((k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
        if bad is not None:
            raise ModelFileError(f"{what}: {path!r} holds a dict whose entry {bad!r} is a "
                                 f"{type(obj[bad]).__name__}, expected a dict of tensors with string names")
        return obj
    raise ModelFileError(
        f"{what}: {path!r} has an unknown extension; expected one of "
        f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}"
    )


def load_pickle(path: str, what: str = "model file", device: str = "cpu") -> Any:
    """``torch.load(weights_only=True)``: tensors, lists, dicts and numbers only, never code."""
    _check_file(path, what)
    try:
        try:  # memory-mapped: tensors are read lazily (zip format, torch >= 1.6 files)
            return torch.load(path, map_location=device, weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location=device, weights_only=True)  # legacy non-zip file
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or EOFError by case
        raise ModelFileError(
            f"{what}: {path!r} could not be loaded as a weights-only PyTorch file "
            f"(truncated, or it holds objects other than tensors, which are refused): {e}"
        ) from e


def load_pretrained_folder(model_class: Any, path: str, what: str, dtype: torch.dtype) -> torch.nn.Module:
    """``model_class.from_pretrained`` of a local folder (never the hub; transformers reads safetensors,
    or ``.bin`` weights only): a :class:`ModelFileError` naming ``what`` when the weights cannot be
    read or do not match the folder's config.json."""
    try:
        model, info = model_class.from_pretrained(path, local_files_only=True, dtype=dtype, output_loading_info=True)
    except Exception as e:  # transformers raises OSError, SafetensorError, RuntimeError, ... by case
        raise ModelFileError(f"{what}: the {model_class.__name__} weights could not be read "
                             f"(corrupt or truncated file?): {e}") from e
    missing = [k for k in info["missing_keys"] if not k.endswith("position_ids")]
    if missing or info["mismatched_keys"]:
        raise ModelFileError(f"{what}: the weights do not match its config.json: missing {sorted(missing)[:5]}, "
                             f"mismatched {sorted(info['mismatched_keys'])[:5]}")
    return model


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync_folder(folder)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _fsync(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_folder(folder: str) -> None:
    """Make a rename inside ``folder`` durable (not every file system allows it: best effort)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def commit_folder(tmp: str, final: str) -> str:
    """Make the finished folder ``tmp`` the folder ``final``: fsync every file in it, then rename it
    over ``final`` (an old ``final`` is removed first). A reader never sees a half-written folder
    under ``final``; after a crash before the rename only ``tmp`` is left, for the caller to ignore."""
    for folder, _, files in os.walk(tmp):
        for name in files:
            _fsync(os.path.join(folder, name))
        _fsync_folder(folder)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_folder(os.path.dirname(os.path.abspath(final)))
    return final


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """``open()`` for writing, made atomic with :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f


def save_tensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, Any] | None = None) -> str:
    """Write ``tensors`` as safetensors atomically; metadata values are JSON-encoded if not str."""
    meta = None
    if metadata:
        meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
    return path


def write_atomically(path: str, write: Callable[[str], None]) -> str:
    """Run ``write(tmp_path)`` and move the result over ``path`` atomically (for library savers)."""
    with atomic_path(path) as tmp:
        write(tmp)
    return path


def load_json_object(path: str, what: str = "JSON file") -> dict:
    """A JSON file that must hold an object (configs); errors name the file and what was found."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{what}: {path!r} is not a readable JSON file ({e})") from e
    if not isinstance(data, dict):
        raise ModelFileError(f"{what}: {path!r} holds a {type(data).__name__}, expected a JSON object")
    return data
