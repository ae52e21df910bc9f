"""Shared fixtures: a real ComfyUI (in-process and as a server) and tiny models, built once.

The ComfyUI source tree comes from ``LONGALIGN_COMFYUI`` (``scripts/test.sh`` sets it from
``tests/comfy_env.sh``). Generated models are cached in ``LONGALIGN_TINY_CACHE``
(default ``~/.cache/comfyui-longalign/tiny``).
"""
from __future__ import annotations

import os
import sys

import pytest

import network_guard
from comfy_inprocess import REPO, comfy_clip_from_transformers, import_comfy, load_pack
from comfy_matrix import pytest_collection_modifyitems, pytest_report_header  # noqa: F401  (the legs: scripts/test.sh)

PACK_NAME = "ComfyUI-LongAlign"
if REPO not in sys.path:
    sys.path.append(REPO)  # after ComfyUI: the pack's nodes/ must never shadow ComfyUI's nodes.py
network_guard.install()  # before any test or fixture runs: no connection but loopback, ever
network_guard.guard_subprocesses()  # the trainer CLIs and the ComfyUI server the tests start, too


@pytest.fixture(autouse=True)
def no_network():
    """Fail the test if it, or a session fixture set up for it, tried to reach a non-loopback address
    (even when the code under test caught the guard's error)."""
    yield
    tried = network_guard.take_attempts()
    if tried:
        pytest.fail(f"the test tried to reach the network ({len(tried)} attempts): {tried[:3]}")


def comfyui_dir() -> str:
    path = os.environ.get("LONGALIGN_COMFYUI", "")
    if not os.path.isfile(os.path.join(path, "main.py")):
        raise RuntimeError(
            "LONGALIGN_COMFYUI must point at a ComfyUI source tree (main.py); run the tests with "
            "`bash scripts/test.sh`, which builds one"
        )
    return path


def tiny_cache_dir() -> str:
    path = os.environ.get("LONGALIGN_TINY_CACHE", os.path.expanduser("~/.cache/comfyui-longalign/tiny"))
    os.makedirs(path, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI imported in-process on the CPU; returns its folder."""
    root = comfyui_dir()
    import_comfy(root)
    return root


@pytest.fixture(scope="session")
def pack(comfy):
    """The pack imported the way ComfyUI imports it: as a package from its folder."""
    return load_pack()


def built_once(file_name: str, build) -> str:
    """``tiny_cache_dir()/file_name``, written by ``build(path)`` (atomically) the first time on this machine."""
    path = os.path.join(tiny_cache_dir(), file_name)
    if not os.path.isfile(path):
        build(path)
    return path


@pytest.fixture(scope="session")
def tiny_sd15_checkpoint(comfy) -> str:
    from tiny_models import build_tiny_sd15_checkpoint

    return built_once("tiny_sd15_v2.safetensors", build_tiny_sd15_checkpoint)


@pytest.fixture(scope="session")
def trainable_sd15_checkpoint(comfy) -> str:
    """A tiny SD1.5 single file that ComfyUI's CheckpointLoaderSimple and the trainer both load, with its
    component configs in ``<name>.config/`` beside it (built once per machine); :func:`install_checkpoint`
    puts both into a models/checkpoints folder."""
    from tiny_models import build_trainable_sd15_checkpoint

    return built_once("tiny_sd15_trainable_v1.safetensors", build_trainable_sd15_checkpoint)


def install_checkpoint(checkpoint: str, folder: str, name: str = "tiny_sd15_train.safetensors") -> str:
    """Put ``checkpoint`` (a hard link, else a copy: the pack's nodes refuse links leading out of the
    models folders) and a copy of its ``<name>.config/`` sidecar into ``folder`` as ``name``; returns its path."""
    import shutil

    from training.job_request import sidecar_config_dir

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    if not os.path.lexists(path):
        shutil.copytree(sidecar_config_dir(checkpoint), sidecar_config_dir(path))
        try:
            os.link(checkpoint, path)
        except OSError:  # another file system
            shutil.copyfile(checkpoint, path)
    return path


@pytest.fixture(scope="session")
def server_train_checkpoint(comfy_server, trainable_sd15_checkpoint) -> str:
    """:func:`trainable_sd15_checkpoint` in the comfy_server's models/checkpoints; returns its name there."""
    return os.path.basename(install_checkpoint(trainable_sd15_checkpoint, comfy_server.model_folder("checkpoints")))


@pytest.fixture(scope="session")
def tiny_sdxl_checkpoint(comfy) -> str:
    """The SDXL-format file ComfyUI detects as SDXL (~1.9 GB: the full text encoders), built once per machine."""
    from tiny_models import build_tiny_sdxl_checkpoint

    return built_once("tiny_sdxl_detected_v1.safetensors", build_tiny_sdxl_checkpoint)


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, tiny_sd15_checkpoint):
    """A real ComfyUI server (CPU, loopback) with this pack and the tiny SD1.5 checkpoint."""
    from comfy_server import ComfyServer

    base = tmp_path_factory.mktemp("comfy-base")
    os.makedirs(base / "custom_nodes")
    os.symlink(REPO, base / "custom_nodes" / PACK_NAME)
    os.makedirs(base / "models" / "checkpoints")
    os.symlink(tiny_sd15_checkpoint, base / "models" / "checkpoints" / "tiny_sd15.safetensors")
    server = ComfyServer(comfyui_dir(), str(base), str(base / "server.log")).start()
    log = server.log()
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line and PACK_NAME in line]
    if failed or PACK_NAME not in log:
        server.stop()
        raise RuntimeError(f"the pack did not load into ComfyUI:\n{log[-4000:]}")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_clip_pair(comfy):
    """The same tiny CLIP-L weights as the trainer's backend and as ComfyUI's CLIP object."""
    from tiny_models import tiny_clip_text_model
    from training.clip_text import TransformersClipBackend, clip_tokenizer

    model = tiny_clip_text_model(num_layers=2)
    return TransformersClipBackend(clip_tokenizer(), model), comfy_clip_from_transformers(model)


@pytest.fixture
def model_folder(comfy, tmp_path):
    """``register(kind)``: makes ``tmp_path/models/<kind>`` a ComfyUI models folder of ``kind`` for one
    test (removed again afterwards) and returns it."""
    import folder_paths

    added = []

    def register(kind: str):
        path = tmp_path / "models" / kind
        os.makedirs(path, exist_ok=True)
        folder_paths.add_model_folder_path(kind, str(path))
        added.append((kind, str(path)))
        return path

    yield register
    for kind, path in added:
        folder_paths.folder_names_and_paths[kind][0].remove(path)
