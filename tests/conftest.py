"""Shared fixtures: the embedded demo (tiny base model + data), built once per machine and reused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
# Built with the same command a user runs; prepare_demo.py is idempotent, so later sessions reuse it.
DEMO_CACHE = Path(os.environ.get("RECIPES_TEST_DEMO_DIR", REPO_ROOT / "outputs" / "test-cache" / "demo"))


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    """The embedded demo built by `scripts/prepare_demo.py` (default settings)."""
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "prepare_demo.py"), "--output_dir", str(DEMO_CACHE)]
    subprocess.run(cmd, check=True, cwd=REPO_ROOT)
    return DEMO_CACHE


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
    return tmp_path
