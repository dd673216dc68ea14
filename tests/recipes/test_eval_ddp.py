"""EvalCallback under DDP (two processes over gloo on CPU): rank 0 evaluates, rank 1 skips, nobody deadlocks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.distributed

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import datasets, torch
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments
    from eval.callback import EvalCallback
    from eval.testing import build_char_tokenizer, build_tiny_model

    out_dir, gsm8k_file = sys.argv[1], sys.argv[2]
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer)
    texts = [f"Question: what is {i}+1?\\nAnswer: {i + 1}" for i in range(32)]
    dataset = datasets.Dataset.from_dict({"text": texts}).map(
        lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"]
    )
    callback = EvalCallback(tokenizer, "gsm8k,length", gsm8k_path=gsm8k_file, num_samples=2, max_new_tokens=6,
                            eval_steps=2, samples_per_prompt=1, embedder=None)
    args = TrainingArguments(output_dir=out_dir, max_steps=4, per_device_train_batch_size=4, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), callbacks=[callback])
    trainer.train()
    rank = trainer.args.process_index
    record = {"rank": rank, "world_size": trainer.args.world_size, "history": callback.history,
              "training": model.training}
    with open(f"{out_dir}/rank{rank}.json", "w") as handle:
        json.dump(record, handle)
    """
)


def test_callback_under_two_process_ddp(tmp_path: Path) -> None:
    script = tmp_path / "train_with_eval.py"
    script.write_text(SCRIPT)
    gsm8k_file = tmp_path / "gsm8k.jsonl"
    gsm8k_file.write_text(
        "".join(json.dumps({"question": f"What is {i}+2?", "answer": f"#### {i + 2}"}) + "\n" for i in range(4))
    )
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO_ROOT / "accelerate_configs" / "cpu_2proc.yaml"),
        "--main_process_port", "29541",
        str(script), str(tmp_path), str(gsm8k_file),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)  # a real 2-rank run
    assert [h["step"] for h in ranks[0]["history"]] == [2, 4]
    assert "eval/gsm8k/accuracy" in ranks[0]["history"][0] and "eval/length/mean_tokens" in ranks[0]["history"][0]
    assert ranks[1]["history"] == []  # only the main process evaluates
    assert ranks[0]["training"]  # back in train mode after the final evaluation
