"""The SDXL 24 GiB setting at 1024 px (:func:`.sdxl.setting_24gb`; GPU only, not in the default suites)."""
from __future__ import annotations

from .common import Result
from .sdxl import setting_24gb


def run(quick: bool) -> list[Result]:
    return setting_24gb(quick, 1024)
