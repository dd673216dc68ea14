"""Fine-tuning a round's policy on what it kept: TRL rows, and SFT or DPO from the round's starting policy."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recipes.rejection_sampling.sampling import release_memory


def training_rows(method: str, selected: Sequence[dict[str, Any]], prompts: dict[int, dict]) -> list[dict]:
    """TRL rows: prompt-completion (completion-only loss) for SFT, prompt/chosen/rejected for DPO."""

    def reply(text: str) -> list[dict[str, str]]:
        return [{"role": "assistant", "content": text}]

    if method == "rejection_sampling":
        return [{"prompt": prompts[s["prompt_id"]]["messages"], "completion": reply(s["completion"])} for s in selected]
    return [
        {
            "prompt": prompts[p["prompt_id"]]["messages"],
            "chosen": reply(p["chosen"]["completion"]),
            "rejected": reply(p["rejected"]["completion"]),
        }
        for p in selected
    ]


def train_round(
    method: str,
    rows: list[dict[str, Any]],
    out_dir: Path,
    start_policy: str,
    training_args: Any,
    model_args: Any,
    tokenizer: Any,
    dpo_beta: float,
    run_name: str,
) -> dict[str, float]:
    """Fine-tune `start_policy` on `rows` into `out_dir` (SFT, or DPO with the start policy as the reference);
    resumes from the last checkpoint in `out_dir`, and marks it finished at the end."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, SFTTrainer

    from recipes.common.outputs import mark_finished, prepare_output_dir
    from recipes.common.policy import load_policy

    resume_from = prepare_output_dir(str(out_dir), False, None)
    settings = {f.name: getattr(training_args, f.name) for f in dataclasses.fields(training_args) if f.init}
    settings.update(output_dir=str(out_dir), run_name=run_name)
    start_args = dataclasses.replace(model_args, model_name_or_path=start_policy)
    model, peft_config = load_policy(start_args, gradient_checkpointing=training_args.gradient_checkpointing)
    dataset = Dataset.from_list(rows)
    if method == "rejection_sampling":
        args = type(training_args)(**settings)
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
        )
    else:
        # Shared settings carry over; `loss_type` means different things in SFT and DPO (DPO keeps its sigmoid).
        accepted = {f.name for f in dataclasses.fields(DPOConfig) if f.init} - {"loss_type"}
        args = DPOConfig(**{k: v for k, v in settings.items() if k in accepted}, beta=dpo_beta)
        trainer = DPOTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
        )
    result = trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_model(str(out_dir))
    metrics = {f"train/{k}": v for k, v in result.metrics.items()}
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(str(out_dir))
        mark_finished(str(out_dir), {"stage": method, "metrics": metrics, "start_policy": start_policy})
    trainer.accelerator.wait_for_everyone()
    del trainer, model
    release_memory()
    return metrics
