"""PPO memory: one 4-bit base shared by policy, reference, value model and two reward models vs a copy each.

    python scripts/benchmarks/ppo_memory.py [--hidden_size 768] [--num_layers 12] [--vocab_size 32000] [--repeats 1]

Builds, in a temporary directory, a random Llama (default: 100 M parameters, hidden 768, 12 layers, vocabulary
32k), an SFT-style LoRA adapter on it and two reward-recipe-style outputs (LoRA adapter + score head,
`reward_model.json` saying 4-bit), then loads the PPO model set the way `recipes/ppo/train.py` does, with two reward models (`reward_source: reward_model`,
value model from the helpfulness RM), in a fresh subprocess per variant:

- shared: `share_base: true`, one 4-bit base carrying the policy, reference, value and both RM adapters;
- separate: `share_base: false`, the policy (+ reference adapter) on one base, the value model and each RM on one
  base of its own (what the recipe did before the shared base: four quantized copies).

Each subprocess then runs one PPO step's worth of work (policy + value forward and backward, reference forward, both
RMs) on 8 rollouts of 64 + 32 tokens, and reports its peak resident set size (`ru_maxrss`, which includes loading's
transient buffers and the interpreter with torch, about 0.5 GiB) and what the loaded models hold (resident memory
after loading minus after the imports, freed heap returned first). Variants alternate; the ratios shared / separate
are the figures (on a GPU the same holds for GPU memory; not measured here).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))


def build_models(root: Path, hidden_size: int, num_layers: int, vocab_size: int) -> dict[str, Path]:
    """Random base + SFT adapter + two RM dirs, as the SFT and reward recipes would leave them."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

    from eval.testing import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=int(hidden_size * 8 / 3) // 64 * 64,
        num_hidden_layers=num_layers, num_attention_heads=hidden_size // 64, num_key_value_heads=hidden_size // 192,
        max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    paths = {"base": root / "base", "sft": root / "sft", "helpfulness": root / "rm", "safety": root / "rm-safety"}
    base.save_pretrained(paths["base"])
    tokenizer.save_pretrained(paths["base"])
    n_params = sum(p.numel() for p in base.parameters())
    lora = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}
    sft = get_peft_model(LlamaForCausalLM.from_pretrained(paths["base"]), LoraConfig(task_type="CAUSAL_LM", **lora))
    sft.save_pretrained(paths["sft"])
    tokenizer.save_pretrained(paths["sft"])
    for seed, name in ((1, "helpfulness"), (2, "safety")):
        torch.manual_seed(seed)
        rm = AutoModelForSequenceClassification.from_pretrained(paths["base"], num_labels=1)
        rm = get_peft_model(rm, LoraConfig(task_type="SEQ_CLS", modules_to_save=["score"], **lora))
        rm.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
        (paths[name] / "reward_model.json").write_text(json.dumps({"load_in_4bit": True}))
    (root / "params.json").write_text(json.dumps({"parameters": n_params}))
    return paths


def child(root: Path, share: bool) -> None:
    """Load the PPO models like the recipe and run one step's forwards and backward; print peak RSS as JSON."""
    import torch
    from transformers import AutoTokenizer

    from recipes.common.config import parse_config
    from recipes.ppo.modeling import load_ppo_models
    from recipes.ppo.rewards import PromptTable, load_reward_models
    from recipes.ppo.train import CONFIG_TYPES
    from recipes.ppo.trainer import PolicyAndValue, model_inputs

    torch.set_num_threads(1)
    imports_mib = current_rss_mib()
    start = time.perf_counter()
    argv = [
        "--config", str(REPO_ROOT / "recipes" / "ppo" / "config.yaml"), "--output_dir", str(root / "out"),
        "--model_name_or_path", str(root / "sft"), "--reward_source", "reward_model",
        "--reward_model_path", str(root / "rm"), "--safety_reward_model_path", str(root / "rm-safety"),
        "--share_base", str(share).lower(), "--report_to", "none",
    ]  # fmt: skip
    _, training_args, model_args, ppo_args = parse_config(CONFIG_TYPES, argv)
    models = load_ppo_models(model_args, str(root / "rm"), share, gradient_checkpointing=False)
    tokenizer = AutoTokenizer.from_pretrained(root / "sft")
    rms = load_reward_models(tokenizer, PromptTable(), training_args, ppo_args, model_args, models.shared)
    loaded = time.perf_counter() - start
    load_peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    models_mib = current_rss_mib() - imports_mib  # what the loaded models hold (after freeing loading buffers)

    rows, prompt, response = 8, 64, 32
    generator = torch.Generator().manual_seed(0)
    queries = torch.randint(4, len(tokenizer), (rows, prompt), generator=generator)
    responses = torch.randint(4, len(tokenizer), (rows, response), generator=generator)
    inputs = model_inputs(queries, torch.ones_like(queries), responses, torch.ones_like(responses))
    model = PolicyAndValue(models.policy, models.value)
    logits, values = model(*inputs, response_width=response)
    (logits.float().logsumexp(-1).mean() + values.mean()).backward()
    with torch.no_grad():
        with models.shared.use(models.reference_adapter):
            models.policy(input_ids=inputs[0], attention_mask=inputs[1], position_ids=inputs[2])
        rms.raw_scores(inputs[0], inputs[1])
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    record = {
        "share_base": share,
        "peak_rss_mib": peak_mib,
        "load_peak_rss_mib": load_peak_mib,
        "models_rss_mib": models_mib,
        "imports_rss_mib": imports_mib,
    }
    print(json.dumps({**record, "load_s": loaded, "value_on_shared_base": models.value.is_shared}))


def current_rss_mib() -> float:
    """Resident memory now, after returning freed heap to the OS (glibc's malloc_trim), so it counts live data."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the figure then includes freed but unreturned heap
        pass
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden_size", type=int, default=768)
    parser.add_argument("--num_layers", type=int, default=12)
    parser.add_argument("--vocab_size", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=1, help="Runs of each variant (alternating).")
    parser.add_argument("--child", choices=["shared", "separate"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.root), args.child == "shared")
        return
    from recipes.common.errors import UserError

    if args.hidden_size % 192 or args.repeats < 1:
        raise UserError(
            "--hidden_size must be a multiple of 192 (64-wide heads, 3 query heads per KV head); --repeats >= 1."
        )
    with tempfile.TemporaryDirectory(prefix="ppo-memory-") as tmp:
        root = Path(tmp)
        build_models(root, args.hidden_size, args.num_layers, args.vocab_size)
        n_params = json.loads((root / "params.json").read_text())["parameters"]
        print(f"[ppo_memory] random Llama, {n_params / 1e6:.0f} M parameters; policy + reference + value + 2 RMs")
        results: dict[str, list[dict]] = {"shared": [], "separate": []}
        for _ in range(args.repeats):
            for variant in ("shared", "separate"):
                cmd = [sys.executable, __file__, "--child", variant, "--root", str(root)]
                out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
                if out.returncode != 0:
                    raise UserError(f"the {variant} run failed:\n{out.stderr[-3000:]}")
                record = json.loads(out.stdout.strip().splitlines()[-1])
                results[variant].append(record)
                print(
                    f"[ppo_memory] {variant}: peak RSS {record['peak_rss_mib']:.0f} MiB (loading: "
                    f"{record['load_peak_rss_mib']:.0f} MiB), models "
                    f"{record['models_rss_mib']:.0f} MiB (after imports {record['imports_rss_mib']:.0f} MiB), "
                    f"load {record['load_s']:.1f} s"
                )
    summary = {"parameters": n_params}
    for key in ("peak_rss_mib", "load_peak_rss_mib", "models_rss_mib"):
        median = {variant: statistics.median(r[key] for r in runs) for variant, runs in results.items()}
        summary[key] = median
        summary[f"{key}_ratio_shared_over_separate"] = median["shared"] / median["separate"]
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    from recipes.common.errors import run_cli

    run_cli(main)
