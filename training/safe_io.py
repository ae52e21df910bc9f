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

Outputs get the permissions the user's umask gives (files 0666, folders 0777, less the umask), as
any program's, not the temporary file's 0600. A folder is only ever replaced by one of ours: a
folder we wrote carries :data:`MANIFEST`, the list of its files; an existing folder that holds a
file neither listed there nor about to be rewritten is refused (:class:`OutputError`), never deleted.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections import deque
from typing import IO, Any, Callable, Collection, Iterator, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class ModelFileError(ValueError):
    """A model file that is missing, of the wrong format, or holds the wrong content."""


class OutputError(ValueError):
    """An output destination that holds something we did not write, which we may not replace."""


MANIFEST = ".longalign-output.json"
"""Written into every folder :func:`commit_folder` publishes: the files we wrote there."""


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
    read or do not match the folder's config.json, before anything is allocated when it can tell
    (:func:`check_pretrained_folder`)."""
    check_pretrained_folder(model_class, path, what)
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
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would have given
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync_folder(folder)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _umask() -> int:
    """The process's umask (Python can only read it by setting it: set and restored at once)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _files(folder: str) -> set[str]:
    """Every file under ``folder``, as ``/``-separated paths relative to it."""
    return {os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            for root, _, names in os.walk(folder) for name in names}


def check_replaceable(final: str, new_files: Collection[str] = ()) -> None:
    """Refuse (:class:`OutputError`) to replace ``final`` unless it is absent, an empty folder, or a
    folder whose every file is one we wrote (listed in its :data:`MANIFEST`) or one of ``new_files``
    (relative paths about to be rewritten)."""
    if os.path.islink(final) or (os.path.lexists(final) and not os.path.isdir(final)):
        raise OutputError(f"output {final!r} exists and is not a folder (a file or a link): choose a new folder name")
    if not os.path.isdir(final):
        return
    ours = set(new_files)
    manifest = os.path.join(final, MANIFEST)
    if os.path.isfile(manifest):
        with contextlib.suppress(OSError, ValueError, TypeError):
            with open(manifest, encoding="utf-8") as f:
                ours |= {MANIFEST, *json.load(f)["files"]}
    foreign = sorted(_files(final) - ours)
    if foreign:
        raise OutputError(
            f"output folder {final!r} already holds files this program did not write ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}): nothing there is replaced; choose a new or empty folder")


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
    """Make the finished folder ``tmp`` the folder ``final``: list its files in :data:`MANIFEST`, give
    it the umask's mode, fsync every file, then rename it over ``final``. An existing ``final`` is
    replaced only if :func:`check_replaceable` allows it (moved aside first, removed after the
    rename). A reader never sees a half-written folder under ``final``; after a crash before the
    rename only ``tmp`` is left, for the caller to ignore."""
    files = _files(tmp) - {MANIFEST}
    check_replaceable(final, files)
    with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
        json.dump({"written_by": "ComfyUI-LongAlign", "files": sorted(files)}, f, indent=1)
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 -> what mkdir would have given
    for folder, _, names in os.walk(tmp):
        for name in names:
            _fsync(os.path.join(folder, name))
        _fsync_folder(folder)
    old = None
    if os.path.isdir(final):
        old = tempfile.mkdtemp(prefix="." + os.path.basename(os.path.abspath(final)) + ".", suffix=".old",
                               dir=os.path.dirname(os.path.abspath(final)))
        os.rmdir(old)  # a fresh name beside final, to move the old folder to
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_folder(os.path.dirname(os.path.abspath(final)))
    if old is not None:
        shutil.rmtree(old)
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
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested too deep
        raise ModelFileError(f"{what}: {path!r} is not a readable JSON file ({e})") from e
    if not isinstance(data, dict):
        raise ModelFileError(f"{what}: {path!r} holds a {type(data).__name__}, expected a JSON object")
    return data


# -- models built from a user's config: sizes bounded, shapes checked on the meta device, then built --

LAYER_FIELDS = ("layers", "num_layers", "num_hidden_layers", "num_decoder_layers", "depth", "layers_per_block",
                "transformer_layers_per_block")
SIZE_BOUNDS: dict[str, float] = {
    **dict.fromkeys(LAYER_FIELDS, 256),
    **dict.fromkeys(("width", "d_model", "hidden_size", "embed_dim", "projection_dim", "head_width", "d_kv",
                     "encoder_hidden_size", "in_dim", "int_dim", "out_dim", "block_out_channels",
                     "cross_attention_dim"), 16384),
    **dict.fromkeys(("d_ff", "intermediate_size"), 65536),
    **dict.fromkeys(("heads", "num_heads", "num_attention_heads"), 1024),
    "vocab_size": 1_000_000,
    **dict.fromkeys(("context_length", "max_position_embeddings", "relative_attention_num_buckets",
                     "relative_attention_max_distance"), 8192),
    **dict.fromkeys(("image_size", "patch_size", "sample_size"), 8192),
    "mlp_ratio": 16,
}
"""The largest value each config field may take, far above any released model (ViT-bigG: width 1664,
48 layers; T5-11B: d_ff 65536; vocabularies of 250k): a config naming more is refused before anything
is built, so a 50-byte config.json cannot make a loader build terabytes of weights or thousands of layers."""


def _config_numbers(config: Mapping[str, Any]) -> Iterator[tuple[str, str, Any]]:
    """``(dotted name, key, value)`` of every bounded field of a nested config (lists: each item)."""
    queue: deque[tuple[str, Any]] = deque([("", config)])
    while queue:  # no recursion: a config nested a thousand deep is walked like any other
        prefix, node = queue.popleft()
        items = node.items() if isinstance(node, Mapping) else enumerate(node)
        for key, value in items:
            name = f"{prefix}{key}"
            if key in SIZE_BOUNDS and not isinstance(value, Mapping):
                for v in value if isinstance(value, (list, tuple)) else [value]:  # e.g. image_size [224, 224]
                    yield name, key, v
            elif isinstance(value, (Mapping, list, tuple)):
                queue.append((name + ".", value))


def check_config_sizes(config: Mapping[str, Any], what: str, tensor_count: int | None = None) -> None:
    """Refuse at once a config whose sizes are far from any real model (:data:`SIZE_BOUNDS`), and one
    that names more layers than its weight file has tensors (every layer has weights): before the
    model is built, even on the meta device (a 250-layer model takes seconds to build there)."""
    for name, key, value in _config_numbers(config):
        if value is None:
            continue
        bound = SIZE_BOUNDS[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= bound:
            raise ModelFileError(f"{what}: config field {name} is {value!r}; expected a number from 0 to {bound:,} "
                                 "(no real model is larger): the config does not describe a real model")
        if key in LAYER_FIELDS and tensor_count is not None and value > tensor_count:
            raise ModelFileError(f"{what}: config field {name} is {value} layers but the weights hold only "
                                 f"{tensor_count} tensors (every layer has weights): config and weights do not match")


def weight_shapes(path: str, what: str = "model file") -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of a weights file without reading its tensors: the safetensors header, or a
    weights-only pickle memory-mapped (a legacy non-zip pickle is read whole; its size bounds that)."""
    _check_file(path, what)
    if not path.lower().endswith(SAFETENSORS_SUFFIXES):
        return {k: tuple(v.shape) for k, v in load_tensors(path, what).items()}
    try:
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"{what}: {path!r} is not a readable safetensors file ({e})") from e


def shape_problems(expected: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[int]]) -> list[str]:
    """What keeps a file's tensors ``found`` from loading strictly into a model expecting ``expected``."""
    return ([f"missing {k}" for k in expected if k not in found]
            + [f"unexpected {k}" for k in found if k not in expected]
            + [f"{k}: {tuple(found[k])} vs {tuple(expected[k])}" for k in expected
               if k in found and tuple(found[k]) != tuple(expected[k])])


def meta_model(build: Callable[[], torch.nn.Module], what: str) -> torch.nn.Module:
    """``build()`` on the meta device: every shape, no memory. A config the model class refuses is a
    :class:`ModelFileError` naming ``what``."""
    try:
        with torch.device("meta"):
            return build()
    except ModelFileError:
        raise
    except Exception as e:  # model classes raise TypeError, ValueError, AssertionError, ... on bad configs
        raise ModelFileError(f"{what}: no model can be built from its config ({type(e).__name__}: {e})") from e


def materialize(build: Callable[[], torch.nn.Module], state: Mapping[str, torch.Tensor], dtype: torch.dtype,
                what: str) -> torch.nn.Module:
    """``build()`` with its parameters on the meta device (buffers, which the constructor computes,
    real), then the checked weights ``state`` put in place (no random init, no second copy of the
    weights), in ``dtype``. Call it once :func:`shape_problems` found nothing."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = build()
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # the checks before make this unreachable for a well-formed file
        raise ModelFileError(f"{what}: the weights do not match the model: {e}") from e
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ModelFileError(f"{what}: no weights for {left[:5]}")
    return model.to(dtype)


PRETRAINED_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json", "diffusion_pytorch_model.safetensors",
                      "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin",
                      "diffusion_pytorch_model.bin.index.json")
"""The weight files of a transformers (then a diffusers) folder, in the order ``from_pretrained`` picks them."""


def pretrained_weight_shapes(folder: str, what: str) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of the weights ``from_pretrained`` would read from ``folder`` (one file or the
    shards its index names, each a plain file name in ``folder``), from the headers only."""
    for name in PRETRAINED_WEIGHTS:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if not name.endswith(".index.json"):
            return weight_shapes(path, what)
        weight_map = load_json_object(path, what).get("weight_map")
        shards = set(weight_map.values()) if isinstance(weight_map, dict) else {None}
        if not all(isinstance(s, str) and s == os.path.basename(s) and s not in ("", ".", "..") for s in shards):
            raise ModelFileError(f"{what}: {path!r} is not a sharded-weights index (expected a 'weight_map' of "
                                 "tensor names to shard file names in the same folder)")
        shapes: dict[str, tuple[int, ...]] = {}
        for shard in sorted(shards):
            shapes.update(weight_shapes(os.path.join(folder, shard), what))
        return shapes
    raise ModelFileError(f"{what}: no weights in {folder!r}; expected one of {', '.join(PRETRAINED_WEIGHTS)}")


def check_pretrained_folder(model_class: Any, path: str, what: str) -> None:
    """Before ``from_pretrained`` allocates anything: the folder's config.json within
    :data:`SIZE_BOUNDS`, and the model it describes, built on the meta device, no larger than its
    weights (``from_pretrained`` would fill the rest with random weights, in real memory). For a
    transformers model class or a diffusers one (``UNet2DConditionModel``, ``AutoencoderKL``, ...)."""
    try:
        shapes = pretrained_weight_shapes(path, what)
    except ModelFileError as e:
        raise ModelFileError(f"{what}: the {model_class.__name__} weights could not be read "
                             f"(corrupt or truncated file?): {e}") from e
    try:
        if getattr(model_class, "config_class", None) is not None:  # transformers
            config = model_class.config_class.from_pretrained(path, local_files_only=True)
            fields, build = config.to_dict(), lambda: model_class(config)
        else:  # diffusers' ConfigMixin
            config = model_class.load_config(path, local_files_only=True)
            fields, build = dict(config), lambda: model_class.from_config(config)
    except Exception as e:  # transformers and diffusers raise OSError, ValueError, TypeError, ... by case
        raise ModelFileError(f"{what}: its config.json could not be read as a {model_class.__name__} "
                             f"config ({e})") from e
    check_config_sizes(fields, what, len(shapes))
    need = sum(p.numel() for p in meta_model(build, what).parameters())
    have = sum(math.prod(shape) for shape in shapes.values())
    if need > have:
        raise ModelFileError(f"{what}: its config.json describes a model of {need:,} parameters but the weights "
                             f"hold {have:,} values: config and weights do not match")
