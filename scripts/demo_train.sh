#!/usr/bin/env bash
# The trainer's demo on the built-in tiny preset (CPU, a few minutes): a toy dataset of coloured
# shapes with multi-sentence captions, 30 `align` steps, then 10 `reward` steps from the merged result.
#   bash scripts/demo_train.sh [output folder]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$HOME/.cache/comfyui-longalign/demo-train}"
env_root="$(bash "$here/tests/comfy_env.sh" | tail -n 1)"
py="$env_root/venv/bin/python"
cd "$here"
"$py" -c "import sys; sys.path.insert(0, 'tests'); from trainer_helpers import make_image_folder, make_prompt_file; \
make_image_folder('$out/data'); make_prompt_file('$out/prompts.txt')"
"$py" -m training.align --tiny --data.path "$out/data" --data.batch_size 4 --run.grad_accum 1 \
  --run.max_steps 30 --optim.warmup_steps 0 --optim.lr 1e-3 --lora.rank 4 --lora.alpha 4 \
  --run.validate_every 15 --run.output_dir "$out/align"
"$py" -m training.reward --tiny --data.path "$out/prompts.txt" --data.batch_size 2 --run.max_steps 10 \
  --sampling.steps 10 --sampling.grad_steps 2 --optim.warmup_steps 0 --optim.lr 1e-3 --lora.rank 4 \
  --lora.alpha 4 --model.init_lora "$out/align/lora_weights.safetensors" --run.output_dir "$out/reward"
echo "align LoRA:  $out/align/lora_weights.safetensors (validation images in $out/align/samples)"
echo "reward LoRA: $out/reward/lora_weights.safetensors; TensorBoard: tensorboard --logdir $out"
