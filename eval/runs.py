"""Read W&B runs (offline run directories or an online project) and compare them: a markdown table of final metrics
with deltas to a baseline, PNG curves, and a list of what is missing.

Plain functions, used by `scripts/compare_runs.py` and importable by study scripts:

    runs = load_local_runs(["outputs/sft", "outputs/dpo"])        # or load_online_runs("entity/project", group=...)
    comparison = compare_runs(runs, "outputs/comparison", baseline="sft")
    print(comparison.table)

Offline runs are read with wandb's own reader of the `.wandb` record log (`wandb leet inspect --json`, run in a
subprocess, one JSON object per record), so nothing here parses W&B's binary format.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipes.common.errors import UserError
from recipes.common.outputs import FINISHED_MARKER

# Columns in this order when present; within a pattern, keys sort by name. A key belongs to its first match.
# Several spellings per quantity because recipes log them differently (trainer keys get `train/`, TRL's PPO logs
# `objective/...`, GRPO `reward`/`kl`, DPO `rewards/...`).
HEADLINE_PATTERNS = {
    "gsm8k": ["eval/gsm8k/accuracy", "eval/gsm8k/exact_match*", "eval/gsm8k/*"],
    "mmlu": ["eval/mmlu/accuracy", "eval/mmlu/*"],
    "length": ["eval/length/mean_tokens", "eval/length/*", "train/completions/mean_length"],
    "diversity": ["eval/diversity/*"],
    "reward": [
        "eval/reward/mean",
        "eval/reward/*/mean",
        "eval/reward/std",
        "eval/reward/*/std",
        "train/objective/rlhf_reward",
        "train/objective/scores",
        "train/reward",
        "train/rewards/margins",
        "train/rewards/chosen",
        "eval/rewards/margins",
    ],
    "kl": ["eval/reward/kl", "eval/reward/kl_std", "eval/kl/*", "train/objective/kl", "train/kl"],
}
# Bookkeeping and per-item breakdowns stay out of the default table (pass `metrics` patterns to get them).
EXCLUDED_PATTERNS = [
    "*/global_step",
    "*/epoch",
    "*runtime*",
    "*_per_second",
    "*/total_flos",
    "*/learning_rate",
    "*/grad_norm",
    "eval/*/n",
    "eval/*/n_*",
    "eval/*/num_*",
    "*/num_tokens",
    "eval/*/samples_per_prompt",
    "eval/suite/*",
    "eval/mmlu/subjects*",
]
STEP_KEYS = ("train/global_step", "_step")
MAX_CURVES = 12


class CompareError(UserError):
    """Input that cannot be compared; the message says what and how to fix it."""


@dataclass
class RunData:
    """One run, whatever it was read from. `summary` holds final scalar values, `history` the logged rows."""

    name: str
    run_id: str
    source: str
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    job_type: str | None = None
    state: str = "unknown"
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    label: str = ""

    def __post_init__(self) -> None:
        self.label = self.label or self.name or self.run_id

    def final(self, key: str) -> float | None:
        """The run's final value of `key`: its summary, else the last logged value."""
        if key in self.summary:
            return self.summary[key]
        for row in reversed(self.history):
            if key in row:
                return row[key]
        return None

    def metric_keys(self) -> set[str]:
        keys = set(self.summary)
        for row in self.history:
            keys.update(row)
        return {k for k in keys if not k.startswith("_")}


@dataclass
class Comparison:
    """What `compare_runs` produced: the markdown table, the report, the plots and what was missing."""

    table: str
    report_path: Path
    plots: list[Path]
    metrics: list[str]
    baseline: str
    missing: list[str]


# ----------------------------------------------------------------------------------------------------------------
# Values


def _number(value: Any) -> float | None:
    """A finite or non-finite float from a logged value; None for strings, media, lists and booleans."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value in ("NaN", "Infinity", "-Infinity"):  # how W&B's JSON spells non-finite
        return float(value.replace("Infinity", "inf"))
    return None


def _scalars(item: dict[str, Any]) -> dict[str, float]:
    """Numeric values of a flat W&B item (nested dicts arrive as `a.b` keys). Media objects (`key._type`) are
    dropped with all their fields, so a logged table's `nrows` never looks like a metric."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            if "_type" in value:
                return
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = value

    walk("", item)
    media = {k.removesuffix("._type") for k in flat if k.endswith("._type")}
    out = {}
    for key, value in flat.items():
        if any(key == m or key.startswith(m + ".") for m in media):
            continue
        number = _number(value)
        if number is not None:
            out[key] = number
    return out


def _lookup(config: dict[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def parse_filters(items: Sequence[str]) -> dict[str, Any]:
    """`key=value` strings as a dict; values read as JSON when they parse (numbers, true/false), else strings."""
    filters: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise CompareError(f"--filter {item!r} must be KEY=VALUE (e.g. seed=42 or provenance.git_dirty=false).")
        try:
            filters[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            filters[key.strip()] = text
    return filters


# ----------------------------------------------------------------------------------------------------------------
# Offline runs: `.wandb` record logs read by wandb's own reader


def _wandb_file(run_dir: Path) -> Path | None:
    files = sorted(run_dir.glob("run-*.wandb"), key=lambda p: p.stat().st_mtime)
    return files[-1] if files else None


def _read_records(wandb_file: Path, timeout: float = 120) -> list[dict[str, Any]]:
    """All records of a `.wandb` log as dicts, via `wandb leet inspect --json` (wandb-core's reader)."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_ERROR_REPORTING": "false", "WANDB_SILENT": "true"}
    cmd = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(wandb_file)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as err:
        raise CompareError(f"reading {wandb_file} with `wandb leet inspect` took more than {timeout:.0f} s") from err
    if out.returncode != 0:
        raise CompareError(
            f"wandb could not read {wandb_file} (`wandb leet inspect` exit {out.returncode}): "
            f"{(out.stderr or out.stdout).strip()[-500:]}. The file may be truncated or from an incompatible wandb."
        )
    records = []
    for line in out.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            records.append(json.loads(line))
    return records


def read_offline_run(run_dir: str | Path, timeout: float = 120) -> RunData:
    """Read an offline (or not yet synced) W&B run directory, or its `run-*.wandb` file."""
    path = Path(run_dir)
    wandb_file = path if path.is_file() else _wandb_file(path)
    if wandb_file is None or wandb_file.suffix != ".wandb":
        raise CompareError(f"{run_dir} is not a W&B run: no run-*.wandb file in it.")
    records = _read_records(wandb_file, timeout)
    if not records:
        raise CompareError(f"{wandb_file} holds no W&B records (empty or not a .wandb log).")

    run = RunData(name="", run_id="", source=str(wandb_file.parent))
    summary: dict[str, Any] = {}
    exit_code = None
    for record in records:
        kind = record.get("type")
        body = record.get(kind) or {}
        if kind == "run":
            run.name = body.get("display_name") or run.name
            run.run_id = body.get("run_id") or run.run_id
            run.group = body.get("run_group") or None
            run.tags = list(body.get("tags") or [])
            run.job_type = body.get("job_type") or None
            run.config.update((body.get("config") or {}).get("update") or {})
        elif kind == "config":
            run.config.update(body.get("update") or {})
            for key in body.get("remove") or []:
                run.config.pop(key, None)
        elif kind == "history":
            row = _scalars(body.get("item") or {})
            if "_step" not in row and "step" in body:
                row["_step"] = float((body["step"] or {}).get("num", 0))
            run.history.append(row)
        elif kind == "summary":
            summary.update(body.get("update") or {})
            for key in body.get("remove") or []:
                summary.pop(key, None)
        elif kind == "artifact":
            used = bool(body.get("use_after_commit"))
            run.artifacts.append(
                {
                    "name": body.get("name"),
                    "type": body.get("type"),
                    "digest": body.get("digest"),
                    "role": "used" if used else "logged",
                    "files": [c.get("path") for c in (body.get("manifest") or {}).get("contents") or []],
                    "refs": [c.get("ref") for c in (body.get("manifest") or {}).get("contents") or [] if c.get("ref")],
                }
            )
        elif kind == "use_artifact":
            run.artifacts.append({"name": body.get("name"), "type": body.get("type"), "role": "used"})
        elif kind == "exit":
            exit_code = body.get("exit_code", 0)
    run.config.pop("_wandb", None)
    run.summary = {k: v for k, v in _scalars(summary).items() if not k.startswith("_")}
    run.run_id = run.run_id or wandb_file.stem.removeprefix("run-")
    run.name = run.name or run.run_id
    run.label = run.name
    if exit_code is None:
        run.state = "running"
        run.notes.append("no exit record (still running, or killed): values are the last ones logged")
    else:
        run.state = "finished" if exit_code == 0 else "crashed"
        if exit_code != 0:
            run.notes.append(f"exited with code {exit_code}")
    return run


def _from_recipe_output(output_dir: Path) -> list[RunData | Path]:
    """A recipe output dir: its W&B run dir (from run_complete.json), or its final metrics when it had no W&B run."""
    marker = json.loads((output_dir / FINISHED_MARKER).read_text())
    location = marker.get("wandb")
    if location and not str(location).startswith(("http://", "https://")):
        for candidate in (Path(location), output_dir / location):
            if candidate.is_dir() and _wandb_file(candidate):
                return [candidate]
    metrics = _scalars(marker.get("metrics") or {})
    name = output_dir.name
    if location and str(location).startswith(("http://", "https://")):
        note = f"online run {location}: final metrics from run_complete.json only (pass --project to read curves)"
    elif location:
        note = f"W&B run dir {location} not found: final metrics from run_complete.json only, no curves"
    else:
        note = "trained without W&B: final metrics from run_complete.json only, no curves"
    run = RunData(
        name=name,
        run_id=name,
        source=str(output_dir),
        summary=metrics,
        config={"stage": marker.get("stage"), "lineage": marker.get("lineage")},
        state="finished",
        notes=[note],
    )
    return [run]


def find_local_runs(paths: Sequence[str | Path]) -> list[RunData | Path]:
    """Resolve each input to run dirs: a run dir or `.wandb` file, a `wandb/` folder (or a dir holding one) to
    scan, or a recipe output dir with run_complete.json. Returns run dirs (Path) or already-read runs (RunData)."""
    found: list[RunData | Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise CompareError(f"{raw} does not exist.")
        if path.is_file():
            if path.suffix != ".wandb":
                raise CompareError(f"{raw} is a file but not a W&B run log (run-*.wandb).")
            found.append(path.parent)
        elif _wandb_file(path):
            found.append(path)
        elif (path / FINISHED_MARKER).is_file():
            found.extend(_from_recipe_output(path))
        else:
            scan_root = path / "wandb" if (path / "wandb").is_dir() else path
            run_dirs = sorted(
                d for d in scan_root.glob("*run-*") if d.is_dir() and not d.is_symlink() and _wandb_file(d)
            )
            if not run_dirs:
                raise CompareError(
                    f"{raw} is not a W&B run: expected a run directory holding run-*.wandb (e.g. "
                    "wandb/offline-run-*), a wandb/ folder of runs, a .wandb file, or a recipe output dir with "
                    f"{FINISHED_MARKER}."
                )
            found.extend(run_dirs)
    return found


def load_local_runs(paths: Sequence[str | Path], timeout: float = 120) -> list[RunData]:
    """Read every local run the inputs name (see `find_local_runs`), each once."""
    runs: list[RunData] = []
    seen: set[Path] = set()
    for item in find_local_runs(paths):
        if isinstance(item, RunData):
            runs.append(item)
        elif item.resolve() not in seen:
            seen.add(item.resolve())
            runs.append(read_offline_run(item, timeout))
    return runs


# ----------------------------------------------------------------------------------------------------------------
# Online runs: wandb.Api() (needs an API key and network; untested on machines without either)


def online_filters(
    group: str | None = None, tags: Sequence[str] | None = None, filters: dict[str, Any] | None = None
) -> dict[str, Any]:
    """W&B's MongoDB-style run filter: the group, all the tags, and `config.<key>` equal to each value."""
    clauses: list[dict[str, Any]] = []
    if group:
        clauses.append({"group": group})
    clauses.extend({"tags": {"$in": [tag]}} for tag in tags or [])
    for key, value in (filters or {}).items():
        top = key.split(".")[0]
        server_key = key if top in ("config", "summary_metrics", "state", "displayName", "jobType") else f"config.{key}"
        clauses.append({server_key: value})
    if not clauses:
        return {}
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


def load_online_runs(
    project: str,
    group: str | None = None,
    tags: Sequence[str] | None = None,
    filters: dict[str, Any] | None = None,
    base_url: str | None = None,
    timeout: float = 20,
    max_runs: int = 50,
    history_samples: int = 1000,
) -> list[RunData]:
    """Runs of `entity/project` matching the filters, read with `wandb.Api()`. Errors say what to check."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        raise CompareError(
            f"WANDB_MODE={os.environ['WANDB_MODE']}: not reading the online project {project!r}. Unset WANDB_MODE "
            "(or set WANDB_MODE=online) to read it, or pass local run directories instead."
        )
    if project.count("/") != 1 or not all(project.split("/")):
        raise CompareError(f"--project {project!r} must be ENTITY/PROJECT (e.g. my-team/post-training-recipes).")
    import wandb

    overrides = {"base_url": base_url} if base_url else {}
    where = base_url or "the W&B server"
    hint = "Check the network, `wandb login` (or WANDB_API_KEY) and --base_url; local run dirs need none of them."
    try:
        api = wandb.Api(timeout=int(timeout), overrides=overrides)
        found = list(api.runs(project, filters=online_filters(group, tags, filters), per_page=max_runs)[:max_runs])
    except wandb.errors.UsageError as err:
        raise CompareError(f"cannot read {project!r} from {where}: {err} {hint}") from err
    except (wandb.errors.CommError, ValueError) as err:
        message = str(err)
        if "not found" in message.lower() or "could not find" in message.lower():
            raise CompareError(f"W&B project {project!r} does not exist or is not visible to you: {message}") from err
        raise CompareError(f"cannot read {project!r} from {where}: {message} {hint}") from err
    except Exception as err:  # network stacks raise many types (requests, urllib3, timeouts)
        raise CompareError(f"cannot read {project!r} from {where}: {type(err).__name__}: {err}. {hint}") from err
    if not found:
        raise CompareError(
            f"no runs in {project!r} match group={group!r} tags={list(tags or [])} filters={filters or {}}."
        )
    runs = []
    for api_run in found:
        run = RunData(
            name=api_run.name,
            run_id=api_run.id,
            source=api_run.url,
            config={k: v for k, v in dict(api_run.config).items() if not k.startswith("_")},
            summary={k: v for k, v in _scalars(dict(api_run.summary_metrics)).items() if not k.startswith("_")},
            group=getattr(api_run, "group", None),
            tags=list(getattr(api_run, "tags", None) or []),
            job_type=getattr(api_run, "job_type", None),
            state=api_run.state,
        )
        try:
            run.history = [_scalars(row) for row in api_run.history(samples=history_samples, pandas=False)]
        except Exception as err:  # a run whose history cannot be read still has final metrics
            run.notes.append(f"history not read ({type(err).__name__}: {err}): no curves")
        runs.append(run)
    return runs


# ----------------------------------------------------------------------------------------------------------------
# Selecting runs and metrics


def filter_runs(
    runs: Sequence[RunData],
    group: str | None = None,
    tags: Sequence[str] | None = None,
    filters: dict[str, Any] | None = None,
) -> list[RunData]:
    """The runs in `group`, carrying every tag, whose config matches each `key=value` (dotted keys for nesting)."""
    kept = []
    for run in runs:
        if group and run.group != group:
            continue
        if tags and not set(tags) <= set(run.tags):
            continue
        if filters and any(_lookup(run.config, k.removeprefix("config.")) != v for k, v in filters.items()):
            continue
        kept.append(run)
    return kept


def label_runs(runs: Sequence[RunData]) -> None:
    """Unique labels: the run name, with the run id added where two runs share a name."""
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.name] = counts.get(run.name, 0) + 1
    for run in runs:
        run.label = run.name if counts[run.name] == 1 else f"{run.name} ({run.run_id})"


def pick_baseline(runs: Sequence[RunData], name_or_id: str | None) -> RunData:
    """The run whose label, name or id is `name_or_id`; the first run by default."""
    if not runs:
        raise CompareError("no runs to compare.")
    if not name_or_id:
        return runs[0]
    matches = [r for r in runs if name_or_id in (r.label, r.name, r.run_id)]
    if len(matches) == 1:
        return matches[0]
    names = ", ".join(f"{r.label} [{r.run_id}]" for r in runs)
    if not matches:
        raise CompareError(f"--baseline {name_or_id!r} matches no run; the runs are: {names}.")
    raise CompareError(f"--baseline {name_or_id!r} matches {len(matches)} runs; use a run id. The runs are: {names}.")


def _order(keys: Iterable[str]) -> list[str]:
    patterns = [p for group in HEADLINE_PATTERNS.values() for p in group]

    def rank(key: str) -> tuple[int, int, str]:
        for i, pattern in enumerate(patterns):
            if fnmatch.fnmatchcase(key, pattern):
                return (0, i, key)
        return (1 if key.startswith("eval/") else 2, 0, key)

    return sorted(keys, key=rank)


def select_metrics(
    runs: Sequence[RunData], patterns: Sequence[str] | None = None
) -> tuple[list[str], dict[str, list[str]]]:
    """Metrics to compare, in the preferred order, and {metric: [labels of runs lacking it]} (also for the metrics
    left out because only one run has them).

    Default: the `eval/...` and `train/...` metrics at least two runs have (all of one run's, when alone), minus
    bookkeeping. `patterns` (globs such as `eval/*`) choose instead. Raises when the runs share no metric.
    """
    present: dict[str, list[str]] = {}
    for run in runs:
        for key in run.metric_keys():
            if run.final(key) is not None:
                present.setdefault(key, []).append(run.label)
    if patterns:
        keys = [k for k in present if any(fnmatch.fnmatchcase(k, p) for p in patterns)]
    else:
        keys = [
            k
            for k in present
            if k.startswith(("eval/", "train/")) and not any(fnmatch.fnmatchcase(k, p) for p in EXCLUDED_PATTERNS)
        ]
    needed = min(2, len(runs))
    shared = [k for k in keys if len(present[k]) >= needed]
    if not shared:
        per_run = "; ".join(f"{r.label}: {', '.join(sorted(r.metric_keys())[:8]) or 'no metrics'}" for r in runs)
        wanted = f" matching {list(patterns)}" if patterns else " under eval/ or train/"
        raise CompareError(f"the runs have no common metric{wanted}. Metrics per run: {per_run}.")
    missing = {k: [r.label for r in runs if r.label not in present[k]] for k in _order(keys)}
    return _order(shared), {k: v for k, v in missing.items() if v}


def find_metric(runs: Sequence[RunData], quantity: str, with_history: bool = True) -> str | None:
    """The key for a quantity of HEADLINE_PATTERNS ("reward", "kl", "length", ...) that most runs log."""
    best, best_count = None, 0
    for pattern in HEADLINE_PATTERNS[quantity]:
        candidates: dict[str, int] = {}
        for run in runs:
            keys = {k for row in run.history for k in row} if with_history else run.metric_keys()
            for key in keys:
                if fnmatch.fnmatchcase(key, pattern) and not any(
                    fnmatch.fnmatchcase(key, p) for p in EXCLUDED_PATTERNS
                ):
                    candidates[key] = candidates.get(key, 0) + 1
        for key in sorted(candidates):
            if candidates[key] > best_count:
                best, best_count = key, candidates[key]
    return best


# ----------------------------------------------------------------------------------------------------------------
# Table


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.4g}"


def metrics_table(runs: Sequence[RunData], metrics: Sequence[str], baseline: RunData) -> str:
    """Markdown: one row per metric, one column per run (baseline first); other runs show `value (Δ to baseline)`."""
    ordered = [baseline, *[r for r in runs if r is not baseline]]
    header = ["metric", f"{baseline.label} (baseline)", *[r.label for r in ordered[1:]]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for key in metrics:
        base = baseline.final(key)
        cells = [f"`{key}`", "— (missing)" if base is None else _fmt(base)]
        for run in ordered[1:]:
            value = run.final(key)
            if value is None:
                cells.append("— (missing)")
            elif base is None or not math.isfinite(base) or not math.isfinite(value):
                cells.append(_fmt(value))
            else:
                cells.append(f"{_fmt(value)} ({value - base:+.4g})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def runs_table(runs: Sequence[RunData]) -> str:
    """Markdown: what each run is and whether it can be trusted (code version, seed, parent, state)."""
    lines = [
        "| run | id | stage | seed | git commit | parents | state | source |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        prov = run.config.get("provenance") or {}
        commit = prov.get("git_commit")
        git = f"{commit[:8]}{' (dirty)' if prov.get('git_dirty') else ''}" if commit else "—"
        lineage = run.config.get("lineage") or {}
        parents = ", ".join(
            p.get("run_id") or Path(p.get("output_dir") or "?").name for p in lineage.get("parents") or []
        )
        stage = run.config.get("stage") or run.job_type or "—"
        seed = run.config.get("seed", "—")
        lines.append(
            f"| {run.label} | {run.run_id} | {stage} | {seed} | {git} | {parents or '—'} | {run.state} | {run.source} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Plots (matplotlib's object API with the Agg canvas: no display, no global pyplot state)


def _step(row: dict[str, float]) -> float | None:
    for key in STEP_KEYS:
        if key in row:
            return row[key]
    return None


def curve(run: RunData, key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric; the step is the trainer's global step when logged, else W&B's step."""
    points = [(_step(row), row[key]) for row in run.history if key in row and _step(row) is not None]
    points.sort(key=lambda p: p[0])
    return [p[0] for p in points], [p[1] for p in points]


def paired(run: RunData, x_key: str, y_key: str) -> tuple[list[float], list[float]]:
    """(x, y) points of two metrics over training, one per step where the sparser of the two is logged, paired with
    the latest value of the other (they are often logged at different steps: eval every eval_steps, train metrics
    every logging_steps)."""
    rows = sorted((r for r in run.history if _step(r) is not None), key=_step)
    x_count, y_count = sum(x_key in r for r in rows), sum(y_key in r for r in rows)
    anchor = x_key if x_count <= y_count else y_key
    xs, ys, x, y = [], [], None, None
    for row in rows:
        x, y = row.get(x_key, x), row.get(y_key, y)
        if anchor in row and x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


def new_figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (6, 4)) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_curves(runs: Sequence[RunData], metrics: Sequence[str], path: str | Path) -> tuple[Path | None, list[str]]:
    """One panel per metric (metric vs step, one line per run). Returns (the PNG or None, the metrics left out)."""
    with_curves = [k for k in metrics if any(curve(r, k)[0] for r in runs)]
    shown, left_out = with_curves[:MAX_CURVES], with_curves[MAX_CURVES:]
    if not shown:
        return None, left_out
    ncols = min(3, len(shown))
    nrows = math.ceil(len(shown) / ncols)
    fig = new_figure(ncols, nrows, (5, 3.4))
    for i, key in enumerate(shown):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for i_run, run in enumerate(runs):
            steps, values = curve(run, key)
            marker = "o" if len(steps) < 30 else None
            ax.plot(steps, values, marker=marker, markersize=3, color=f"C{i_run % 10}", label=run.label)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=f"C{i % 10}", label=run.label) for i, run in enumerate(runs)]
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(runs), 6), fontsize=9)
    fig.savefig(path, dpi=110)
    return Path(path), left_out


def plot_pairs(runs: Sequence[RunData], x_key: str, y_key: str, path: str | Path, title: str) -> Path | None:
    """y vs x over training for each run (the last point marked), e.g. reward vs KL. None when no run has both."""
    series = [(f"C{i % 10}", run, *paired(run, x_key, y_key)) for i, run in enumerate(runs)]  # same colors as curves
    series = [(color, run, xs, ys) for color, run, xs, ys in series if xs]
    if not series:
        return None
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for color, run, xs, ys in series:
        ax.plot(xs, ys, marker="o", markersize=3, alpha=0.8, color=color, label=run.label)
        ax.plot(xs[-1:], ys[-1:], marker="*", markersize=12, color=color)
    ax.set_xlabel(x_key)
    ax.set_ylabel(y_key)
    ax.set_title(f"{title} (★ = last point)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return Path(path)


# ----------------------------------------------------------------------------------------------------------------
# The report


def compare_runs(
    runs: Sequence[RunData],
    output_dir: str | Path,
    baseline: str | None = None,
    metrics: Sequence[str] | None = None,
) -> Comparison:
    """Write `report.md` (final-metrics table with deltas, runs table, plots, what is missing) and the PNGs."""
    runs = list(runs)
    if not runs:
        raise CompareError("no runs to compare.")
    label_runs(runs)
    base = pick_baseline(runs, baseline)
    selected, missing_by_metric = select_metrics(runs, metrics)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    missing = [
        f"`{k}`: not logged by {', '.join(labels)}"
        if k in selected
        else f"`{k}`: only logged by {', '.join(r.label for r in runs if r.label not in labels)}, not compared"
        for k, labels in missing_by_metric.items()
    ]
    missing += [f"{r.label}: {note}" for r in runs for note in r.notes]
    plots: list[Path] = []
    figures: list[tuple[str, Path]] = []

    curves_png, left_out = plot_curves(runs, selected, out / "curves.png")
    if curves_png:
        plots.append(curves_png)
        figures.append(("metrics vs step", curves_png))
    else:
        missing.append("metric curves: no run has history for the compared metrics (final values only)")
    if left_out:
        missing.append(f"curves of {len(left_out)} more metrics not drawn: {', '.join(left_out)} (use --metrics)")
    no_history = [r.label for r in runs if not r.history]
    if curves_png and no_history:
        missing.append(f"no curves for {', '.join(no_history)}: no history")

    reward, kl, length = find_metric(runs, "reward"), find_metric(runs, "kl"), find_metric(runs, "length")
    pairs = [
        (kl, reward, "KL", "reward", "reward_vs_kl.png"),
        (reward, length, "reward", "length", "length_vs_reward.png"),
    ]
    for x_key, y_key, x_name, y_name, filename in pairs:
        title = f"{y_name} vs {x_name}"
        if x_key is None or y_key is None:
            absent = " and ".join(f"a {n}" for n, k in ((x_name, x_key), (y_name, y_key)) if k is None)
            missing.append(f"{title}: not plotted, no run logs {absent} metric over training")
            continue
        png = plot_pairs(runs, x_key, y_key, out / filename, title)
        if png is None:
            missing.append(f"{title}: not plotted, no run logs both `{x_key}` and `{y_key}` over training")
            continue
        plots.append(png)
        figures.append((title, png))
        lacking = [r.label for r in runs if not paired(r, x_key, y_key)[0]]
        if lacking:
            missing.append(f"{title}: {', '.join(lacking)} not drawn (no `{x_key}` and `{y_key}` history)")

    table = metrics_table(runs, selected, base)
    lines = [
        "# Run comparison",
        "",
        f"{len(runs)} runs; baseline **{base.label}** ({base.run_id}); Δ = run − baseline, final values "
        f"(the run's summary, else its last logged value). Written {time.strftime('%Y-%m-%d %H:%M:%S')} by "
        "`scripts/compare_runs.py`.",
        "",
        "## Final metrics",
        "",
        table,
        "",
        "## Runs",
        "",
        runs_table(runs),
        "",
    ]
    commits = {(r.config.get("provenance") or {}).get("git_commit") for r in runs} - {None}
    if len(commits) > 1:
        lines += [f"Note: the runs come from {len(commits)} different git commits.", ""]
    if any((r.config.get("provenance") or {}).get("git_dirty") for r in runs):
        lines += ["Note: some runs had uncommitted changes (dirty), see the git commit column.", ""]
    if figures:
        lines += ["## Curves", ""] + [f"![{title}]({png.name})\n" for title, png in figures]
    lines += ["## Missing", ""] + ([f"- {m}" for m in missing] or ["Nothing: every run has every compared metric."])
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return Comparison(table=table, report_path=report, plots=plots, metrics=selected, baseline=base.label,
                      missing=missing)  # fmt: skip


def log_comparison_to_wandb(
    comparison: Comparison,
    runs: Sequence[RunData],
    project: str,
    entity: str | None = None,
    group: str | None = None,
) -> str | None:
    """A W&B run (job_type "comparison") holding the table as a wandb.Table and the plots as images: a panel in the
    project's workspace. Offline it is written locally like any run. Returns where it is."""
    import wandb

    from recipes.common.tracking import resolve_wandb_mode, run_location

    by_label = {r.label: r for r in runs}
    ordered = [comparison.baseline, *[r.label for r in runs if r.label != comparison.baseline]]
    table = wandb.Table(columns=["metric", *ordered, *[f"Δ {label}" for label in ordered[1:]]])
    for key in comparison.metrics:
        values = [by_label[label].final(key) for label in ordered]
        base = values[0]
        deltas = [None if v is None or base is None else v - base for v in values[1:]]
        table.add_data(key, *values, *deltas)
    run = wandb.init(
        project=project,
        entity=entity,
        group=group,
        job_type="comparison",
        name=f"compare-{'-vs-'.join(ordered)[:100]}",
        config={
            "runs": {r.label: {"id": r.run_id, "source": r.source} for r in runs},
            "baseline": comparison.baseline,
            "missing": comparison.missing,
        },
        mode=resolve_wandb_mode(),
    )
    run.log(
        {"comparison/final_metrics": table, **{f"comparison/{p.stem}": wandb.Image(str(p)) for p in comparison.plots}}
    )
    location = run_location(run)
    run.finish()
    return location
