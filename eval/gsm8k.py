"""GSM8K: generative grade-school math, graded by the final number, compatible with lm-evaluation-harness `gsm8k`.

Prompts: "Question: {q}\\nAnswer:" preceded by k exemplars "Question: {q}\\nAnswer: {worked solution}\\n\\n" from the
train split (lm-eval `gsm8k` v3, with its `first_n` sampler: the first k train records, skipping the question
itself), or, for instruction-tuned models, the question alone as a user turn rendered by the chat template
(0-shot). Greedy decoding, stopping at "Question:", "</s>" or "<|im_end|>".

Two extractions, both reported: strict takes the number after the first "#### ", flexible takes the last number in
the text (lm-eval's regexes). `grade` is the one grader: the eval, the GRPO reward and the rejection-sampling filter
all import it, so "correct" means the same thing everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from eval.data import EvalError
from eval.generation import generate
from recipes.common.errors import demo_hint
from recipes.common.files import read_jsonl

# lm-eval's strict pattern is "#### (\-?[0-9\.\,]+)"; this one also takes "#### $5" and "#### +5", which the
# grader's normalisation would call equal to 5 anyway.
STRICT_PATTERN = re.compile(r"#### (\$?[+\-]?\$?[0-9\.\,]+)")
FLEXIBLE_PATTERN = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
STOP_SEQUENCES = ("Question:", "</s>", "<|im_end|>")
HUB_NAME = "openai/gsm8k"
MODES = ("strict", "flexible")


def extract_strict(text: str) -> str | None:
    """The number after the first "#### " (lm-eval "strict-match", also allowing a `$` or "+"), or None."""
    match = STRICT_PATTERN.search(text)
    return match.group(1).strip() if match else None


def extract_flexible(text: str) -> str | None:
    """The last number in the text (lm-eval "flexible-extract"), or None.

    lm-eval's regex also matches runs of punctuation such as "..."; those carry no number and are skipped here, so
    "42 ..." extracts 42 where lm-eval would extract "..." and grade it wrong.
    """
    for groups in reversed(FLEXIBLE_PATTERN.findall(text)):
        candidate = next(g for g in groups if g).strip()
        if any(ch.isdigit() for ch in candidate):
            return candidate
    return None


def normalize_number(text: str) -> str:
    """Canonical form of an extracted answer: no commas, `$`, surrounding spaces, trailing periods or leading "+",
    and numerically equal values spelled alike ("1,000.00" -> "1000", "-0" -> "0", "+5" -> "5")."""
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".").strip()
    cleaned = cleaned.removeprefix("+")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return cleaned.lower()
    if not value.is_finite():
        return cleaned.lower()
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def reference_answer(reference: str) -> str:
    """The final answer of a GSM8K reference: the text after the last "####", or the whole string when it is a bare
    number. Not normalised (see `normalize_number`)."""
    if "####" in reference:
        return reference.rsplit("####", 1)[1].strip()
    return reference.strip()


def extract(completion: str, mode: str = "flexible") -> str | None:
    if mode == "strict":
        return extract_strict(completion)
    if mode == "flexible":
        return extract_flexible(completion)
    raise ValueError(f"Unknown GSM8K grading mode {mode!r}: use one of {MODES}.")


def grade(completion: str, reference: str, mode: str = "flexible") -> bool:
    """True when the completion's answer equals the reference's final answer.

    `reference` is a GSM8K solution ending in "#### N", or just N. `mode` is "flexible" (last number in the
    completion; the default, and what `eval/gsm8k/accuracy` reports) or "strict" (the number after "#### ", which
    also rewards the answer format). Commas, `$`, a trailing period and a leading "+" are ignored, and numbers
    compare by value.
    """
    predicted = extract(completion, mode)
    if predicted is None:
        return False
    expected = normalize_number(reference_answer(reference))
    return expected != "" and normalize_number(predicted) == expected


def completion_text(completion: Any) -> str:
    """The text of a completion as TRL passes it: a string, or a conversational list of messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, (list, tuple)):
        return "".join(completion_text(message) for message in completion)
    return str(completion)


def correctness_reward(
    prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[str], mode: str = "flexible", **kwargs: Any
) -> list[float]:
    """A TRL GRPO reward: 1.0 when `grade` says correct, else 0.0 (`answer` is the dataset's reference column)."""
    return [float(grade(completion_text(c), ref, mode)) for c, ref in zip(completions, answer, strict=True)]


# --- data -------------------------------------------------------------------------------------------------------


def _check_records(records: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    for index, record in enumerate(records):
        missing = [name for name in ("question", "answer") if not isinstance(record.get(name), str)]
        if missing:
            raise EvalError(
                f"{where}: record {index} lacks string field(s) {missing}; GSM8K records need 'question' and "
                "'answer' (a worked solution ending in '#### N')."
            )
    return records


def _looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.endswith((".jsonl", ".json")) or source.count("/") != 1


def load_gsm8k(source: str, split: str = "test") -> list[dict[str, Any]]:
    """GSM8K records ({"question", "answer", ...}) from a .jsonl file, a directory holding `<split>.jsonl`, or a
    hub dataset name (`openai/gsm8k`, config `main`)."""
    path = Path(source).expanduser()
    if path.is_file():
        return _check_records(read_jsonl(path, required=("question", "answer")), str(path))
    if path.is_dir():
        split_file = path / f"{split}.jsonl"
        if not split_file.is_file():
            found = sorted(p.name for p in path.iterdir())[:10]
            raise EvalError(
                f"GSM8K directory {str(path)!r} has no {split}.jsonl (found {found}); pass the .jsonl file itself "
                "or a directory with <split>.jsonl."
            )
        return _check_records(read_jsonl(split_file, required=("question", "answer")), str(split_file))
    if _looks_local(source):
        raise EvalError(
            f"GSM8K data not found: {source!r} is neither a file nor a directory.{demo_hint(source)} Pass a GSM8K "
            "jsonl file, a directory with <split>.jsonl, or the hub name openai/gsm8k."
        )
    try:
        import datasets

        dataset = datasets.load_dataset(source, "main", split=split)
    except Exception as err:  # offline, unknown name, no such split: all need the same fix
        raise EvalError(
            f"Could not load GSM8K split {split!r} from the hub dataset {source!r} ({type(err).__name__}: {err}). "
            "Pass a local jsonl file instead, or allow hub access (unset HF_DATASETS_OFFLINE)."
        ) from err
    return _check_records([dict(row) for row in dataset], f"{source}[{split}]")


def default_fewshot_source(source: str) -> str | None:
    """Where the exemplars come from by default: `train.jsonl` beside a test file or in the directory, or the hub
    dataset's train split."""
    path = Path(source).expanduser()
    if path.is_file():
        sibling = path.with_name("train.jsonl")
        return str(sibling) if sibling.is_file() and sibling != path else None
    if path.is_dir():
        return str(path / "train.jsonl") if (path / "train.jsonl").is_file() else None
    return None if _looks_local(source) else source


# --- prompts ----------------------------------------------------------------------------------------------------


def format_question(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def fewshot_prompt(question: str, exemplars: Sequence[dict[str, Any]], num_fewshot: int = 5) -> str:
    """lm-eval's gsm8k prompt: k solved exemplars, then the question. Exemplars equal to the question are skipped."""
    shots = [ex for ex in exemplars if ex["question"] != question][:num_fewshot]
    if len(shots) < num_fewshot:
        raise EvalError(f"GSM8K {num_fewshot}-shot needs {num_fewshot} exemplars, got {len(shots)}.")
    context = "".join(f"{format_question(ex['question'])} {ex['answer']}\n\n" for ex in shots)
    return context + format_question(question)


def chat_prompt(tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    """The question as one user turn, rendered by the tokenizer's chat template with the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise EvalError(
            "GSM8K chat variant asked for, but the tokenizer has no chat template. Use the k-shot variant "
            "(`--gsm8k_chat false`), or a tokenizer with a chat template (an instruct model's)."
        )
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def build_prompts(
    records: Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase | None = None,
    exemplars: Sequence[dict[str, Any]] | None = None,
    num_fewshot: int = 5,
    chat: bool = False,
) -> list[str]:
    if chat:
        if tokenizer is None:
            raise EvalError("The GSM8K chat variant needs a tokenizer (for its chat template).")
        return [chat_prompt(tokenizer, r["question"]) for r in records]
    if num_fewshot > 0 and not exemplars:
        raise EvalError(
            f"GSM8K {num_fewshot}-shot needs exemplars from a train split and none were found: pass "
            "`--gsm8k_fewshot PATH` (GSM8K-layout train jsonl), or use `--num_fewshot 0` or the chat variant."
        )
    return [fewshot_prompt(r["question"], exemplars or [], num_fewshot) for r in records]


# --- scoring ----------------------------------------------------------------------------------------------------


def score(completions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """GSM8K metrics under their stable names: `exact_match_strict`, `exact_match_flexible`, `accuracy`
    (= flexible), `n`."""
    if len(completions) != len(references):
        raise ValueError(f"{len(completions)} completions for {len(references)} references.")
    n = len(completions)
    strict = sum(grade(c, r, "strict") for c, r in zip(completions, references))
    flexible = sum(grade(c, r, "flexible") for c, r in zip(completions, references))
    return {
        "exact_match_strict": strict / n if n else 0.0,
        "exact_match_flexible": flexible / n if n else 0.0,
        "accuracy": flexible / n if n else 0.0,
        "n": n,
    }


def evaluate_gsm8k(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[dict[str, Any]],
    *,
    exemplars: Sequence[dict[str, Any]] | None = None,
    num_fewshot: int = 5,
    chat: bool = False,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Generate greedily for each record and grade; returns (metrics, per-record samples)."""
    prompts = build_prompts(records, tokenizer, exemplars, num_fewshot, chat)
    outputs = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        stop=STOP_SEQUENCES,
        progress=progress,
        desc="gsm8k",
    )
    completions = [out[0].text for out in outputs]
    metrics = score(completions, [r["answer"] for r in records])
    samples = [
        {
            "question": record["question"],
            "prompt": prompt,
            "completion": completion,
            "reference": reference_answer(record["answer"]),
            "extracted_strict": extract_strict(completion),
            "extracted_flexible": extract_flexible(completion),
            "correct_strict": grade(completion, record["answer"], "strict"),
            "correct_flexible": grade(completion, record["answer"], "flexible"),
        }
        for record, prompt, completion in zip(records, prompts, completions)
    ]
    return metrics, samples
