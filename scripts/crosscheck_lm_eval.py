"""Cross-check `eval/` against lm-evaluation-harness on the same model and the same local data, offline.

    pip install "lm-eval>=0.4.9,<0.5"
    python scripts/crosscheck_lm_eval.py [--model outputs/demo/base] [--gsm8k outputs/demo/data/math]
        [--mmlu outputs/demo/data/mmlu] [--limit 100] [--subjects 5] [--num_fewshot 5] [--max_new_tokens 128]

lm-eval runs its own `gsm8k` (v3) and `mmlu` default templates, re-pointed at local files: each task YAML is
lm-eval's, with `dataset_path: json` and `dataset_kwargs.data_files` naming the local jsonl (the MMLU CSVs are
converted to jsonl with lm-eval's `cais/mmlu` columns), and GSM8K exemplars taken with the `first_n` sampler
(first k train records, as `eval/` does; lm-eval's default draws them at random). Then `eval/` runs on the same
questions. Prints both sets of figures, whether the prompts are identical string for string, and how many
predictions agree.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import yaml  # noqa: E402

from eval import gsm8k, mmlu  # noqa: E402
from eval.data import seeded_subset  # noqa: E402
from eval.loading import load_model_and_tokenizer  # noqa: E402
from recipes.common.errors import run_cli  # noqa: E402


def lm_eval_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def write_gsm8k_task(task_dir: Path, data_dir: Path, test_file: Path, num_fewshot: int, max_new_tokens: int) -> str:
    config = yaml.safe_load((lm_eval_tasks_dir() / "gsm8k" / "gsm8k.yaml").read_text())
    config.update(
        task="gsm8k_local",
        tag=[],
        dataset_path="json",
        dataset_name=None,
        dataset_kwargs={"data_files": {"train": str(data_dir / "train.jsonl"), "test": str(test_file)}},
        fewshot_config={"sampler": "first_n"},
        num_fewshot=num_fewshot,
    )
    config["generation_kwargs"]["max_gen_toks"] = max_new_tokens
    (task_dir / "gsm8k_local.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return "gsm8k_local"


def write_mmlu_tasks(task_dir: Path, subjects: dict[str, tuple[list, list]]) -> list[str]:
    template = yaml.safe_load((lm_eval_tasks_dir() / "mmlu" / "default" / "_default_template_yaml").read_text())
    names = []
    for subject, (dev, test) in subjects.items():
        files = {}
        for split, rows in (("dev", dev), ("test", test)):
            path = task_dir / f"mmlu_{subject}_{split}.jsonl"
            with path.open("w") as handle:
                for q in rows:
                    record = {"question": q.question, "subject": subject, "choices": q.choices, "answer": q.answer}
                    handle.write(json.dumps(record) + "\n")
            files[split] = str(path)
        config = dict(template)
        config.update(
            task=f"mmlu_local_{subject}",
            dataset_path="json",
            dataset_kwargs={"data_files": files},
            description=mmlu.header(subject),
            num_fewshot=5,
        )
        (task_dir / f"mmlu_local_{subject}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        names.append(config["task"])
    return names


def run_lm_eval(model_dir: str, task_dir: Path, tasks: list[str], batch_size: int) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        model="hf",
        model_args={"pretrained": model_dir, "dtype": "float32", "trust_remote_code": False},
        tasks=tasks,
        task_manager=TaskManager(include_path=str(task_dir)),
        batch_size=batch_size,
        device="cpu",
        log_samples=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="outputs/demo/base")
    parser.add_argument("--gsm8k", default="outputs/demo/data/math", help="Directory with train.jsonl and test.jsonl.")
    parser.add_argument("--mmlu", default="outputs/demo/data/mmlu", help="Hendrycks CSV directory.")
    parser.add_argument("--mmlu_split", default=None)
    parser.add_argument("--limit", type=int, default=100, help="GSM8K questions (seeded subset).")
    parser.add_argument("--subjects", type=int, default=5, help="MMLU subjects (the first N, all their questions).")
    parser.add_argument("--num_fewshot", type=int, default=5)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=16)
    args = parser.parse_args()

    gsm8k_dir = Path(args.gsm8k)
    records = seeded_subset(gsm8k.load_gsm8k(str(gsm8k_dir), "test"), args.limit, seed=0)
    exemplars = gsm8k.load_gsm8k(str(gsm8k_dir), "train")
    dev, questions, split = mmlu.load_mmlu(args.mmlu, args.mmlu_split)
    chosen = dict(list(questions.items())[: args.subjects])

    with tempfile.TemporaryDirectory() as tmp:
        task_dir = Path(tmp)
        test_file = task_dir / "gsm8k_test.jsonl"
        test_file.write_text("".join(json.dumps(r) + "\n" for r in records))
        gsm_task = write_gsm8k_task(task_dir, gsm8k_dir, test_file, args.num_fewshot, args.max_new_tokens)
        mmlu_tasks = write_mmlu_tasks(task_dir, {s: (dev[s], rows) for s, rows in chosen.items()})
        theirs = run_lm_eval(args.model, task_dir, [gsm_task, *mmlu_tasks], args.batch_size)

    model, tokenizer = load_model_and_tokenizer(args.model, device="cpu")
    ours_gsm, ours_gsm_samples = gsm8k.evaluate_gsm8k(
        model,
        tokenizer,
        records,
        exemplars=exemplars,
        num_fewshot=args.num_fewshot,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    flat_questions = [q for rows in chosen.values() for q in rows]
    ours_mmlu, ours_mmlu_samples = mmlu.evaluate_mmlu(model, tokenizer, dev, flat_questions, batch_size=args.batch_size)

    # lm-eval's per-sample logs, matched to ours by the question text.
    their_gsm = {s["doc"]["question"]: s for s in theirs["samples"][gsm_task]}
    prompts_equal = sum(their_gsm[s["question"]]["arguments"][0][0] == s["prompt"] for s in ours_gsm_samples)
    responses_equal = sum(
        their_gsm[s["question"]]["resps"][0][0].split("Question:")[0] == s["completion"] for s in ours_gsm_samples
    )
    gsm_results = theirs["results"][gsm_task]
    their_mmlu_samples = [s for task in mmlu_tasks for s in theirs["samples"][task]]
    their_mmlu_by_prompt = {s["arguments"][0][0]: s for s in their_mmlu_samples}
    mmlu_prompts_equal = sum(s["prompt"] in their_mmlu_by_prompt for s in ours_mmlu_samples)
    mmlu_agree = 0
    for sample in ours_mmlu_samples:
        theirs_sample = their_mmlu_by_prompt.get(sample["prompt"])
        if theirs_sample is not None:
            their_scores = [r[0] for r in theirs_sample["filtered_resps"]]
            their_pick = max(range(4), key=lambda k: their_scores[k])
            mmlu_agree += mmlu.LETTERS[their_pick] == sample["completion"]
    their_mmlu_acc = sum(s["acc"] for s in their_mmlu_samples) / len(their_mmlu_samples)

    print(
        f"\nmodel {args.model}; GSM8K {len(records)} questions ({args.num_fewshot}-shot, max {args.max_new_tokens} new tokens)"
    )
    print(f"MMLU {len(flat_questions)} {split} questions from {len(chosen)} subjects (5-shot)\n")
    print(f"{'metric':28s} {'lm-eval':>10s} {'eval/':>10s}")
    rows = [
        ("gsm8k exact_match strict", gsm_results["exact_match,strict-match"], ours_gsm["exact_match_strict"]),
        ("gsm8k exact_match flexible", gsm_results["exact_match,flexible-extract"], ours_gsm["exact_match_flexible"]),
        ("mmlu accuracy (micro)", their_mmlu_acc, ours_mmlu["accuracy"]),
    ]
    for name, a, b in rows:
        print(f"{name:28s} {a:10.4f} {b:10.4f}")
    print(
        f"\nGSM8K prompts identical: {prompts_equal}/{len(records)}; responses identical: {responses_equal}/{len(records)}"
    )
    print(
        f"MMLU prompts identical: {mmlu_prompts_equal}/{len(flat_questions)}; same prediction: {mmlu_agree}/{len(flat_questions)}"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
