"""The pack's shape: importable outside ComfyUI, training/ free of ComfyUI, requirements sane."""
import ast
import os
import subprocess
import sys

from comfy_inprocess import REPO

COMFY_MODULES = {"comfy", "comfy_extras", "comfy_api", "folder_paths", "server", "execution", "nodes", "node_helpers"}


def _imports(path):
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def test_training_never_imports_comfyui():
    offenders = []
    for folder, _, files in os.walk(os.path.join(REPO, "training")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                bad = COMFY_MODULES.intersection(_imports(path))
                if bad:
                    offenders.append((os.path.relpath(path, REPO), sorted(bad)))
    assert offenders == []


def test_training_uses_relative_imports_only_for_itself():
    for folder, _, files in os.walk(os.path.join(REPO, "training")):
        for name in files:
            if name.endswith(".py"):
                assert "training" not in set(_imports(os.path.join(folder, name))), name


def test_pack_imports_outside_comfyui_and_registers_its_nodes():
    code = (
        "import importlib.util, sys, os\n"
        f"repo = {REPO!r}\n"
        "spec = importlib.util.spec_from_file_location('longalign_pack', os.path.join(repo, '__init__.py'),"
        " submodule_search_locations=[repo])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['longalign_pack'] = m; spec.loader.exec_module(m)\n"
        "assert 'comfy' not in sys.modules and 'folder_paths' not in sys.modules, 'imported ComfyUI'\n"
        "print(sorted(m.NODE_CLASS_MAPPINGS), m.WEB_DIRECTORY)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/")
    assert out.returncode == 0, out.stderr
    assert "LongAlignTextEncode" in out.stdout and "./web" in out.stdout


def test_trainer_package_runs_as_a_module_from_the_repo_root():
    out = subprocess.run([sys.executable, "-c", "import training.encode, training.segments"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr


def test_requirements_never_pull_torch():
    lines = [l.split("#")[0].strip().lower() for l in open(os.path.join(REPO, "requirements.txt"))]
    names = {l.split(">")[0].split("=")[0].split("<")[0].strip() for l in lines if l}
    assert not names & {"torch", "torchvision", "torchaudio"}
    assert {"diffusers", "transformers", "peft", "safetensors", "open_clip_torch", "accelerate"} <= names
