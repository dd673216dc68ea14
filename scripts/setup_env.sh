# Sourced by demo.sh and test.sh: create (or reuse) .venv and install the project into it.
# torch is installed first and pinned (2.13.0, CPU build where one is available locally): an unpinned torch would
# pull a multi-GB CUDA build. Set RECIPES_VENV to use another location, RECIPES_SKIP_INSTALL=1 to skip installs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RECIPES_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
if [ "${RECIPES_SKIP_INSTALL:-0}" != "1" ]; then
  stamp="$VENV/.recipes-installed"
  want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing dependencies into $VENV (first run takes a few minutes)"
    python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
    if ! python -c "import torch" 2>/dev/null; then
      python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
    fi
    python -m pip install -q -e "$ROOT[dev]" 2>&1 | grep -v "^WARNING: Location" || true
    python -c "import torch, trl, peft, bitsandbytes, recipes, eval" # fail here, not mid-run, if an install broke
    echo "$want" > "$stamp"
  fi
fi
cd "$ROOT"
export TOKENIZERS_PARALLELISM=false
