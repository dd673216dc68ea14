"""Overhead of the SFT recipe over a bare TRL `SFTTrainer` with the same settings, in one process.

    python scripts/benchmarks/sft_overhead.py [--demo_dir outputs/demo] [--repeats 3] [--max_steps 30]

Runs alternate (recipe, bare, recipe, bare, ...) after one warm-up of each, so drift in machine load hits both
alike. Each run covers what a user waits for: load the 4-bit model, train, save the adapter. W&B and the
evaluation suite are off in both (they are features, not overhead). Prints the median wall time of each, their
ratio (target <= 1.03x) and the ratio of peak resident memory during the runs.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
from recipes.common.errors import run_cli  # noqa: E402
from recipes.common.modeling import keep_4bit_weights_unpacked  # noqa: E402
from recipes.sft.train import main as sft_recipe  # noqa: E402


class PeakRSS:
    """Samples this process's resident memory every 20 ms while active (ru_maxrss only ever grows)."""

    def __enter__(self) -> PeakRSS:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            with open("/proc/self/statm") as statm:
                self.peak = max(self.peak, int(statm.read().split()[1]) * 4096)
            time.sleep(0.02)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def shared_settings(config_path: Path, max_steps: int) -> dict:
    config = yaml.safe_load(config_path.read_text())
    return {
        "max_steps": max_steps,
        "per_device_train_batch_size": config["per_device_train_batch_size"],
        "learning_rate": float(config["learning_rate"]),
        "max_length": config["max_length"],
        "assistant_only_loss": config["assistant_only_loss"],
        "lora": {k: config[k] for k in ("lora_r", "lora_alpha", "lora_dropout")},
        "seed": config["seed"],
    }


def run_recipe(demo_dir: Path, config_path: Path, settings: dict, output_dir: Path) -> None:
    sft_recipe(
        ["--config", str(config_path), "--model_name_or_path", str(demo_dir / "base"),
         "--dataset_name", str(demo_dir / "data" / "sft"), "--output_dir", str(output_dir),
         "--max_steps", str(settings["max_steps"]), "--report_to", "none", "--eval_strategy", "no",
         "--save_strategy", "no", "--eval_tasks", "", "--logging_steps", "1000", "--disable_tqdm", "true"]
    )  # fmt: skip


def run_bare(demo_dir: Path, settings: dict, output_dir: Path) -> None:
    """What a user would write with TRL alone: 4-bit load, LoRA config, SFTTrainer."""
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        demo_dir / "base", quantization_config=quantization, dtype=torch.float32
    )
    # The recipe's 4-bit kernel choice (README, "4-bit on CPUs"): on AVX512-BF16 CPUs bitsandbytes would otherwise run
    # another kernel here than in the recipe, and the ratio would time kernels, not the recipe's overhead.
    keep_4bit_weights_unpacked(model)
    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "base")
    dataset = load_dataset("json", data_files=str(demo_dir / "data" / "sft" / "train.jsonl"), split="train")
    args = SFTConfig(
        output_dir=str(output_dir), max_steps=settings["max_steps"], learning_rate=settings["learning_rate"],
        per_device_train_batch_size=settings["per_device_train_batch_size"], max_length=settings["max_length"],
        assistant_only_loss=settings["assistant_only_loss"], seed=settings["seed"], bf16=False, use_cpu=True,
        gradient_checkpointing=False, report_to="none", save_strategy="no", logging_steps=1000, disable_tqdm=True,
        lr_scheduler_type="cosine", warmup_steps=10,
    )  # fmt: skip
    lora = LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", bias="none", **{
        "r": settings["lora"]["lora_r"], "lora_alpha": settings["lora"]["lora_alpha"],
        "lora_dropout": settings["lora"]["lora_dropout"]})  # fmt: skip
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    trainer.train()
    trainer.save_model(str(output_dir))


def timed(fn, *args) -> tuple[float, int]:
    gc.collect()
    with PeakRSS() as rss:
        start = time.perf_counter()
        fn(*args)
        elapsed = time.perf_counter() - start
    return elapsed, rss.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo_dir", type=Path, default=REPO_ROOT / "outputs" / "demo")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max_steps", type=int, default=30)
    args = parser.parse_args()
    if not (args.demo_dir / "prepared.json").is_file():
        subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "prepare_demo.py"), "--output_dir",
                        str(args.demo_dir)], check=True)  # fmt: skip
    config_path = REPO_ROOT / "recipes" / "sft" / "config.yaml"
    settings = shared_settings(config_path, args.max_steps)
    times: dict[str, list[float]] = {"recipe": [], "bare": []}
    peaks: dict[str, list[int]] = {"recipe": [], "bare": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats + 1):  # i == 0 is the warm-up of each
            for name in ("recipe", "bare"):
                out = Path(tmp) / f"{name}-{i}"
                if name == "recipe":
                    elapsed, peak = timed(run_recipe, args.demo_dir, config_path, settings, out)
                else:
                    elapsed, peak = timed(run_bare, args.demo_dir, settings, out)
                print(f"run {i} {name:>6}: {elapsed:6.2f} s, peak RSS {peak / 2**20:7.1f} MiB", flush=True)
                if i > 0:
                    times[name].append(elapsed)
                    peaks[name].append(peak)
    recipe_time, bare_time = statistics.median(times["recipe"]), statistics.median(times["bare"])
    print(f"\nSFT recipe vs bare SFTTrainer, {args.max_steps} steps, median of {args.repeats} alternating runs:")
    print(f"  time      recipe {recipe_time:.2f} s / bare {bare_time:.2f} s = {recipe_time / bare_time:.3f}x")
    print(f"  peak RSS  recipe {max(peaks['recipe']) / 2**20:.0f} MiB / bare {max(peaks['bare']) / 2**20:.0f} MiB = "
          f"{max(peaks['recipe']) / max(peaks['bare']):.3f}x")  # fmt: skip


if __name__ == "__main__":
    run_cli(main)  # a user error prints `error: <message>` and exits 2, without a traceback
