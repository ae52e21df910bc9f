"""Helpers for the trainer tests: tiny datasets and running a stage as users do (a subprocess)."""
from __future__ import annotations

import os
import subprocess
import sys

from PIL import Image, ImageDraw

from comfy_inprocess import REPO

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square"]


def make_image_folder(folder: str, n: int = 16, size: int = 64) -> str:
    """``n`` images of coloured shapes, each with a multi-sentence caption beside it."""
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        colour, background = COLOURS[i % len(COLOURS)], COLOURS[(i + 3) % len(COLOURS)]
        shape = SHAPES[i % 2]
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
        image.save(os.path.join(folder, f"{i:02d}.png"))
        with open(os.path.join(folder, f"{i:02d}.txt"), "w", encoding="utf-8") as f:
            f.write(f"A {colour} {shape} in the middle of the picture. The background is {background}. "
                    f"The {shape} has sharp edges and flat colour. Nothing else is visible.")
    return folder


def make_prompt_file(path: str, n: int = 4) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(f"A {COLOURS[i]} {SHAPES[i % 2]} on a {COLOURS[i + 2]} table. The light is soft.\n")
    return path


SMALL_ARGS = ["--data.resolution", "64", "--model.token_length", "77", "--lora.rank", "4",
             "--lora.alpha", "4", "--optim.warmup_steps", "0", "--run.log_every", "1"]


def stage_command(stage: str, *args: str, launcher: list[str] | None = None, tiny: bool = True) -> list[str]:
    base = launcher or [sys.executable]
    return [*base, "-m", f"training.{stage}", *(["--tiny"] if tiny else []), *SMALL_ARGS, *args]


def run_stage(stage: str, *args: str, timeout: float = 600, check: bool = True,
              launcher: list[str] | None = None, tiny: bool = True) -> subprocess.CompletedProcess:
    """``python -m training.<stage> --tiny ...`` from the repo root; output captured."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(stage_command(stage, *args, launcher=launcher, tiny=tiny), cwd=REPO, capture_output=True,
                         text=True, timeout=timeout, env=env)
    if check and out.returncode != 0:
        raise AssertionError(f"training.{stage} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out


IN_PROCESS_ARGS = ["--run.device", "cpu", "--run.mixed_precision", "no", "--run.log_with", "none"]
"""In-process runs share accelerate's process-wide state: every one uses these settings."""


def resolve_stage(stage: str, *args: str, tiny: bool = True):
    """The config ``python -m training.<stage> --tiny <SMALL_ARGS> <IN_PROCESS_ARGS> args`` runs."""
    from training import config as config_mod
    from training.cli import DESCRIPTIONS

    parser = config_mod.build_parser(stage, DESCRIPTIONS[stage])
    argv = [*(["--tiny"] if tiny else []), *SMALL_ARGS, *IN_PROCESS_ARGS, *args]
    return config_mod.resolve(stage, parser.parse_args(argv))


def train_in_process(stage: str, *args: str, build_run=None) -> str:
    """:func:`training.trainer.train` of :func:`resolve_stage`'s config in this process (no start-up cost)."""
    from training.stages import BUILDERS
    from training.trainer import train

    return train(resolve_stage(stage, *args), build_run or BUILDERS[stage], argv=list(args))


def accelerate_launch() -> list[str]:
    """``accelerate launch`` with two processes. On a machine without GPUs, ``--multi_gpu`` starts two
    CPU processes (MULTI_CPU, gloo); ``--cpu --num_processes 2`` would need MPI."""
    from comfy_server import free_port

    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port())]


def metrics(output_dir: str) -> list[dict]:
    import json

    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
