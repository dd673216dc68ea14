"""Weights & Biases setup shared by all recipes: one run per training job, offline when there is no API key."""

from __future__ import annotations

import json
import netrc
import os
import platform
import re
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from recipes.common.errors import UserError
from recipes.common.outputs import FINISHED_MARKER

_PACKAGES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "wandb")


def package_versions(names: Sequence[str]) -> dict[str, str | None]:
    """Installed version of each package (None when it is not installed), for a record of what produced a result."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


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
        "packages": package_versions(_PACKAGES),
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
    run_id: str | None = None,
) -> Any:
    """Start the W&B run on the main process before the trainer does, so it carries our name, group, tags and config.
    With `run_id`, a relaunch continues that run (resume="allow") instead of starting a new one.

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
        id=run_id,
        resume="allow" if run_id else None,
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


# Lineage: what a run started from and what it produced, as W&B artifacts. An adapter or model is referenced by
# file:// URI (checksummed, not copied), so a 7B model costs no upload and offline runs work the same way.

_MODEL_FILES = (
    "adapter_model.safetensors",
    "adapter_config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.*",
    "merges.txt",
    "*.model",
)


def artifact_name(path: str | Path, kind: str) -> str:
    """`<last path parts>-<kind>` in the characters W&B allows (e.g. `sft-model`, `data-sft-dataset`)."""
    parts = Path(path).resolve().parts[-2 if kind == "dataset" else -1 :]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join([*parts, kind])).strip("-.")


def model_files(output_dir: str | Path) -> list[Path]:
    """The adapter (or full model) and tokenizer files a recipe saved at the top of its output dir."""
    root = Path(output_dir)
    files = {p for pattern in _MODEL_FILES for p in root.glob(pattern) if p.is_file()}
    return sorted(files)


def model_artifact(output_dir: str | Path) -> Any:
    """A "model" artifact referencing the output dir's model files, or None when it has none.

    The same files give the same digest, so a child run's draft of its parent's model matches the version the parent
    logged, and W&B links the two runs through it.
    """
    import wandb

    files = model_files(output_dir)
    if not files:
        return None
    artifact = wandb.Artifact(artifact_name(output_dir, "model"), type="model")
    for file in files:
        artifact.add_reference(file.resolve().as_uri(), name=file.name)
    return artifact


def _use_artifact(run: Any, artifact: Any) -> None:
    """Record `artifact` as an input of `run`, online or offline."""
    if not run.offline:
        run.use_artifact(artifact)
        return
    # wandb refuses use_artifact offline. For a draft artifact, use_artifact logs it as user-created with
    # "use after commit" (an input, not an output of this run); the record is the same, and `wandb sync` sends it.
    run._log_artifact(artifact, is_user_created=True, use_after_commit=True)


def _run_id(location: str | None) -> str | None:
    """The run id in a run URL (`.../runs/<id>`) or offline run dir (`offline-run-<date>_<time>-<id>`)."""
    if not location:
        return None
    match = re.search(r"/runs/([^/?#]+)", location) or re.search(r"run-\d{8}_\d{6}-([A-Za-z0-9]+)/?$", location)
    return match.group(1) if match else None


def check_parent_runs(parent_dirs: str | Sequence[str] | None) -> None:
    """Fail early (before training) when a parent run is not a finished recipe output dir."""
    for parent in [parent_dirs] if isinstance(parent_dirs, str) else list(parent_dirs or []):
        if not (Path(parent) / FINISHED_MARKER).is_file():
            raise UserError(
                f"parent_run {parent!r} is not a finished recipe output dir (no {FINISHED_MARKER} in it). Pass the "
                "output_dir of the run this one starts from (e.g. the SFT run), or leave parent_run unset."
            )


def log_lineage(
    run: Any,
    output_dir: str | Path,
    parent_dirs: str | Sequence[str] | None = None,
    datasets: Sequence[str | None] = (),
    eval_results: dict[str, Any] | str | Path | None = None,
) -> dict[str, Any]:
    """Record the run's lineage as W&B artifacts and in its config (`lineage`); returns that record ({} without W&B).

    Inputs (used): each parent run's model (`<dir>-model`, matched to the version the parent logged) and each local
    dataset file or dir (`dataset`; hub names are recorded by name only). Outputs (logged): the output dir's model
    files (`model`) and the eval results (`eval-results`: a dict of metrics or a JSON file). Call it on the main
    process after the model and tokenizer are saved and before `run.finish()`. Problems are warnings, not errors:
    training is over by then (use `check_parent_runs` up front).
    """
    if run is None or getattr(run, "disabled", False):
        return {}
    import wandb

    lineage: dict[str, Any] = {"parents": [], "datasets": [], "model_artifact": None, "eval_artifact": None}
    for parent in [parent_dirs] if isinstance(parent_dirs, str) else list(parent_dirs or []):
        path = Path(parent)
        info: dict[str, Any] = {"output_dir": str(path.resolve()) if path.exists() else str(parent)}
        marker = path / FINISHED_MARKER
        if marker.is_file():
            finished = json.loads(marker.read_text())
            info.update(stage=finished.get("stage"), wandb=finished.get("wandb"), run_id=_run_id(finished.get("wandb")))
        else:
            info["note"] = f"not a finished recipe output dir (no {FINISHED_MARKER})"
        artifact = model_artifact(path) if path.is_dir() else None
        if artifact is not None:
            _use_artifact(run, artifact)
            info["artifact"] = artifact.name
        else:
            info.setdefault("note", "no model files found: recorded by path only")
        if "note" in info:
            print(f"[recipes] lineage: parent {parent}: {info['note']}", flush=True)
        lineage["parents"].append(info)

    for dataset in dict.fromkeys(d for d in datasets if d):  # each once, in order
        path = Path(dataset)
        if not path.exists():
            lineage["datasets"].append({"name": dataset})  # a hub dataset: nothing local to reference
            continue
        artifact = wandb.Artifact(artifact_name(path, "dataset"), type="dataset")
        if path.is_dir():
            artifact.add_reference(path.resolve().as_uri())
        else:
            artifact.add_reference(path.resolve().as_uri(), name=path.name)
        _use_artifact(run, artifact)
        lineage["datasets"].append({"path": str(path.resolve()), "artifact": artifact.name})

    artifact = model_artifact(output_dir)
    if artifact is not None:
        run.log_artifact(artifact)
        lineage["model_artifact"] = artifact.name
    else:
        print(f"[recipes] lineage: no model files in {output_dir}; no model artifact logged", flush=True)

    if eval_results:
        artifact = wandb.Artifact(artifact_name(output_dir, "eval-results"), type="eval-results")
        if isinstance(eval_results, dict):
            with artifact.new_file("eval_results.json") as handle:
                json.dump(eval_results, handle, indent=2, default=str)
        else:
            artifact.add_file(str(eval_results))
        run.log_artifact(artifact)
        lineage["eval_artifact"] = artifact.name

    run.config.update({"lineage": lineage}, allow_val_change=True)
    return lineage
