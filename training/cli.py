"""The stages' command lines: ``python -m training.align``, ``training.reward``, ``training.lcm``.

The command line is parsed and the config resolved with the standard library only (:mod:`.config`),
so ``--help`` and argument errors answer at once; torch, diffusers and the stage's models are
imported only for a run.
"""
from __future__ import annotations

import sys

from . import config as config_mod
from .config import ConfigError

DESCRIPTIONS = {
    "align": "LongAlign stage 1: long-text alignment of an SD1.5 UNet LoRA (diffusion loss, segment-level "
             "text encoding). Defaults reproduce the paper (SPEC §4).",
    "reward": "LongAlign stage 2: decomposed preference optimisation through the differentiable DDIM "
              "sampler (50 steps, K = 5 gradient calls, CFG 7.5, w = 0.3). Needs prompts only. --objective "
              "textcraftor, --objective comat and --sampler lcm (reward_lcm) share the same loop.",
    "lcm": "Latent consistency distillation of the (aligned) SD1.5 teacher into a LoRA student (Huber loss, "
           "DDIM solver 50 steps, c_skip/c_out with sigma_data 0.5 and timestep scaling 10; SPEC §4). Sample with "
           "4 LCM steps, CFG off (ComfyUI: LoraLoader + ModelSamplingDiscrete lcm + KSampler lcm, cfg 1).",
}


def main(stage: str, argv: list[str] | None = None) -> int:
    """Parse, resolve, then import the trainer and run ``stage``; 2 with one ``error:`` line on bad input."""
    parser = config_mod.build_parser(stage, DESCRIPTIONS[stage])
    args = parser.parse_args(argv)
    try:
        cfg = config_mod.resolve(stage, args)
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
