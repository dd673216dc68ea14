"""AI feedback as plain functions: the constitution, the critique/revision and judge prompts, the order-averaged
preference from the judge's label log-probabilities, its mapping to Llama 2's ratings, and resumable row files.

    constitution = load_constitution("recipes/ai_feedback/constitutions/default.yaml", need_principles=True)
    label_ids = label_token_ids(tokenizer, [" A", " B"], "judge")          # one token each, else a UserError
    judged = judge_pairs(label_logprobs, prompts, responses_a, responses_b, instruction, labels)
    rating = rating_from_confidence(0.8, (0.9, 0.75, 0.6))                 # "better"

RLAIF (Lee et al. 2023) reads the judge's preference from the probabilities of the option labels after the judge
prompt, and judges each pair in both orders, averaging the two, because LM judges prefer a position; a judge that
always picks the first option then gives exactly 0.5 (no preference) for every pair.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from eval.reward_model import RATINGS
from recipes.common.errors import UserError

# Used when the constitution has no `judge_instruction` (RLAIF's preamble, for dialogue instead of summaries).
DEFAULT_JUDGE_INSTRUCTION = (
    "A good response to a user is helpful, correct, honest and harmless: it answers what was asked, gets facts and "
    "arithmetic right, and declines harmful requests. Given the user's message and two responses, say which response "
    "is better."
)
# judge_labels -> [first option, second option]; the label's text without spaces is how the prompt names the option.
LabelLogprobs = Callable[[Sequence[str]], list[tuple[float, float]]]


class AIFeedbackError(UserError):
    """A constitution, judge or data problem found before any generation; the message says how to fix it."""


# --- the constitution -----------------------------------------------------------------------------------------------


def load_constitution(path: str, need_principles: bool) -> dict[str, Any]:
    """The constitution YAML, checked: `principles` (a non-empty list of {name, critique_request, revision_request},
    needed to critique and revise) and an optional `judge_instruction` (the judge prompt's preamble)."""
    file = Path(path)
    if not file.is_file():
        raise AIFeedbackError(
            f"Constitution file not found: {path!r}. The default is recipes/ai_feedback/constitutions/default.yaml."
        )
    try:
        constitution = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise AIFeedbackError(f"Constitution {path} is not valid YAML: {err}") from err
    if not isinstance(constitution, dict):
        raise AIFeedbackError(
            f"Constitution {path} must be a mapping with a `principles` list (got {type(constitution).__name__})."
        )
    principles = constitution.get("principles") or []
    if need_principles and not principles:
        raise AIFeedbackError(
            f"Constitution {path} has no principles: add a `principles:` list, each with `name`, `critique_request` "
            "and `revision_request` (see recipes/ai_feedback/constitutions/default.yaml)."
        )
    if not isinstance(principles, list):
        raise AIFeedbackError(f"Constitution {path}: `principles` must be a list (got {type(principles).__name__}).")
    names = set()
    for i, principle in enumerate(principles):
        missing = [
            key for key in ("name", "critique_request", "revision_request")
            if not isinstance(principle, dict) or not str(principle.get(key) or "").strip()
        ]  # fmt: skip
        if missing:
            raise AIFeedbackError(f"Constitution {path}: principle {i} lacks a non-empty {', '.join(missing)}.")
        if principle["name"] in names:
            raise AIFeedbackError(
                f"Constitution {path}: two principles are named {principle['name']!r}; names must differ."
            )
        names.add(principle["name"])
    instruction = constitution.get("judge_instruction", DEFAULT_JUDGE_INSTRUCTION)
    if not isinstance(instruction, str) or not instruction.strip():
        raise AIFeedbackError(f"Constitution {path}: `judge_instruction` must be a non-empty string.")
    return {"principles": principles, "judge_instruction": instruction.strip(), "path": str(path)}


def stable_int(*parts: Any) -> int:
    """A number fixed by `parts` (a row's key and the seed): the same principle and tie-break on every relaunch."""
    return int(hashlib.sha256("/".join(str(p) for p in parts).encode()).hexdigest()[:12], 16)


def pick_principle(principles: Sequence[dict[str, Any]], key: str, seed: int) -> dict[str, Any]:
    """One principle per prompt, drawn at random (as Bai et al. do) but fixed by the prompt and the seed."""
    return principles[stable_int(key, seed, "principle") % len(principles)]


# --- critique and revision ------------------------------------------------------------------------------------------


def critique_messages(prompt: list[dict], response: str, principle: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation so far, then the principle's critique request as the user's next turn."""
    return [
        *prompt,
        {"role": "assistant", "content": response},
        {"role": "user", "content": principle["critique_request"].strip()},
    ]


def revision_messages(
    prompt: list[dict], response: str, critique: str, principle: dict[str, Any]
) -> list[dict[str, str]]:
    """The critique conversation, the critique, then the principle's revision request."""
    return [
        *critique_messages(prompt, response, principle),
        {"role": "assistant", "content": critique},
        {"role": "user", "content": principle["revision_request"].strip()},
    ]


# --- the judge ------------------------------------------------------------------------------------------------------


def label_token_ids(tokenizer: Any, labels: Sequence[str], where: str) -> list[int]:
    """The token id of each option label; each must be one token of its own (the judge's preference is the
    probability of that one next token), and the labels must differ."""
    if len(labels) != 2 or len({label.strip() for label in labels}) != 2 or any(not label.strip() for label in labels):
        raise AIFeedbackError(
            f"judge_labels must be two different non-empty labels, e.g. [' A', ' B'] (got {list(labels)})."
        )
    ids = []
    for label in labels:
        encoded = tokenizer(label, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            pieces = [tokenizer.decode([i]) for i in encoded]
            raise AIFeedbackError(
                f"The judge tokenizer ({where}) splits the label {label!r} into {len(encoded)} tokens {pieces}; the "
                "judge reads one next-token probability per option. Pick labels that are single tokens for it "
                "(`--judge_labels` e.g. ' A' ' B', 'A' 'B' or ' 1' ' 2')."
            )
        ids.append(encoded[0])
    return ids


def user_text(prompt: list[dict]) -> str:
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)


def judge_prompt(prompt: list[dict], first: str, second: str, instruction: str, labels: Sequence[str]) -> str:
    """RLAIF's judge prompt for dialogue: preamble, the conversation, the two responses under their labels, and the
    question the next token answers."""
    name_first, name_second = (label.strip() for label in labels)
    return (
        f"{instruction}\n\nConversation:\n{user_text(prompt)}\n\n"
        f"Response {name_first}: {first}\n\nResponse {name_second}: {second}\n\n"
        f"Which response is better, {name_first} or {name_second}?\nPreferred response:"
    )


def first_option_probability(logprob_first: float, logprob_second: float) -> float:
    """P(first option) from the two labels' log-probabilities, renormalised over the two labels (RLAIF)."""
    top = max(logprob_first, logprob_second)
    first, second = math.exp(logprob_first - top), math.exp(logprob_second - top)
    return first / (first + second)


def judge_pairs(
    label_logprobs: LabelLogprobs,
    prompts: Sequence[list[dict]],
    responses_a: Sequence[str],
    responses_b: Sequence[str],
    instruction: str,
    labels: Sequence[str],
) -> list[dict[str, float]]:
    """P(a better than b) per pair, averaged over the two orders: a shown first, and b shown first.

    `label_logprobs(judge prompts) -> [(log p(first label), log p(second label))]` is the judge (any causal LM, see
    `causal_lm_judge`). Returns {p_a, p_a_shown_first, p_a_shown_second} per pair.
    """
    texts = [
        judge_prompt(p, a, b, instruction, labels) for p, a, b in zip(prompts, responses_a, responses_b, strict=True)
    ]
    texts += [judge_prompt(p, b, a, instruction, labels) for p, a, b in zip(prompts, responses_a, responses_b)]
    scores = label_logprobs(texts)
    if len(scores) != len(texts):
        raise RuntimeError(f"the judge returned {len(scores)} scores for {len(texts)} judge prompts")
    n = len(prompts)
    judged = []
    for i in range(n):
        a_first = first_option_probability(*scores[i])  # a is the first option
        a_second = 1.0 - first_option_probability(*scores[n + i])  # b is the first option
        judged.append({"p_a": (a_first + a_second) / 2, "p_a_shown_first": a_first, "p_a_shown_second": a_second})
    return judged


def causal_lm_judge(model: Any, tokenizer: Any, label_ids: Sequence[int], chat: bool, batch_size: int) -> LabelLogprobs:
    """The judge as a causal LM: log p(label | judge prompt) for both labels, from one forward pass per prompt (the
    evaluation suite's batched log-likelihood). With `chat`, the judge prompt is the user's turn in the judge's chat
    template and the label is the start of its reply."""
    from eval.generation import encode, max_model_length, pad_token_id, score_token_ids

    def label_logprobs(texts: Sequence[str]) -> list[tuple[float, float]]:
        if chat:
            texts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False
                )
                for t in texts
            ]
        contexts = [encode(tokenizer, t) for t in texts]
        pairs = [(ids, [label]) for ids in contexts for label in label_ids]
        scores = score_token_ids(
            model, pairs, pad_id=pad_token_id(tokenizer), batch_size=batch_size,
            max_length=max_model_length(model, tokenizer), progress=False,
        )  # fmt: skip
        return [(scores[2 * i], scores[2 * i + 1]) for i in range(len(texts))]

    return label_logprobs


def reward_model_preferences(
    model: Any, tokenizer: Any, prompts: Sequence[list[dict]], responses_a: Sequence[str], responses_b: Sequence[str],
    batch_size: int,
) -> list[dict[str, float]]:  # fmt: skip
    """The reward model as the judge's stand-in: P(a better) = sigmoid(r(a) - r(b)), Bradley-Terry as the RM was
    trained; it sees each response alone, so there is no position to average over."""
    from recipes.common.reward import score

    n = len(prompts)
    scores = score(model, tokenizer, list(prompts) * 2, list(responses_a) + list(responses_b), batch_size=batch_size)
    judged = []
    for i in range(n):
        p_a = 1.0 / (1.0 + math.exp(-(float(scores[i]) - float(scores[n + i]))))
        judged.append({"p_a": p_a, "p_a_shown_first": p_a, "p_a_shown_second": p_a})
    return judged


def check_thresholds(thresholds: Sequence[float]) -> None:
    if (
        len(thresholds) != 3
        or not all(0.5 < t <= 1.0 for t in thresholds)
        or sorted(thresholds, reverse=True) != list(thresholds)
        or len(set(thresholds)) != 3
    ):
        raise AIFeedbackError(
            f"rating_thresholds must be three confidences, strictly decreasing, in (0.5, 1] (for significantly "
            f"better, better, slightly better; below the last: negligibly better / unsure); got {list(thresholds)}."
        )


def rating_from_confidence(confidence: float, thresholds: Sequence[float]) -> str:
    """Llama 2's four levels from the judge's confidence in the preferred response (P of it, in [0.5, 1]):
    >= thresholds[0] significantly better, >= [1] better, >= [2] slightly better, else negligibly better / unsure."""
    for rating, threshold in zip(RATINGS, thresholds):
        if confidence >= threshold:
            return rating
    return RATINGS[-1]


def preference_row(
    key: str, prompt: list[dict], a: str, b: str, judged: dict[str, float], thresholds: Sequence[float], seed: int
) -> dict[str, Any]:
    """A TRL conversational preference row with its rating. An exact tie (p_a = 0.5, e.g. a judge that only ever
    picks one position) is broken by a coin fixed by the key and the seed, so it carries no label."""
    p_a = judged["p_a"]
    a_wins = p_a > 0.5 or (p_a == 0.5 and stable_int(key, seed, "tie") % 2 == 0)
    chosen, rejected = (a, b) if a_wins else (b, a)
    confidence = max(p_a, 1.0 - p_a)
    return {
        "key": key,
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "rating": rating_from_confidence(confidence, thresholds),
        "p_chosen": confidence,
        "chosen_is_a": a_wins,
        "tie": p_a == 0.5,
        **{name: value for name, value in judged.items() if name != "p_a"},
    }


# --- resumable rows -------------------------------------------------------------------------------------------------


def read_done_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of earlier (possibly killed) runs, one JSON object per line; a line torn by a kill is dropped (and cut
    from the file, so appending starts on a fresh line)."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        path.write_text(text, encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def append_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Append finished rows and flush them to disk: a crash afterwards keeps them."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
