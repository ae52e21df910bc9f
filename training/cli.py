"""The stages' command lines: ``python -m training.align``, ``training.reward``, ``training.lcm``.

The command line is parsed and the config resolved with the standard library only (:mod:`.config`),
so ``--help`` and argument errors answer at once; torch, diffusers and the stage's models are
imported only for a run.
"""
from __future__ import annotations

import os
import sys

from . import config as config_mod
from .config import ConfigError

DESCRIPTIONS = {
    "align": "LongAlign stage 1: long-text alignment of an SD1.5 or SDXL UNet LoRA (diffusion loss, segment-level "
             "text encoding). Defaults reproduce the paper (SPEC §4).",
    "reward": "LongAlign stage 2: decomposed preference optimisation through the differentiable DDIM "
              "sampler (50 steps, K = 5 gradient calls, CFG 7.5, w = 0.3). Needs prompts only. --objective "
              "textcraftor, --objective comat and --sampler lcm (reward_lcm) share the same loop.",
    "lcm": "Latent consistency distillation of the (aligned) SD1.5 or SDXL teacher into a LoRA student (Huber loss, "
           "DDIM solver 50 steps, c_skip/c_out with sigma_data 0.5 and timestep scaling 10; SPEC §4). Sample with "
           "4 LCM steps, CFG off (ComfyUI: LoraLoader + ModelSamplingDiscrete lcm + KSampler lcm, cfg 1).",
}

UNSUPPORTED_ENGINES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
                       "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}
"""The variables ``accelerate launch`` sets for each engine but DDP. The trainer prepares the UNet and
the optimizer separately, saves the LoRA from process 0's own copy and copies the UNet for the fast
mode's no-grad calls: right under DDP (every process holds every weight), wrong under sharding."""


def check_engine() -> None:
    """Refuse, before anything loads, a launch with an engine other than DDP."""
    for variable, engine in UNSUPPORTED_ENGINES.items():
        if os.environ.get(variable, "false").lower() in ("1", "true", "yes"):
            raise ConfigError(
                f"accelerate launched this run with {engine} ({variable}), which the trainer does not support: "
                "it trains under DDP (one process per GPU, each holding the whole model; LoRA training of SD1.5 "
                "and SDXL fits one GPU). Launch with --config_file training/configs/accelerate/ddp_multi_gpu.yaml "
                "(one machine) or ddp_multi_node.yaml (several)")


def main(stage: str, argv: list[str] | None = None) -> int:
    """Parse, resolve, then import the trainer and run ``stage``; 2 with one ``error:`` line on bad input."""
    parser = config_mod.build_parser(stage, DESCRIPTIONS[stage])
    args = parser.parse_args(argv)
    try:
        cfg = config_mod.resolve(stage, args)
        check_engine()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .data import DataError
    from .safe_io import ModelFileError, OutputError
    from .stages import BUILDERS
    from .trainer import TrainingError, train

    try:
        train(cfg, BUILDERS[stage])
    except (ConfigError, DataError, ModelFileError, OutputError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
