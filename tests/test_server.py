"""Integration: the pack inside the real ComfyUI server (CPU, loopback)."""
import os

import pytest
from PIL import Image

from workflows import load_example, replace_encoder_with_stock, shrink

pytestmark = pytest.mark.server


def test_object_info_lists_the_encoder_with_its_inputs(comfy_server):
    info = comfy_server.get("/object_info/LongAlignTextEncode")["LongAlignTextEncode"]
    required = info["input"]["required"]
    assert set(required) == {"clip", "text", "split", "token_length", "pad", "keep_bos"}
    assert required["token_length"][1]["default"] == 240
    assert required["split"][0] == ["sentences", "native"]
    assert info["output"] == ["CONDITIONING"]
    assert info["display_name"] == "LongAlign Text Encode (long prompt)" and info["category"] == "LongAlign/conditioning"
    assert info["description"].startswith("Encodes a prompt of any length") and len(info["output_tooltips"]) == 1


def _saved_image(server, entry, node_id):
    assert entry["status"]["status_str"] == "success", entry["status"]
    image = entry["outputs"][node_id]["images"][0]
    path = os.path.join(server.base_dir, "output", image.get("subfolder", ""), image["filename"])
    with Image.open(path) as im:
        assert im.size == (64, 64)
        return path


@pytest.mark.parametrize("control", [False, True], ids=["longalign", "stock-control"])
def test_long_prompt_workflow_writes_a_png(comfy_server, control):
    wf = shrink(load_example("long_prompt_sd15_api.json"), "tiny_sd15.safetensors",
                prefix="stock" if control else "longalign")
    assert len(wf["2"]["inputs"]["text"].split()) > 300  # ~400 CLIP tokens: five windows' worth
    if control:
        wf = replace_encoder_with_stock(wf)
    entry = comfy_server.run(wf)
    assert _saved_image(comfy_server, entry, "7").endswith(".png")


def test_invalid_option_is_refused_by_validation(comfy_server):
    wf = shrink(load_example("long_prompt_sd15_api.json"), "tiny_sd15.safetensors")
    wf["2"]["inputs"]["split"] = "words"
    status, body = comfy_server.queue(wf)
    assert status == 400
    assert "2" in body["node_errors"]


def test_readme_demo_runs_and_writes_both_images(comfy, tmp_path):
    """`bash scripts/demo.sh` (README) runs scripts/demo.py in the test environment: it must start its
    own server, run both graphs and write the two images it names."""
    import re
    import subprocess
    import sys

    from comfy_inprocess import REPO

    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "demo.py"), "--dir", str(tmp_path),
                           "--size", "64", "--steps", "1"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "LONGALIGN_COMFYUI": comfy})
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = re.findall(r"image written to (\S+)", proc.stdout)
    assert len(written) == 2 and all(os.path.isfile(p) for p in written), proc.stdout
