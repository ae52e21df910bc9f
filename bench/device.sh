#!/usr/bin/env bash
# The GPU rows of issue 20 in one device call, in priority order, each suite in its own process under
# a time limit taken from what is left of BUDGET seconds (a suite cut short keeps the rows it printed
# in log.txt). Rows and logs go to $OUT (the device tool's folder; /tmp/bench-out elsewhere).
#
#   bash bench/device.sh [BUDGET] [SUITE:CAP ...]      (default: 480 s, the suites below)
#
# BENCH_ARGS is added to every bench command (BENCH_ARGS=--quick checks this script on a CPU).
#
# Costs seen on one H200 (2026-11-30, bench/RESULTS.md): the machine's start took about 390 s of a
# 900 s session; in the train suite's 260 s slot the imports, the reference measurement (3 steps of
# 7.3 s) and the fast mode's first step, which compiles its UNet calls, did not all finish (align's
# 130 s likewise). So a 15-minute session has room for the train suite alone: give it all that is
# left (bash bench/device.sh 480).
# The device machine has torch, transformers and accelerate but not diffusers, peft or open_clip:
# their wheels travel in .whl/ (pip download ... -d .whl, see the device README), and ComfyUI's T5
# tokenizer files (all the bench reads from ComfyUI in these suites) in .devrun/comfyui/.
set -u
budget=${1:-480}
shift || true
plan=("$@")
[ ${#plan[@]} -gt 0 ] || plan=(train:470 align:200 sdxl:200 mfu:150 train_low:200 sdxl_1024:150)
start=$(date +%s)
out=${OUT:-/tmp/bench-out}
mkdir -p "$out"
log="$out/log.txt"

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "[device] wheel install failed" | tee -a "$log"; exit 1; }
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 LONGALIGN_COMFYUI="$PWD/.devrun/comfyui"
export TORCH_LOGS=${TORCH_LOGS-recompiles,graph_breaks}  # why a compile takes long shows in log.txt
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv
  python3 -c "import torch, diffusers, peft, transformers, accelerate; print('torch', torch.__version__, 'diffusers', \
diffusers.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
} 2>&1 | tee "$out/gpu.txt"

for item in "${plan[@]}"; do
  suite=${item%%:*} cap=${item##*:}
  left=$((budget - ($(date +%s) - start) - 5))
  [ "$cap" -lt "$left" ] || cap=$left
  if [ "$cap" -lt 40 ]; then
    echo "[device] $suite: skipped (${left} s left)" | tee -a "$log"
    continue
  fi
  echo "[device] $suite: up to ${cap} s (at $(($(date +%s) - start)) s)" | tee -a "$log"
  first=$(($(wc -l <"$log") + 1))
  timeout -k 5 "$cap" python3 -m bench ${BENCH_ARGS:-} --only "$suite" --json "$out/$suite.json" >>"$log" 2>&1
  echo "[device] $suite: exit $? at $(($(date +%s) - start)) s" | tee -a "$log"
  tail -n "+$first" "$log" | grep -E "^\[bench\] [^.]*:|Error| (PASS|FAIL|report)( |$)" | tail -n 12
done
