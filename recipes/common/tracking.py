"""Weights & Biases setup shared by all recipes: one run per training job, offline when there is no API key."""

from __future__ import annotations

import netrc
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

_PACKAGES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "wandb")


def wants_wandb(report_to: str | list[str] | None) -> bool:
    if report_to is None:
        return False
    targets = [report_to] if isinstance(report_to, str) else list(report_to)
    return "wandb" in targets or "all" in targets


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode() -> str:
    """Respect WANDB_MODE; otherwise online with an API key, offline (said once) without one."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    if _has_api_key():
        return "online"
    os.environ["WANDB_MODE"] = "offline"
    print(
        "[recipes] W&B: no API key found (WANDB_API_KEY or `wandb login`), logging offline to ./wandb; "
        "upload later with `wandb sync <run dir>`.",
        flush=True,
    )
    return "offline"


def provenance() -> dict[str, Any]:
    """What a comparison needs to trust a run: code version, packages, hardware."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
            return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    hardware = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }
    commit = git("rev-parse", "HEAD")
    return {
        "git_commit": commit or None,
        "git_dirty": bool(git("status", "--porcelain")) if commit else None,
        "packages": versions,
        "hardware": hardware,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def init_wandb(
    report_to: str | list[str] | None,
    project: str,
    run_name: str,
    stage: str,
    method: str,
    seed: int,
    config: dict[str, Any],
    group: str | None = None,
    entity: str | None = None,
    extra_tags: list[str] | None = None,
    job_dir: str | None = None,
) -> Any:
    """Start the W&B run on the main process before the trainer does, so it carries our name, group, tags and config.

    transformers' WandbCallback reuses an active run. Returns the run, or None when W&B is off or on other ranks.
    """
    if not wants_wandb(report_to) or int(os.environ.get("RANK", "0")) != 0:
        return None
    import wandb

    mode = resolve_wandb_mode()
    tags = [f"stage:{stage}", f"method:{method}", f"seed:{seed}", *(extra_tags or [])]
    run = wandb.init(
        project=project,
        entity=entity,
        group=group,
        name=run_name,
        job_type=stage,
        tags=tags,
        config={**config, "provenance": provenance(), "stage": stage, "method": method, "seed": seed},
        dir=job_dir or os.environ.get("WANDB_DIR"),
        mode=mode,
    )
    return run


def run_location(run: Any) -> str | None:
    """Where a user finds the run: its URL online, its directory offline."""
    if run is None:
        return None
    url = getattr(run, "url", None)
    if url and os.environ.get("WANDB_MODE") not in ("offline", "dryrun"):
        return url
    return str(Path(run.dir).parent)
