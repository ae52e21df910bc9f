#!/usr/bin/env bash
# Runs the benchmark suite in the test environment:  bash scripts/bench.sh [--quick] [--json PATH]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
env_root="$(bash "$here/tests/comfy_env.sh" | tail -n 1)"
export LONGALIGN_COMFYUI="$env_root/comfyui"
cd "$here"
exec "$env_root/venv/bin/python" -m bench "$@"
