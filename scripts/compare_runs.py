"""Compare runs side by side: final metrics with deltas to a baseline (markdown), curves (PNG), what is missing.

    # local runs: offline run dirs, wandb/ folders to scan, or recipe output dirs (run_complete.json)
    python scripts/compare_runs.py outputs/demo-run/sft outputs/demo-run/dpo outputs/demo-run/ppo --baseline sft
    python scripts/compare_runs.py wandb/ --group ppo-vs-dpo --filter seed=0
    # an online project (needs network and `wandb login`)
    python scripts/compare_runs.py --project my-team/post-training-recipes --group ppo-vs-dpo --tags method:dpo

Writes OUTPUT_DIR/report.md and its PNGs, prints the table and the report path. Online, it also logs the comparison
to the project as a run with a table and the plots (`--no-wandb_panel` to skip, `--wandb_panel` to do it offline).
"""

from __future__ import annotations

import argparse
import sys

from eval.runs import (
    CompareError,
    compare_runs,
    filter_runs,
    load_local_runs,
    load_online_runs,
    log_comparison_to_wandb,
    parse_filters,
)
from recipes.common.errors import run_cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="local runs: run dirs, .wandb files, wandb/ folders, output dirs")
    parser.add_argument("--project", help="online W&B project as ENTITY/PROJECT (read with wandb.Api())")
    parser.add_argument("--group", help="only runs in this W&B group")
    parser.add_argument("--tags", default="", help="only runs with all these tags (comma-separated)")
    parser.add_argument(
        "--filter", action="append", default=[], metavar="KEY=VALUE", help="config filter, repeatable (seed=0)"
    )
    parser.add_argument("--baseline", help="run name or id the deltas are taken to (default: the first run)")
    parser.add_argument("--metrics", nargs="+", help="glob patterns of metrics to compare (default: eval/ and train/)")
    parser.add_argument("--output_dir", default="outputs/comparison", help="where report.md and the PNGs go")
    parser.add_argument("--base_url", help="W&B server for --project (default: the logged-in one)")
    parser.add_argument("--timeout", type=float, default=20, help="seconds per W&B API request")
    parser.add_argument("--max_runs", type=int, default=50, help="at most this many online runs")
    parser.add_argument(
        "--wandb_panel",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="log the comparison to W&B as a run with a table and plots (default: on with --project)",
    )
    args = parser.parse_args(argv)
    if not args.runs and not args.project:
        parser.error("name local runs (paths) and/or an online --project ENTITY/PROJECT")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tags = [t.strip() for t in args.tags.split(",") if t.strip()]
    try:
        filters = parse_filters(args.filter)
        runs = []
        if args.runs:
            local = filter_runs(load_local_runs(args.runs), args.group, tags, filters)
            if not local:
                raise CompareError(f"no local run matches group={args.group!r} tags={tags} filters={filters}.")
            runs += local
        if args.project:
            runs += load_online_runs(
                args.project, args.group, tags, filters, args.base_url, args.timeout, max_runs=args.max_runs
            )
        comparison = compare_runs(runs, args.output_dir, baseline=args.baseline, metrics=args.metrics)
        panel = None
        if args.wandb_panel or (args.wandb_panel is None and args.project):
            entity, _, project = (args.project or "/post-training-recipes").partition("/")
            panel = log_comparison_to_wandb(comparison, runs, project, entity or None, args.group)
    except CompareError as err:
        print(f"compare_runs: error: {err}", file=sys.stderr)
        return 2

    print(comparison.table)
    if comparison.missing:
        print(f"\nMissing ({len(comparison.missing)}):")
        print("\n".join(f"  - {m}" for m in comparison.missing))
    print(f"\nReport: {comparison.report_path}")
    if panel:
        print(f"W&B comparison run: {panel}")
    return 0


if __name__ == "__main__":
    run_cli(main)
