"""MMLU: 5-shot multiple choice scored by the log-likelihood of " A", " B", " C", " D", as lm-evaluation-harness does.

Prompt (lm-eval `mmlu` default template): "The following are multiple choice questions (with answers) about
{subject with spaces}.\\n\\n", then the subject's dev exemplars in file order, each "{question}\\nA. ..\\nB. ..\\n
C. ..\\nD. ..\\nAnswer: {letter}\\n\\n", then the test question ending in "Answer:". The prediction is the letter
whose continuation " X" has the highest log-likelihood. Reports micro accuracy (over questions), macro accuracy
(mean over subjects) and per-subject accuracy.
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from eval.data import EvalError
from eval.generation import loglikelihood
from recipes.common.errors import demo_hint

LETTERS = ("A", "B", "C", "D")
HUB_NAME = "cais/mmlu"
EVAL_SPLITS = ("test", "val", "validation")


@dataclass
class Question:
    subject: str
    question: str
    choices: list[str]
    answer: int  # index into LETTERS


def header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def format_question(question: Question) -> str:
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, question.choices))
    return f"{question.question.strip()}{options}\nAnswer:"


def build_prompt(question: Question, dev: Sequence[Question], num_fewshot: int = 5) -> str:
    shots = "".join(f"{format_question(ex)} {LETTERS[ex.answer]}\n\n" for ex in dev[:num_fewshot])
    return header(question.subject) + shots + format_question(question)


# --- data -------------------------------------------------------------------------------------------------------


def _answer_index(value: Any, where: str) -> int:
    if isinstance(value, int) and 0 <= value < 4:
        return value
    text = str(value).strip().upper()
    if text in LETTERS:
        return LETTERS.index(text)
    if text.isdigit() and int(text) < 4:
        return int(text)
    raise EvalError(f"{where}: answer {value!r} is not one of A/B/C/D (or 0-3).")


def read_csv(path: Path, subject: str) -> list[Question]:
    """One hendrycks CSV: no header, columns question, A, B, C, D, answer (fields may hold quoted commas/newlines)."""
    questions = []
    with path.open(encoding="utf-8", newline="") as handle:
        for row_no, row in enumerate(csv.reader(handle), start=1):
            if not row:
                continue
            if len(row) != 6:
                raise EvalError(
                    f"{path}, row {row_no}: expected 6 columns (question,A,B,C,D,answer; no header), got {len(row)}."
                )
            answer = _answer_index(row[5], f"{path}, row {row_no}")
            questions.append(Question(subject, row[0], row[1:5], answer))
    return questions


def _csv_files(directory: Path, split: str) -> dict[str, Path]:
    suffix = f"_{split}.csv"
    files = {}
    for folder in (directory / split, directory):
        if folder.is_dir():
            for path in sorted(folder.glob(f"*{suffix}")):
                files.setdefault(path.name[: -len(suffix)], path)
    return files


def load_mmlu(
    source: str, split: str | None = None, subjects: Sequence[str] | None = None
) -> tuple[dict[str, list[Question]], dict[str, list[Question]], str]:
    """(dev exemplars by subject, eval questions by subject, the eval split used).

    `source` is a directory in the hendrycks layout (`dev/<subject>_dev.csv` and `<split>/<subject>_<split>.csv`,
    or all files flat in one directory) or the hub dataset `cais/mmlu`. `split=None` takes the first of test, val
    present. `subjects` restricts to those subjects.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        dev, questions, split = _load_dir(path, split)
    elif source.rstrip("/") == HUB_NAME or (source.count("/") == 1 and not source.startswith((".", "/", "~"))):
        dev, questions, split = _load_hub(source, split)
    else:
        raise EvalError(
            f"MMLU data not found: {source!r} is not a directory.{demo_hint(source)} Pass a directory in the "
            "hendrycks CSV layout (dev/<subject>_dev.csv and test/<subject>_test.csv) or the hub name cais/mmlu."
        )
    if subjects:
        unknown = sorted(set(subjects) - set(questions))
        if unknown:
            raise EvalError(f"MMLU subjects {unknown} are not in {source!r}; available: {sorted(questions)[:10]}...")
        questions = {s: questions[s] for s in subjects}
    return dev, questions, split


def _load_dir(path: Path, split: str | None) -> tuple[dict[str, list[Question]], dict[str, list[Question]], str]:
    dev_files = _csv_files(path, "dev")
    if not dev_files:
        raise EvalError(
            f"MMLU directory {str(path)!r} has no dev files (<subject>_dev.csv, in {path}/dev/ or {path}/): the "
            "5-shot exemplars come from them. Use the hendrycks layout (dev/, val/, test/ with "
            "<subject>_<split>.csv, no header)."
        )
    candidates = [split] if split else list(EVAL_SPLITS)
    for name in candidates:
        eval_files = _csv_files(path, name)
        if eval_files:
            split = name
            break
    else:
        raise EvalError(
            f"MMLU directory {str(path)!r} has no {' or '.join(candidates)} files (<subject>_<split>.csv); pass "
            "`--mmlu_split` naming a split that is there."
        )
    missing_dev = sorted(set(eval_files) - set(dev_files))
    if missing_dev:
        raise EvalError(f"MMLU directory {str(path)!r}: subjects {missing_dev} have {split} files but no dev file.")
    dev = {subject: read_csv(dev_files[subject], subject) for subject in eval_files}
    questions = {subject: read_csv(file, subject) for subject, file in sorted(eval_files.items())}
    return dev, questions, split


def _load_hub(source: str, split: str | None) -> tuple[dict[str, list[Question]], dict[str, list[Question]], str]:
    split = split or "test"
    hub_split = "validation" if split == "val" else split
    try:
        import datasets

        loaded = datasets.load_dataset(source, "all")
    except Exception as err:
        raise EvalError(
            f"Could not load the hub dataset {source!r} ({type(err).__name__}: {err}). Pass a local directory in the "
            "hendrycks CSV layout instead, or allow hub access (unset HF_DATASETS_OFFLINE)."
        ) from err

    def grouped(rows: Any) -> dict[str, list[Question]]:
        out: dict[str, list[Question]] = defaultdict(list)
        for row in rows:
            out[row["subject"]].append(Question(row["subject"], row["question"], list(row["choices"]), row["answer"]))
        return dict(sorted(out.items()))

    if "dev" not in loaded or hub_split not in loaded:
        raise EvalError(f"Hub dataset {source!r} lacks a 'dev' or {hub_split!r} split (has {list(loaded)}).")
    return grouped(loaded["dev"]), grouped(loaded[hub_split]), split


def flatten(questions: dict[str, list[Question]]) -> list[Question]:
    return [q for subject in sorted(questions) for q in questions[subject]]


# --- scoring ----------------------------------------------------------------------------------------------------


def score(predictions: Sequence[int], questions: Sequence[Question]) -> dict[str, Any]:
    """`accuracy` (micro: over questions), `accuracy_macro` (mean of per-subject accuracies), `n`, and
    `subjects`: {subject: {"accuracy", "n"}}."""
    per_subject: dict[str, list[bool]] = defaultdict(list)
    for predicted, question in zip(predictions, questions, strict=True):
        per_subject[question.subject].append(predicted == question.answer)
    n = len(questions)
    subjects = {s: {"accuracy": sum(v) / len(v), "n": len(v)} for s, v in sorted(per_subject.items())}
    return {
        "accuracy": sum(sum(v) for v in per_subject.values()) / n if n else 0.0,
        "accuracy_macro": sum(s["accuracy"] for s in subjects.values()) / len(subjects) if subjects else 0.0,
        "n": n,
        "subjects": subjects,
    }


_LETTER_PATTERN = re.compile(r"\b([ABCD])\b")


def letter_from_completion(completion: str) -> int | None:
    """The first standalone A-D in a free-form completion (for scoring predictions made elsewhere)."""
    match = _LETTER_PATTERN.search(completion)
    return LETTERS.index(match.group(1)) if match else None


def evaluate_mmlu(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dev: dict[str, list[Question]],
    questions: Sequence[Question],
    *,
    num_fewshot: int = 5,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score every question by log-likelihood; returns (metrics, per-question samples)."""
    prompts = [build_prompt(q, dev.get(q.subject, []), num_fewshot) for q in questions]
    requests = [(prompt, f" {letter}") for prompt in prompts for letter in LETTERS]
    scores = loglikelihood(model, tokenizer, requests, batch_size=batch_size, progress=progress, desc="mmlu")
    predictions = []
    for i in range(len(questions)):
        row = scores[4 * i : 4 * i + 4]
        predictions.append(max(range(4), key=lambda k: row[k]))  # ties go to the earlier letter, as lm-eval's argmax
    metrics = score(predictions, questions)
    samples = [
        {
            "subject": q.subject,
            "question": q.question,
            "prompt": prompt,
            "completion": LETTERS[p],
            "reference": LETTERS[q.answer],
            "correct": p == q.answer,
            "loglikelihoods": scores[4 * i : 4 * i + 4],
        }
        for i, (q, prompt, p) in enumerate(zip(questions, prompts, predictions))
    ]
    return metrics, samples
