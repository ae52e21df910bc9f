"""The demo: a real ComfyUI (headless, CPU) with this pack runs the long-prompt example workflow on
the built-in tiny SD1.5 checkpoint and prints where the image went. Run through scripts/demo.sh."""
from __future__ import annotations

import argparse
import os
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]  # the library (training/) and the test helpers

from comfy_inprocess import import_comfy  # noqa: E402
from comfy_server import ComfyServer  # noqa: E402
from tiny_models import build_tiny_sd15_checkpoint  # noqa: E402
from workflows import load_example, replace_encoder_with_stock, shrink  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", default=os.path.expanduser("~/.cache/comfyui-longalign/demo"),
                        help="ComfyUI base directory for the demo (models, custom_nodes, output)")
    parser.add_argument("--size", type=int, default=128, help="image size in pixels")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps")
    args = parser.parse_args()

    comfyui = os.environ["LONGALIGN_COMFYUI"]
    for sub in ("custom_nodes", "models/checkpoints", "output"):
        os.makedirs(os.path.join(args.dir, sub), exist_ok=True)
    link = os.path.join(args.dir, "custom_nodes", "ComfyUI-LongAlign")
    if os.path.islink(link) or os.path.exists(link):
        os.remove(link) if os.path.islink(link) else shutil.rmtree(link)
    os.symlink(REPO, link)
    ckpt = os.path.join(args.dir, "models", "checkpoints", "tiny_sd15.safetensors")
    if not os.path.isfile(ckpt):
        print("building the tiny SD1.5 checkpoint (random weights, a few seconds) ...", flush=True)
        import_comfy(comfyui)
        build_tiny_sd15_checkpoint(ckpt)

    print("starting ComfyUI (CPU, 127.0.0.1) with the pack ...", flush=True)
    server = ComfyServer(comfyui, args.dir, os.path.join(args.dir, "server.log")).start()
    try:
        workflow = shrink(load_example("long_prompt_sd15_api.json"), "tiny_sd15.safetensors",
                          steps=args.steps, size=args.size, prefix="demo_longalign")
        prompt = workflow["2"]["inputs"]["text"]
        print(f"prompt: {len(prompt.split())} words; LongAlign Text Encode -> KSampler -> SaveImage", flush=True)
        for label, wf in (("LongAlign", workflow), ("stock CLIPTextEncode", replace_encoder_with_stock(
                shrink(workflow, "tiny_sd15.safetensors", steps=args.steps, size=args.size, prefix="demo_stock")))):
            entry = server.run(wf)
            if entry["status"]["status_str"] != "success":
                print(f"{label}: failed: {entry['status']}", file=sys.stderr)
                return 1
            image = entry["outputs"]["7"]["images"][0]
            path = os.path.join(args.dir, "output", image.get("subfolder", ""), image["filename"])
            print(f"{label}: image written to {path}")
    finally:
        server.stop()
    print("(the tiny model has random weights: the images are noise-like; the graph is the real one)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
