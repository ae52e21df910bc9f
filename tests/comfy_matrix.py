"""The ComfyUI version / front-end matrix: which tests a leg of ``scripts/test.sh`` runs, and the
report header that names the leg's ComfyUI, front end and renderer. Hooks imported by conftest.

A leg is set by the environment: ``LONGALIGN_COMFYUI`` (the ComfyUI tree), ``LONGALIGN_FRONT_END``
and ``LONGALIGN_VUE_NODES`` (read by ``comfy_server``), and ``LONGALIGN_LEG``: unset runs every test;
``server`` only the tests marked ``server`` or ``comfyui`` (they depend on ComfyUI's version);
``browser`` only those marked ``browser`` (they depend on the front end and its renderer). Tests in
``test_browser*.py`` files are marked ``browser`` and ``server`` here, so new ones join every leg.
"""
from __future__ import annotations

import os
import re

import pytest

LEG_MARKERS = {"server": ("server", "comfyui"), "browser": ("browser",)}


def leg() -> str | None:
    """The leg's name (``LONGALIGN_LEG``), None for the whole suite; an unknown name is refused."""
    name = os.environ.get("LONGALIGN_LEG") or None
    if name is not None and name not in LEG_MARKERS:
        raise pytest.UsageError(f"LONGALIGN_LEG={name!r}: expected one of {sorted(LEG_MARKERS)} or unset")
    return name


def comfyui_version(root: str) -> str:
    """The version in ``root/comfyui_version.py`` ("unknown" if it names none)."""
    try:
        with open(os.path.join(root, "comfyui_version.py"), encoding="utf-8") as f:
            found = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", f.read())
    except OSError:
        found = None
    return found.group(1) if found else "unknown"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if os.path.basename(str(item.fspath)).startswith("test_browser") or item.get_closest_marker("browser"):
            item.add_marker(pytest.mark.browser)
            item.add_marker(pytest.mark.server)
    name = leg()
    if name is None:
        return
    wanted = LEG_MARKERS[name]
    keep = [item for item in items if any(item.get_closest_marker(m) for m in wanted)]
    dropped = [item for item in items if not any(item.get_closest_marker(m) for m in wanted)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def pytest_report_header(config):
    from comfy_server import front_end_root, vue_nodes

    root = os.environ.get("LONGALIGN_COMFYUI", "")
    return [f"ComfyUI {comfyui_version(root)} ({root}); front end: {front_end_root() or 'the installed package'}; "
            f"node renderer: {'Vue (Nodes 2.0)' if vue_nodes() else 'litegraph'}; leg: {leg() or 'the whole suite'}"]
