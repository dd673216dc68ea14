#!/usr/bin/env bash
# The learning-rate sweep behind the demo study's fair PPO-vs-DPO row (scripts/studies/demo.yaml): DPO on the math
# pairs and PPO on the reward model learned from them, each over the same kind of grid, training seed 0, graded on
# the 172 demo test problems the study does NOT evaluate (its 128 are picked by eval data_seed 0), so the choice is
# made on held-out problems and the study's test items stay untouched. Needs the demo and the study's prepare steps
# (bash scripts/demo.sh). Prints one line per run; finished runs are reused.
# Run:  bash scripts/studies/demo_lr_sweep.sh [OUT]   (default outputs/demo/lr_sweep; ~5 min on 2 cores)
set -euo pipefail
source "$(dirname "$0")/../setup_env.sh"
export WANDB_MODE="${WANDB_MODE:-offline}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
OUT="${1:-outputs/demo/lr_sweep}"
STUDY=outputs/demo/study
for needed in outputs/demo/sft/run_complete.json "$STUDY/math_pairs/pairs.json" "$STUDY/math_reward/run_complete.json"; do
  [ -f "$needed" ] || { echo "missing $needed: run bash scripts/demo.sh first" >&2; exit 1; }
done
mkdir -p "$OUT"

# The dev problems: the demo's math test split minus the study's evaluated subset (eval.data.seeded_subset, seed 0).
python - "$OUT/dev.jsonl" <<'PY'
import json, sys
from eval.data import seeded_subset
items = [json.loads(line) for line in open("outputs/demo/data/math/test.jsonl")]
evaluated = set(seeded_subset(range(len(items)), 128, 0))
with open(sys.argv[1], "w") as out:
    for i, item in enumerate(items):
        if i not in evaluated:
            out.write(json.dumps(item) + "\n")
PY

dev_accuracy() {  # dev_accuracy MODEL_DIR: GSM8K accuracy on the dev problems, as the study evaluates (0-shot chat)
  local json="$OUT/$(basename "$1").dev.json"
  [ -f "$json" ] || python -m eval --model "$1" --tasks gsm8k --gsm8k "$OUT/dev.jsonl" --gsm8k_chat true \
    --load_in_4bit --output "$json" --no_progress >"${json%.json}.log" 2>&1
  python -c "import json, sys; print(f\"{json.load(open(sys.argv[1]))['results']['gsm8k']['accuracy']:.3f}\")" "$json"
}

sweep() {  # sweep METHOD LR: the study's launch of METHOD (scripts/studies/demo.yaml) at learning rate LR
  local method=$1 lr=$2 run="$OUT/$1-lr$2"
  if [ ! -f "$run/run_complete.json" ] && ! train_one "$method" "$lr" "$run"; then
    echo "$method lr $lr FAILED; last lines of $run.log:" >&2
    tail -n 20 "$run.log" >&2
    return 1
  fi
  echo "$method lr $lr: dev GSM8K $(dev_accuracy "$run")"
}

train_one() {  # train_one METHOD LR RUN_DIR
  local method=$1 lr=$2 run=$3
  if [ "$method" = dpo ]; then
    accelerate launch recipes/dpo/train.py --config recipes/dpo/config.yaml --max_steps 32 \
      --dataset_name "$STUDY/math_pairs" --model_name_or_path outputs/demo/sft --output_dir "$run" --seed 0 \
      --eval_tasks gsm8k --eval_num_samples 32 --learning_rate "$lr" --run_name "lr-sweep-dpo-$lr" >"$run.log" 2>&1
  else
    accelerate launch recipes/ppo/train.py --config recipes/ppo/config.yaml --total_episodes 256 \
      --reward_source reward_model --reward_model_path "$STUDY/math_reward" --dataset_name outputs/demo/data/math \
      --model_name_or_path outputs/demo/sft --output_dir "$run" --seed 0 --eval_tasks gsm8k --eval_num_samples 32 --eval_steps 2 \
      --learning_rate "$lr" --run_name "lr-sweep-ppo-$lr" >"$run.log" 2>&1
  fi
}

echo "sft: dev GSM8K $(dev_accuracy outputs/demo/sft)"
(for lr in 5e-5 1e-4 2e-4 3e-4 5e-4; do sweep dpo $lr; done) &
dpo_lane=$!
(for lr in 2e-4 5e-4 1e-3 2e-3; do sweep ppo $lr; done) &
ppo_lane=$!
status=0
wait "$dpo_lane" || status=1
wait "$ppo_lane" || status=1
exit "$status"  # a bare `wait` would exit 0 whatever the lanes did
