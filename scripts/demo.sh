#!/usr/bin/env bash
# Sets everything up (first run: a few minutes) and runs the demo on the built-in tiny model.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
env_root="$(bash "$here/tests/comfy_env.sh" | tail -n 1)"
export LONGALIGN_COMFYUI="$env_root/comfyui"
exec "$env_root/venv/bin/python" "$here/scripts/demo.py" "$@"
