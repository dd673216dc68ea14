#!/usr/bin/env bash
# The README's main command: set up the venv, build the embedded demo (tiny Llama + data), run the pipeline on it
# on CPU, and print where the models and the W&B runs are. Re-running skips finished stages.
# W&B logs offline (./wandb) unless you have an API key. Logs of each stage: outputs/logs/<stage>.log
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
DEMO=outputs/demo  # the recipes' config.yaml files and scripts/studies/demo.yaml point here
DEMO_SEED="${DEMO_SEED:-0}"  # seed of the demo data and of the base model's pretraining (prepare_demo.py --seed)
# Training seeds of the study's runs: three, so every interval holds run-to-run variance as well as question
# sampling (README, "What bash scripts/demo.sh runs"); STUDY_SEEDS=0 is a quicker look (about 3 minutes less).
STUDY_SEEDS="${STUDY_SEEDS:-0 1 2}"
LOGS="$(dirname "$DEMO")/logs"  # outside $DEMO: prepare_demo.py only writes into a new or finished dir
mkdir -p "$LOGS"
t0=$(date +%s)

run_stage() {  # run_stage NAME DONE_FILE COMMAND...: one progress line per stage, full log in a file
  local name=$1 done_file=$2; shift 2
  if [ -f "$done_file" ]; then
    echo "[demo] $name: already done ($(dirname "$done_file"))"
    return
  fi
  local start log="$LOGS/$name.log"
  start=$(date +%s)
  echo "[demo] $name: running (log: $log)"
  if ! "$@" >"$log" 2>&1; then
    echo "[demo] $name FAILED after $(( $(date +%s) - start ))s; last lines of $log:" >&2
    tail -n 40 "$log" >&2
    return 1
  fi
  echo "[demo] $name: done in $(( $(date +%s) - start ))s -> $(dirname "$done_file")"
}

# A 1M-parameter model gains little from a second thread: stages after SFT run two at a time, one thread each.
THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))}"

# prepare_demo.py is idempotent (a built demo is checked and kept in a second), so it always runs.
run_stage prepare "$DEMO/.always-run" python scripts/prepare_demo.py --output_dir "$DEMO" --seed "$DEMO_SEED"
run_stage sft "$DEMO/sft/run_complete.json" accelerate launch --num_cpu_threads_per_process "$(nproc)" \
  recipes/sft/train.py --config recipes/sft/config.yaml --output_dir "$DEMO/sft"

# Helpfulness and safety reward models, side by side.
pids=()
for kind in helpfulness safety; do
  config=recipes/reward/config.yaml out="$DEMO/reward"
  if [ "$kind" = safety ]; then config=recipes/reward/safety.yaml out="$DEMO/reward-safety"; fi
  run_stage "reward-$kind" "$out/run_complete.json" accelerate launch --num_cpu_threads_per_process "$THREADS" \
    recipes/reward/train.py --config "$config" --output_dir "$out" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || { echo "[demo] a reward model failed (see above)" >&2; exit 1; }; done

# DPO, PPO, GRPO and rejection sampling from the same SFT model, each evaluated the same way, and the report.
# Always run: finished runs and evaluations are reused, so a rerun (or one with more STUDY_SEEDS) trains only what is
# missing and rewrites the report.
OMP_NUM_THREADS="$THREADS" run_stage study "$DEMO/study/.always-run" \
  python scripts/study_ppo_vs_dpo.py --study scripts/studies/demo.yaml --seeds $STUDY_SEEDS --jobs 2 --output_dir "$DEMO/study"

echo "[demo] finished in $(( $(date +%s) - t0 ))s"
python - "$DEMO" <<'PY'
import json, sys
from pathlib import Path

demo = Path(sys.argv[1])
for marker in sorted(demo.glob("*/run_complete.json")) + sorted(demo.glob("study/*/run_complete.json")):
    info = json.loads(marker.read_text())
    print(f"[demo] {marker.parent.name:>28}: {marker.parent}  |  W&B run {info.get('wandb')}")
report = demo / "study" / "report.md"
print(f"\n[demo] report: {report} (curves: {report.parent / 'comparison'})\n")
print(report.read_text())
PY
