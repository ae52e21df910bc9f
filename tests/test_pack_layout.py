"""The pack's shape: importable outside ComfyUI, training/ free of ComfyUI, requirements sane."""
import ast
import json
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


def _pyproject() -> dict:
    import tomllib

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_pyproject_is_what_the_registry_asks_for():
    project, comfy = _pyproject()["project"], _pyproject()["tool"]["comfy"]
    assert "comfyui" not in project["name"].lower() and project["name"] == project["name"].lower()
    assert comfy["requires-comfyui"] == ">=0.3.75"  # the oldest ComfyUI the tests run on
    # no placeholder URL: a repository link only where one exists (none yet)
    assert "Repository" not in project.get("urls", {}) and "example" not in json.dumps(project)
    assert comfy["PublisherId"] and comfy["DisplayName"]
    icon = os.path.join(REPO, "web", "icon.svg")  # what Icon will point to once the repository is public
    svg = open(icon, encoding="utf-8").read()
    assert svg.startswith("<svg") and 'width="400" height="400"' in svg  # the Registry takes up to 800 x 400


def test_comfyuis_own_parser_reads_the_tested_minimum(comfy):
    from comfy_config.config_parser import extract_node_configuration

    config = extract_node_configuration(REPO)
    assert config.project.name == "longalign" and config.project.supported_comfyui_version == ">=0.3.75"


def _archived(paths: list[str], tmp_path) -> dict[str, bool]:
    """Which ``paths`` the published archive keeps under ``.comfyignore`` (gitignore rules, read by git)."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    with open(os.path.join(REPO, ".comfyignore"), encoding="utf-8") as src, open(tmp_path / ".gitignore", "w") as dst:
        dst.write(src.read())
    out = subprocess.run(["git", "-C", str(tmp_path), "check-ignore", "--no-index", "--stdin"], input="\n".join(paths),
                         capture_output=True, text=True)
    ignored = set(out.stdout.split())
    return {p: p not in ignored for p in paths}


def test_comfyignore_keeps_tests_benchmarks_screenshots_and_scripts_out(tmp_path):
    out = ["tests/test_server.py", "bench/reward.py", "docs/screenshots/best_of_n_scores.png", "scripts/demo.py",
           "tests/workflows.py"]
    kept = ["__init__.py", "nodes/encode.py", "training/encode.py", "web/js/longalign.js", "web/icon.svg",
            "example_workflows/Long prompt (SD1.5).json", "example_workflows/Long prompt (SD1.5).jpg",
            "example_workflows_api/long_prompt_sd15_api.json", "README.md", "LICENSE", "pyproject.toml",
            "requirements.txt", "training/configs/examples/align.yaml"]
    archived = _archived(out + kept, tmp_path)
    assert [p for p in out if archived[p]] == [] and [p for p in kept if not archived[p]] == []
    for path in kept[:7]:
        assert os.path.exists(os.path.join(REPO, path)), path
