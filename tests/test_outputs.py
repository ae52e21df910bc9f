"""Output files and folders: written with the permissions the user's umask gives (not mkstemp's 0600),
and a folder the user named is never deleted: only a folder we wrote (or one holding only the files we
are about to rewrite) is replaced; anything else is refused with an error and left untouched."""
from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from trainer_helpers import SMALL_ARGS, make_image_folder
from training.safe_io import MANIFEST, OutputError, atomic_open, commit_folder, save_tensors, write_atomically


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test; the old one is restored after it."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def _sd15_reference_list(path: str) -> str:
    """A LongSD reference LoRA list (.pt) of rank 1 for the SD1.5 UNet."""
    from training.lora_format import lora_layers

    g = torch.Generator().manual_seed(0)
    torch.save([torch.randn(shape, generator=g).half() for layer in lora_layers() for shape in layer.lora_shapes(1)],
               path)
    return path


@pytest.mark.parametrize("mask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_our_writers_give_files_and_folders_the_umasks_mode(umask, tmp_path, mask, file_mode, folder_mode):
    from PIL import Image

    from training.convert_lora import convert

    reference = _sd15_reference_list(str(tmp_path / "ref.pt"))
    umask(mask)
    written = [save_tensors({"w": torch.ones(2)}, str(tmp_path / "lora_weights.safetensors")),
               write_atomically(str(tmp_path / "grid.png"), lambda tmp: Image.new("RGB", (4, 4)).save(tmp, "PNG"))]
    with atomic_open(str(tmp_path / "config.json")) as f:
        f.write("{}")
    written.append(str(tmp_path / "config.json"))
    convert(reference, str(tmp_path / "converted.safetensors"))
    written.append(str(tmp_path / "converted.safetensors"))
    folder = tmp_path / ".step-1.tmp"
    folder.mkdir(mode=0o700)
    save_tensors({"w": torch.ones(2)}, str(folder / "trainable.safetensors"))
    commit_folder(str(folder), str(tmp_path / "step-1"))
    written += [str(tmp_path / "step-1" / "trainable.safetensors"), str(tmp_path / "step-1" / MANIFEST)]
    assert {p: oct(mode(p)) for p in written} == {p: oct(file_mode) for p in written}
    assert oct(mode(tmp_path / "step-1")) == oct(folder_mode)


def test_a_training_run_writes_its_outputs_with_the_umasks_mode(umask, tmp_path):
    """In-process, with the settings every in-process run of the suite uses (CPU, fp32: accelerate's
    state is a process singleton)."""
    from training.cli import DESCRIPTIONS
    from training.config import build_parser, resolve
    from training.stages import build_align
    from training.trainer import train

    images = make_image_folder(str(tmp_path / "pairs"), n=2, size=32)
    out = tmp_path / "run"
    argv = ["--tiny", *SMALL_ARGS, "--data.path", images, "--data.batch_size", "2", "--data.resolution", "32",
            "--run.grad_accum", "1", "--run.max_steps", "1", "--run.save_every", "1", "--run.validate_every", "0",
            "--run.log_with", "none", "--run.device", "cpu", "--run.mixed_precision", "no", "--run.output_dir", str(out)]
    umask(0o027)
    train(resolve("align", build_parser("align", DESCRIPTIONS["align"]).parse_args(argv)), build_align)
    files = {os.path.relpath(os.path.join(r, n), out): mode(os.path.join(r, n)) for r, _, ns in os.walk(out) for n in ns}
    folders = {os.path.relpath(os.path.join(r, n), out): mode(os.path.join(r, n)) for r, ds, _ in os.walk(out) for n in ds}
    assert "lora_weights.safetensors" in files and "config.json" in files
    assert any(p.startswith("checkpoints") and p.endswith("trainable.safetensors") for p in files), sorted(files)
    assert {p: oct(m) for p, m in files.items()} == {p: oct(0o640) for p in files}
    assert {p: oct(m) for p, m in folders.items()} == {p: oct(0o750) for p in folders}


# -- export_merged: never deletes what the user named ---------------------------------------------

@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory) -> str:
    from training.lora import add_lora, kohya_state_dict
    from training.tiny import tiny_unet

    unet = tiny_unet()
    for p in add_lora(unet, 2, 2.0):
        torch.nn.init.normal_(p, std=0.1)
    return save_tensors(kohya_state_dict(unet, 2.0), str(tmp_path_factory.mktemp("lora") / "lora.safetensors"))


def export(lora: str, out: str, strength: float = 1.0) -> int:
    from training.export_merged import main

    return main(["--tiny", "--lora", f"{lora}:{strength}", "--out", out, "--dtype", "fp32"])


def test_export_into_a_folder_holding_a_users_file_is_refused_and_the_file_survives(tiny_lora, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    assert export(tiny_lora, str(out)) == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and "did not write" in err
    assert sorted(os.listdir(out)) == ["notes.txt"] and (out / "notes.txt").read_text() == "my notes"
    assert sorted(os.listdir(tmp_path)) == ["mine"]  # no temporary folder left beside it


def test_export_to_the_current_folder_is_refused_when_it_holds_the_users_files(tiny_lora, tmp_path, monkeypatch,
                                                                               capsys):
    (tmp_path / "thesis.tex").write_text("years of work")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.csv").write_text("1,2")
    monkeypatch.chdir(tmp_path)
    assert export(tiny_lora, ".") == 2
    assert "did not write" in capsys.readouterr().err
    assert (tmp_path / "thesis.tex").read_text() == "years of work" and (tmp_path / "data" / "a.csv").exists()


def test_export_replaces_its_own_output_but_not_a_file_the_user_added_to_it(tiny_lora, tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "merged"
    assert export(tiny_lora, str(out), 1.0) == 0
    first = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["files"] == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert export(tiny_lora, str(out), 0.0) == 0  # our own output: replaced
    second = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(first[k], second[k]) for k in first)
    assert sorted(os.listdir(tmp_path)) == ["merged"]  # the old folder was removed after the swap
    (out / "README").write_text("the user's note about this export")
    assert export(tiny_lora, str(out), 1.0) == 2
    assert "README" in capsys.readouterr().err and (out / "README").exists()


def test_a_diffusers_unet_folder_of_the_same_files_is_replaced_a_file_is_refused(tiny_lora, tmp_path):
    legacy = tmp_path / "legacy"  # written before the manifest existed: exactly the files an export writes
    legacy.mkdir()
    (legacy / "config.json").write_text("{}")
    (legacy / "diffusion_pytorch_model.safetensors").write_bytes(b"old")
    assert export(tiny_lora, str(legacy)) == 0
    assert json.loads((legacy / "config.json").read_text())["_class_name"] == "UNet2DConditionModel"
    target = tmp_path / "a_file"
    target.write_text("not a folder")
    assert export(tiny_lora, str(target)) == 2 and target.read_text() == "not a folder"


def test_commit_folder_refuses_a_foreign_folder_before_touching_anything(tmp_path):
    final, tmp = tmp_path / "adapter", tmp_path / ".adapter.tmp"
    final.mkdir()
    (final / "config.json").write_text("theirs")
    (final / "weights.bin").write_text("theirs")
    tmp.mkdir()
    (tmp / "config.json").write_text("ours")
    with pytest.raises(OutputError, match="weights.bin"):
        commit_folder(str(tmp), str(final))
    assert (final / "weights.bin").read_text() == "theirs" and (final / "config.json").read_text() == "theirs"
    assert not (tmp / MANIFEST).exists()
