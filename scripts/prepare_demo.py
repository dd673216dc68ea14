#!/usr/bin/env python
"""Build the embedded demo: template datasets, a BPE tokenizer and a tiny Llama pretrained from scratch on CPU.

    python scripts/prepare_demo.py [--output_dir outputs/demo] [--seed 0] [--data_only]

`--data_only` writes the datasets alone (seconds, no model): what a pipeline on another model needs, such as
scripts/real_model.sh; the data are the same files as in the full demo of that seed.

The layout is documented in scripts/README.md. Nothing is downloaded. The run works in a temporary directory
next to the output and renames it into place at the end, with `prepared.json` written last, so an interrupted
run never leaves a directory that looks finished. A finished directory with the same arguments is left as it is.
Same seed, same data files byte for byte; the weights are identical on the same machine (torch runs on a fixed
2 threads, since the summation order of a matmul depends on the thread count).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the `demo` package next to this script

from demo.datasets import DemoData, DemoSizes, build_datasets, qa_text, write_datasets  # noqa: E402
from demo.tokenizer import build_tokenizer  # noqa: E402

from recipes.common.errors import UserError, run_cli  # noqa: E402

# Bump when the generated data or model changes, so that a cached demo from an older version is not reused.
DEMO_VERSION = 3
TORCH_THREADS = 2
EVAL_PROBLEMS_PER_LEVEL = 50


class PrepareError(UserError):
    """Something the user must fix; the message says what, where and how."""


def arguments_record(seed: int, data_only: bool = False) -> dict[str, Any]:
    record = {"seed": seed, "demo_version": DEMO_VERSION}
    return {**record, "data_only": True} if data_only else record


def check_existing(output_dir: Path, seed: int, data_only: bool = False) -> bool:
    """True when `output_dir` already holds this demo; raises when it holds something else."""
    if not output_dir.exists():
        return False
    if not output_dir.is_dir():
        raise PrepareError(f"{output_dir} exists and is not a directory. Pick another --output_dir.")
    marker = output_dir / "prepared.json"
    if not marker.is_file():
        if any(output_dir.iterdir()):
            raise PrepareError(
                f"{output_dir} exists but holds no finished demo (no prepared.json); this script never leaves "
                "partial output there, so it is something else. Pick another --output_dir, or remove that "
                "directory yourself and run again."
            )
        return False
    try:
        recorded = json.loads(marker.read_text()).get("arguments")
    except (json.JSONDecodeError, AttributeError) as err:
        raise PrepareError(f"{marker} is not valid JSON ({err}). Remove {output_dir} yourself and run again.") from err
    if recorded != arguments_record(seed, data_only):
        raise PrepareError(
            f"{output_dir} holds a demo prepared with {recorded}, not {arguments_record(seed, data_only)}. Pick another "
            "--output_dir, or remove that directory yourself and run again."
        )
    return True


def training_texts(data: DemoData) -> list[str]:
    """What the tokenizer learns its merges from: the corpus plus every train-split reply and prompt."""
    texts = list(data.corpus)
    for row in data.sft["train"]:
        texts += [m["content"] for m in row["messages"]]
    for rows in (data.preferences["train"], data.safety["train"]):
        for row in rows:
            texts += [row["prompt"][0]["content"], row["chosen"][0]["content"], row["rejected"][0]["content"]]
    return texts


def eval_problems(data: DemoData, per_level: int = EVAL_PROBLEMS_PER_LEVEL) -> list[dict]:
    """The first `per_level` test problems of each level (the test split is shuffled, so these are a sample)."""
    picked: list[dict] = []
    for level in (1, 2, 3):
        picked += [p for p in data.math["test"] if p["level"] == level][:per_level]
    return picked


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(TORCH_THREADS)


def build(work_dir: Path, seed: int, data_only: bool = False) -> dict[str, Any]:
    """Everything (or only the data) into `work_dir`; returns the contents of prepared.json."""
    from demo import model as demo_model  # torch and transformers: only imported when there is work to do
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per phase is the progress report

    timings: dict[str, float] = {}
    phase_start = time.perf_counter()

    def done(phase: str, detail: str) -> None:
        nonlocal phase_start
        timings[phase] = round(time.perf_counter() - phase_start, 2)
        print(f"[{len(timings)}/6] {phase}: {detail} ({timings[phase]:.1f}s)", flush=True)
        phase_start = time.perf_counter()

    seed_everything(seed)
    data = build_datasets(seed, DemoSizes())
    write_datasets(data, work_dir / "data")
    done("data", f"{sum(sum(s.values()) for n, s in data.sizes().items() if n != 'corpus')} rows")
    if data_only:
        return {"arguments": arguments_record(seed, data_only), "timings_s": timings, "dataset_sizes": data.sizes()}

    tokenizer = build_tokenizer(training_texts(data))
    done("tokenizer", f"byte-level BPE, {len(tokenizer)} tokens")

    settings = demo_model.PretrainSettings()
    model = demo_model.build_model(tokenizer, settings, seed)
    train_rows = demo_model.pack(tokenizer, data.corpus, settings.seq_len)
    heldout_rows = demo_model.pack(tokenizer, data.heldout, settings.seq_len)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"      {n_params / 1e6:.2f}M parameters; corpus {train_rows.numel():,} tokens", flush=True)
    losses = demo_model.pretrain(model, train_rows, settings, seed)
    done("pretraining", f"{settings.steps} steps, final loss {sum(losses[-10:]) / 10:.3f}")

    base_dir = work_dir / "base"
    model.save_pretrained(base_dir, safe_serialization=True)
    tokenizer.save_pretrained(base_dir)
    done("save", "base/ (safetensors, tokenizer, chat template, generation config)")

    reloaded = demo_model.AutoModelForCausalLM.from_pretrained(base_dir)  # what the recipes load
    loss_fp32 = demo_model.mean_loss(reloaded, heldout_rows)
    loss_4bit = demo_model.mean_loss(demo_model.load_4bit(base_dir), heldout_rows)
    done("4-bit check", f"held-out loss fp32 {loss_fp32:.3f}, 4-bit NF4 {loss_4bit:.3f}")

    accuracy = demo_model.gsm_accuracy(reloaded, tokenizer, eval_problems(data))
    done("base accuracy", ", ".join(f"{k} {v:.0%}" for k, v in accuracy.items()))

    return {
        "arguments": arguments_record(seed),
        "timings_s": timings,
        "num_parameters": n_params,
        "vocab_size": len(tokenizer),
        "pretraining": {**vars(settings), "corpus_tokens": train_rows.numel(), "final_loss": sum(losses[-10:]) / 10},
        "torch_num_threads": TORCH_THREADS,
        "base_loss_fp32": loss_fp32,
        "base_loss_4bit": loss_4bit,
        "base_gsm_accuracy": accuracy,
        "base_gsm_eval": {"problems": len(eval_problems(data)), "prompt": qa_text("{question}", "")[:-1]},
        "dataset_sizes": data.sizes(),
    }


def prepare(output_dir: Path, seed: int, data_only: bool = False) -> dict[str, Any] | None:
    """Build the demo at `output_dir`; None when it was already there."""
    if check_existing(output_dir, seed, data_only):
        print(f"demo already prepared at {output_dir}")
        return None
    started = time.perf_counter()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    work_dir = output_dir.parent / f".{output_dir.name}.tmp-{os.getpid()}"
    work_dir.mkdir()
    try:
        record = build(work_dir, seed, data_only)
        record["timings_s"]["total"] = round(time.perf_counter() - started, 2)
        (work_dir / "prepared.json").write_text(json.dumps(record, indent=2) + "\n")
        try:
            os.rename(work_dir, output_dir)  # atomic; also replaces an empty directory
        except OSError:
            if check_existing(output_dir, seed, data_only):  # a concurrent run finished first: theirs is the same demo
                print(f"demo already prepared at {output_dir} (by another run)")
                return None
            raise
    finally:
        if work_dir.exists():
            shutil.rmtree(work_dir)  # our own temporary directory, never the output
    return record


def summary(output_dir: Path, record: dict[str, Any]) -> str:
    if record["arguments"].get("data_only"):
        sizes = "; ".join(f"{name} {'/'.join(map(str, s.values()))}" for name, s in record["dataset_sizes"].items())
        return f"demo data prepared at {output_dir / 'data'} ({sizes})"
    accuracy = ", ".join(f"{k} {v:.0%}" for k, v in record["base_gsm_accuracy"].items())
    sizes = "; ".join(f"{name} {'/'.join(map(str, s.values()))}" for name, s in record["dataset_sizes"].items())
    timings = ", ".join(f"{k} {v:.0f}s" for k, v in record["timings_s"].items())
    return (
        f"demo prepared at {output_dir}\n"
        f"  base model  {output_dir / 'base'} ({record['num_parameters'] / 1e6:.2f}M parameters)\n"
        f"  data        {output_dir / 'data'} ({sizes})\n"
        f"  base GSM    {accuracy}\n"
        f"  loss        fp32 {record['base_loss_fp32']:.3f}, 4-bit {record['base_loss_4bit']:.3f}\n"
        f"  timings     {timings}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_only", action="store_true", help="Write the datasets only (no tokenizer, no model).")
    args = parser.parse_args(argv)
    # A plain `kill` should clean up the temporary directory like Ctrl-C does (finally blocks run on SystemExit).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        record = prepare(args.output_dir, args.seed, args.data_only)
    except PrepareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if record is not None:
        print(summary(args.output_dir, record))
    return 0


if __name__ == "__main__":
    # Threads that sleep at OpenMP barriers instead of spinning: on a busy 2-core machine spinning made a step 8x
    # slower (measured); on an idle one sleeping costs little. Set here, before torch loads OpenMP, and only
    # when run as a script, so that importing this module changes nothing for the importer.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    run_cli(main)
