#!/usr/bin/env bash
# The README's main command: set up the venv, build the embedded demo (tiny Llama + data), run the pipeline on it
# on CPU, and print where the models and the W&B runs are. Re-running skips finished stages.
# W&B logs offline (./wandb) unless you have an API key. Logs of each stage: outputs/logs/<stage>.log
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
DEMO="${DEMO_DIR:-outputs/demo}"
LOGS="$(dirname "$DEMO")/logs"  # outside $DEMO: prepare_demo.py only writes into a new or finished dir
mkdir -p "$LOGS"
t0=$(date +%s)

run_stage() {  # run_stage NAME OUTPUT_DIR COMMAND...: one progress line per stage, full log in a file
  local name=$1 out=$2; shift 2
  if [ -f "$out/run_complete.json" ]; then
    echo "[demo] $name: already done ($out)"
    return
  fi
  local start log="$LOGS/$name.log"
  start=$(date +%s)
  echo "[demo] $name: running (log: $log)"
  if ! "$@" >"$log" 2>&1; then
    echo "[demo] $name FAILED after $(( $(date +%s) - start ))s; last lines of $log:" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
  echo "[demo] $name: done in $(( $(date +%s) - start ))s -> $out"
}

run_stage prepare "$DEMO" python scripts/prepare_demo.py --output_dir "$DEMO"
run_stage sft "$DEMO/sft" accelerate launch recipes/sft/train.py --config recipes/sft/config.yaml

echo "[demo] finished in $(( $(date +%s) - t0 ))s"
python - "$DEMO" <<'PY'
import json, sys
from pathlib import Path

demo = Path(sys.argv[1])
for marker in sorted(demo.glob("*/run_complete.json")):
    info = json.loads(marker.read_text())
    print(f"[demo] {info.get('stage', marker.parent.name):>10}: model {marker.parent}  |  W&B run {info.get('wandb')}")
    for key, value in sorted(info.get("metrics", {}).items()):
        if key.startswith("eval/") and isinstance(value, (int, float)):
            print(f"{'':14}{key} = {value:.4g}")
PY
