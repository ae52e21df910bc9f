#!/usr/bin/env bash
# Runs the test suite in the test environment (built or reused by tests/comfy_env.sh), in three legs:
#   1. ComfyUI 0.3.75, front end 1.32.9: every test
#   2. ComfyUI 0.30.0, front end 1.58.1 (litegraph nodes): the tests marked server or comfyui
#   3. ComfyUI 0.30.0, front end 1.58.1 (Vue nodes, "Nodes 2.0"): the tests marked browser
#
#   bash scripts/test.sh [pytest args...]          # the args go to every leg
#   LONGALIGN_LEGS="1" bash scripts/test.sh ...    # only the legs named (default "1 2 3")
# Every leg runs; the exit status is the first failing leg's (a leg that selects no test passes).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
env_root="$(bash "$here/tests/comfy_env.sh" | tail -n 1)"
cd "$here"

status=0
run_leg() {  # NUMBER COMFYUI FRONT_END VUE LEG TITLE [pytest args...]
  local number="$1" comfyui="$2" front_end="$3" vue="$4" leg="$5" title="$6"
  shift 6
  [[ " ${LONGALIGN_LEGS:-1 2 3} " == *" $number "* ]] || return 0
  echo "=== leg $number: $title ==="
  local rc=0
  LONGALIGN_COMFYUI="$env_root/$comfyui" LONGALIGN_FRONT_END="$env_root/$front_end" LONGALIGN_VUE_NODES="$vue" \
    LONGALIGN_LEG="$leg" "$env_root/venv/bin/python" -m pytest tests "$@" || rc=$?
  if [[ $rc -ne 0 && $rc -ne 5 && $status -eq 0 ]]; then status=$rc; fi
  echo "=== leg $number: exit status $rc ==="
}
run_leg 1 comfyui frontend-1.32.9 0 "" "ComfyUI 0.3.75, front end 1.32.9: every test" "$@"
run_leg 2 comfyui-0.30.0 frontend-1.58.1 0 server "ComfyUI 0.30.0, front end 1.58.1 (litegraph nodes): server and comfyui tests" "$@"
run_leg 3 comfyui-0.30.0 frontend-1.58.1 1 browser "ComfyUI 0.30.0, front end 1.58.1 (Vue nodes): browser tests" "$@"
exit "$status"
