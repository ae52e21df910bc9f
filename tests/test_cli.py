"""The command line: ``--help`` and argument errors answer before torch is imported; each stage's
``--help`` lists only the sections it reads, and an option of another section is refused by name;
``training.evaluate --help`` documents every option; every README trainer command resolves with a
config from ``training/configs/examples``; the example accelerate configs load as DDP."""
from __future__ import annotations

import dataclasses
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

from comfy_inprocess import REPO
from training import config as config_mod
from training.cli import DESCRIPTIONS
from training.config import ConfigError, build_parser, resolve

HEAVY = ("torch", "diffusers", "transformers", "accelerate", "numpy", "PIL")
EXAMPLES = os.path.join(REPO, "training", "configs", "examples")
OTHER_SECTIONS = {"align": ("sampling", "textcraftor", "comat", "lcm"), "lcm": ("sampling", "textcraftor", "comat"),
                  "reward": ()}


def _cli(stage: str, *argv: str) -> subprocess.CompletedProcess:
    """``python -X importtime -m training.<stage> argv``: stderr lists every module imported."""
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-X", "importtime", "-m", f"training.{stage}", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("tool, argv", [("export_merged", ["--help"]), ("export_merged", ["--tiny"]),
                                        ("convert_lora", ["--help"]), ("convert_lora", ["in.pt", "out.bin"]),
                                        ("evaluate", ["--help"]), ("evaluate", ["--kind", "nope"])])
def test_the_other_tools_answer_help_and_argument_errors_before_torch_is_imported(tool, argv):
    out = _cli(tool, *argv)
    assert out.returncode == (0 if argv == ["--help"] else 2), out.stderr[-2000:]
    assert ("usage:" in out.stdout) if argv == ["--help"] else ("error:" in out.stderr)
    assert "import time:" in out.stderr
    assert not _imported(out.stderr) & set(HEAVY), sorted(_imported(out.stderr) & set(HEAVY))


@pytest.mark.parametrize("variable, engine", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_a_launch_with_fsdp_or_deepspeed_is_refused_before_anything_loads(tmp_path, variable, engine):
    """``accelerate launch`` with an FSDP or DeepSpeed config tells each process through the environment."""
    env = {**os.environ, "PYTHONPATH": REPO, variable: "true"}
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "training.align", "--tiny", "--data.path",
                          str(tmp_path), "--run.output_dir", str(tmp_path / "out")], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"with {engine} ({variable}), which the trainer does not support" in out.stderr
    assert "training/configs/accelerate/ddp_multi_gpu.yaml" in out.stderr
    assert not _imported(out.stderr) & set(HEAVY) and not (tmp_path / "out").exists()


def _imported(stderr: str) -> set[str]:
    """Top-level packages in ``-X importtime``'s report (lines ``import time: self | cumulative | name``)."""
    return {m.group(1).split(".")[0] for m in re.finditer(r"^import time:.*\|\s+([\w.]+)\s*$", stderr, re.M)}


@pytest.mark.parametrize("stage", ["align", "reward", "lcm"])
@pytest.mark.parametrize("argv, rc, expected", [
    (["--help"], 0, "usage: python -m training."),
    (["--lora.rank", "four"], 2, "lora.rank: expected int, got 'four'"),
    (["--no-such-option"], 2, "unrecognized arguments: --no-such-option"),
    (["--comat.w_adv", "0"], 2, "comat.w_adv: "),
    (["--config", "missing.yaml"], 2, "config file 'missing.yaml' does not exist"),
])
def test_help_and_argument_errors_answer_before_torch_is_imported(stage, argv, rc, expected):
    out = _cli(stage, *argv)
    assert out.returncode == rc, out.stderr[-2000:]
    assert expected in out.stdout + out.stderr
    assert "import time:" in out.stderr  # the report is there, so an empty intersection means something
    assert not _imported(out.stderr) & set(HEAVY), sorted(_imported(out.stderr) & set(HEAVY))


def _help(stage: str) -> str:
    return build_parser(stage, DESCRIPTIONS[stage]).format_help()


@pytest.mark.parametrize("stage", ["align", "reward", "lcm"])
def test_each_stage_lists_only_the_sections_it_reads_one_group_each(stage):
    text = _help(stage)
    titles = re.findall(r"^(\w+):$", text, re.M)
    assert titles == ["options", *config_mod.STAGE_SECTIONS[stage]]
    for section in OTHER_SECTIONS[stage]:
        assert f"--{section}." not in text, section
    for section in config_mod.STAGE_SECTIONS[stage]:
        assert f"--{section}." in text
    assert len(text.splitlines()[0]) < 120  # a short usage line, not every option again


def test_align_help_is_short_and_reward_help_names_when_its_extra_sections_apply():
    align, reward = _help("align"), _help("reward")
    extra = sum(len(dataclasses.fields(getattr(config_mod.TrainConfig(), s))) for s in OTHER_SECTIONS["align"])
    assert reward.count("\n  --") - align.count("\n  --") == extra + 3  # + --objective, --sampler, --captioner
    assert "used with --objective textcraftor" in reward and "used with --objective comat" in reward
    assert "reward with --sampler lcm" in reward


@pytest.mark.parametrize("stage, argv, message", [
    ("align", ["--sampling.steps", "3"], "sampling.steps: `training.align` does not use the sampling section"),
    ("align", ["--lcm.w_min", "2"], "lcm.w_min: `training.align` does not use the lcm section"),
    ("lcm", ["--textcraftor.rank", "4"], "textcraftor.rank: `training.lcm` does not use the textcraftor section"),
    ("lcm", ["--sampling.guidance", "2"], "sampling.guidance: `training.lcm` does not use the sampling section"),
    ("reward", ["--comat.w_adv", "0"], "comat.w_adv: the comat section is read only with --objective comat"),
    ("reward", ["--objective", "comat", "--textcraftor.rank", "4"],
     "textcraftor.rank: the textcraftor section is read only with --objective textcraftor"),
    ("reward", ["--lcm.sigma_data", "1"], "lcm.sigma_data: the lcm section is read only with --sampler lcm"),
])
def test_an_option_of_a_section_the_run_does_not_read_is_refused_by_name(stage, argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve(stage, build_parser(stage, "").parse_args(argv))


def test_a_config_file_section_the_run_does_not_read_is_refused_and_a_used_one_applies(tmp_path):
    wrong = tmp_path / "align.yaml"
    wrong.write_text("data:\n  batch_size: 2\nsampling:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=re.escape("sampling.steps: `training.align` does not use")):
        resolve("align", build_parser("align", "").parse_args(["--config", str(wrong)]))
    comat = tmp_path / "comat.yaml"
    comat.write_text("sampling:\n  objective: comat\ncomat:\n  w_adv: 0\n")
    cfg = resolve("reward", build_parser("reward", "").parse_args(["--config", str(comat)]))
    assert cfg.sampling.objective == "comat" and cfg.comat.w_adv == 0
    cfg = resolve("reward", build_parser("reward", "").parse_args(["--sampler", "lcm", "--lcm.sigma_data", "1"]))
    assert cfg.lcm.sigma_data == 1 and cfg.sampling.steps == 4


def test_evaluate_help_gives_every_option_a_help_text_and_its_default(capsys):
    from training.evaluate import parse_args

    with pytest.raises(SystemExit) as done:
        parse_args(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    body = text[text.index("options:"):]
    blocks = re.split(r"\n(?=  -)", body)[1:]  # one block per option: its names, then its help lines
    options = {re.match(r"\s*(-[-\w, ]+?)(?: [A-Z{]|\n|  |$)", b).group(1): b for b in blocks}
    assert len(options) == 14, list(options)  # -h and the 13 options
    for names, block in options.items():
        if names == "-h, --help":
            continue
        block = " ".join(block.split())
        words = re.sub(r"\(default: .*?\)|\(required\)", "", " ".join(block.split()[2:]))
        assert len(words.split()) >= 3, f"{names}: no help text: {block!r}"
        assert "(default: " in block or "(required)" in block, f"{names}: no default: {block!r}"
    assert "--device DEVICE" in text and "(default: auto)" in " ".join(text.split())


def _readme_trainer_commands() -> list[list[str]]:
    """The ``python -m training.<stage>`` commands (also under ``accelerate launch``) of README's
    trainer section, as argument lists from the module name on, ``[...]`` placeholders and comments dropped."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme[readme.index("## The trainer"):]
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    commands = []
    for line in block.splitlines():
        line = re.sub(r"\[[^\]]*\]", "", line.split(" #")[0]).strip()
        words = shlex.split(line)
        if "-m" in words and words[words.index("-m") + 1] in ("training.align", "training.reward", "training.lcm"):
            commands.append(words[words.index("-m") + 1:])
    return commands


def test_every_readme_trainer_command_resolves_with_a_config_from_the_examples():
    commands = _readme_trainer_commands()
    stages = {c[0].split(".")[1] for c in commands}
    assert stages == {"align", "reward", "lcm"}, commands
    used = set()
    for module, *argv in commands:
        stage = module.split(".")[1]
        assert "--config" in argv, f"{module} {' '.join(argv)}: no --config"
        path = argv[argv.index("--config") + 1]
        assert os.path.dirname(os.path.abspath(os.path.join(REPO, path))) == EXAMPLES and os.path.isfile(
            os.path.join(REPO, path)), f"README command `{module} {' '.join(argv)}`: {path} is not in {EXAMPLES}"
        argv[argv.index("--config") + 1] = os.path.join(REPO, path)
        resolve(stage, build_parser(stage, "").parse_args(argv))
        used.add(os.path.basename(path))
    assert {"align.yaml", "reward.yaml", "lcm.yaml", "tc.yaml", "reward_lcm.yaml"} <= used


@pytest.mark.parametrize("name, stage, objective, sampler", [
    ("align.yaml", "align", "longalign", "ddim"), ("reward.yaml", "reward", "longalign", "ddim"),
    ("lcm.yaml", "lcm", "longalign", "ddim"), ("tc.yaml", "reward", "textcraftor", "ddim"),
    ("reward_lcm.yaml", "reward", "longalign", "lcm"), ("comat.yaml", "reward", "comat", "ddim"),
])
def test_each_example_config_resolves_for_its_stage(name, stage, objective, sampler):
    path = os.path.join(EXAMPLES, name)
    assert config_mod.read_config_file(path)["stage"] == stage
    cfg = resolve(stage, build_parser(stage, "").parse_args(["--config", path]))
    assert (cfg.stage, cfg.sampling.objective, cfg.sampling.sampler) == (stage, objective, sampler)
    assert cfg.model.pretrained and cfg.data.path


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(EXAMPLES, "*.yaml"))), ids=os.path.basename)
def test_every_example_config_names_its_stage_and_resolves(path):
    stage = config_mod.read_config_file(path).get("stage")
    assert stage in config_mod.STAGE_SECTIONS, f"{path}: no `stage:` line"
    cfg = resolve(stage, build_parser(stage, "").parse_args(["--config", path]))
    assert cfg.model.pretrained and cfg.data.path and cfg.run.output_dir


@pytest.mark.parametrize("name, machines", [("ddp_multi_gpu.yaml", 1), ("ddp_multi_node.yaml", 2)])
def test_example_accelerate_configs_load_as_multi_gpu_ddp(name, machines):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(os.path.join(REPO, "training", "configs", "accelerate", name))
    assert config.distributed_type == DistributedType.MULTI_GPU
    assert config.num_machines == machines and config.num_processes % machines == 0
    assert not config.fsdp_config and not config.deepspeed_config
    if machines > 1:
        assert config.machine_rank == 0 and config.main_process_ip and config.main_process_port
