#!/usr/bin/env bash
# The README's test command: set up the venv, lint, parse every shipped YAML, run the test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh tests/unit -x`).
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
# No W&B server in tests: runs are written offline, under each test's tmp dir.
export WANDB_MODE=offline WANDB_SILENT=true HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

echo "[test] ruff"
ruff check .
ruff format --check .

echo "[test] pytest"
set +e
python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "[test] pytest collected no tests: treating that as a failure (a suite that tests nothing is broken)" >&2
  exit 1
fi
exit "$rc"
