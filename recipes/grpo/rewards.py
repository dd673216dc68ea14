"""GRPO reward functions: verifiable math, answer format, an optional length penalty, and the combined RM reward.

TRL calls each reward as `f(prompts=..., completions=..., completion_ids=..., **columns)`, where `columns` are the
dataset's other columns (here `answer`), one entry per completion, and expects one float (or None: "no opinion",
NaN in TRL's sums) per completion. For conversational prompts a completion is a list of messages.

`correctness` grades with `grade` from `eval.gsm8k`, the very function the evaluation suite reports
`eval/gsm8k/accuracy` with (imported, not copied), so the reward and the eval agree on what "correct" means.

`build_reward_functions(names, ...)` returns the configured functions: the built-in ones by name, and your own as
"package.module:function" (importable from the working directory), each wrapped by `checked` so that a function
returning the wrong number of values, or a value that is not a finite number or None, fails with its name.
`preflight(functions, dataset, tokenizer)` calls every function once on a few dataset rows before training starts.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from numbers import Real
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from eval.gsm8k import completion_text, grade
from recipes.common.errors import UserError

RewardFunction = Callable[..., list[float | None]]
REWARD_NAMES = ("correctness", "format", "length", "rm")
# The answer format the demo's SFT data and GSM8K solutions end with: a last line "#### <number>".
FINAL_ANSWER_LINE = re.compile(r"(?:^|\n)#### -?[0-9][0-9,]*(?:\.[0-9]+)?\s*$")


class RewardFunctionError(UserError):
    """A reward function is misconfigured or returned something TRL cannot use; the message names it."""


def correctness(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]] | None = None,
    answer: Sequence[str] | None = None,
    mode: str = "flexible",
    **kwargs: Any,
) -> list[float | None]:
    """1.0 when `eval.gsm8k.grade` says the completion's final number equals the reference's, else 0.0; None for
    rows without a reference (e.g. chat prompts mixed into the data)."""
    if answer is None:
        raise RewardFunctionError("correctness needs an `answer` column (a GSM8K solution ending in '#### N').")
    return [
        float(grade(completion_text(c), ref, mode)) if ref else None for c, ref in zip(completions, answer, strict=True)
    ]


def format_reward(
    prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Sequence[int]] | None = None, **kwargs
) -> list[float]:
    """1.0 when the completion ends with the line "#### <number>" (and has no other "####"), else 0.0."""
    rewards = []
    for completion in completions:
        text = completion_text(completion).strip()
        rewards.append(float(bool(FINAL_ANSWER_LINE.search(text)) and text.count("####") == 1))
    return rewards


def length_penalty(target_tokens: int, max_tokens: int) -> RewardFunction:
    """0 up to `target_tokens` completion tokens, then falling linearly to -1 at `max_tokens`. A threshold rather
    than a per-token cost: with GRPO's per-group normalisation, any length difference inside a group of equally
    correct answers would otherwise become a full-size advantage."""
    span = max(1, max_tokens - target_tokens)

    def length(prompts, completions, completion_ids, **kwargs) -> list[float]:
        return [-min(1.0, max(0, len(ids) - target_tokens) / span) for ids in completion_ids]

    return length


def checked(function: RewardFunction, name: str) -> RewardFunction:
    """`function` under `name` (TRL logs `rewards/<name>/mean`), failing clearly on a wrong number or kind of values."""

    def reward(prompts, completions, completion_ids=None, **kwargs) -> list[float | None]:
        values = function(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        check_rewards(values, len(completions), name)
        return list(values)

    reward.__name__ = reward.__qualname__ = name
    reward.__doc__ = function.__doc__
    reward.wrapped = function
    return reward


def check_rewards(values: Any, expected: int, name: str) -> None:
    if not isinstance(values, (list, tuple)):
        raise RewardFunctionError(
            f"Reward function {name!r} returned {type(values).__name__}; it must return a list with one float (or "
            f"None) per completion ({expected} here)."
        )
    if len(values) != expected:
        raise RewardFunctionError(
            f"Reward function {name!r} returned {len(values)} values for {expected} completions; it must return "
            "exactly one float (or None) per completion, in the order of `completions`."
        )
    for index, value in enumerate(values):
        ok = value is None or (isinstance(value, Real) and math.isfinite(float(value)))
        if not ok:
            raise RewardFunctionError(
                f"Reward function {name!r} returned {value!r} for completion {index}; rewards must be finite numbers "
                "or None."
            )


def import_reward_function(reference: str) -> RewardFunction:
    """`package.module:function` -> the function."""
    module_name, _, attribute = reference.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise RewardFunctionError(
            f"Cannot import reward function {reference!r} ({type(err).__name__}: {err}). Give it as "
            "'package.module:function', importable from the working directory (or on PYTHONPATH)."
        ) from err
    if not callable(function):
        raise RewardFunctionError(f"Reward function {reference!r} is not callable.")
    return function


def build_reward_functions(
    names: Sequence[str],
    *,
    correctness_mode: str = "flexible",
    length_target_tokens: int = 0,
    max_completion_length: int = 256,
    rm_reward: RewardFunction | None = None,
) -> list[RewardFunction]:
    """The reward functions named in the config, in that order (so `reward_weights` lines up with `names`)."""
    unknown = [n for n in names if n not in REWARD_NAMES and ":" not in n]
    if unknown or not names:
        raise RewardFunctionError(
            f"Unknown reward function(s) {unknown} in `reward_functions`; choose from {list(REWARD_NAMES)} or give "
            "your own as 'package.module:function'."
            if unknown
            else f"`reward_functions` is empty; choose one or more of {list(REWARD_NAMES)}."
        )
    if len(set(names)) != len(names):
        raise RewardFunctionError(f"`reward_functions` lists a function twice: {list(names)}.")
    functions = []
    for name in names:
        if name == "correctness":

            def function(prompts, completions, completion_ids=None, answer=None, **kwargs):
                return correctness(prompts, completions, completion_ids, answer, mode=correctness_mode)

            function.__doc__ = correctness.__doc__
        elif name == "format":
            function = format_reward
        elif name == "length":
            function = length_penalty(length_target_tokens, max_completion_length)
        elif ":" in name:
            function = import_reward_function(name)
            name = name.rpartition(":")[2]
        else:
            if rm_reward is None:
                raise RewardFunctionError("`reward_functions` lists 'rm' but no reward model is configured.")
            function = rm_reward
        functions.append(checked(function, name))
    return functions


def preflight(
    functions: Sequence[RewardFunction], dataset: Dataset, tokenizer: PreTrainedTokenizerBase, rows: int = 2
) -> None:
    """Call every reward function once, the way TRL will, on `rows` dataset rows with two made-up completions each
    (the reference solution when there is one, and a non-answer), so a broken function fails before the model loads.
    """
    sample = dataset.select(range(min(rows, len(dataset))))
    columns = {k: [v for v in sample[k] for _ in range(2)] for k in sample.column_names if k != "prompt"}
    prompts = [p for p in sample["prompt"] for _ in range(2)]
    texts = [t for ref in columns.get("answer", [""] * len(prompts))[::2] for t in (ref or "42", "I am not sure.")]
    conversational = isinstance(prompts[0], list)
    completions = [[{"role": "assistant", "content": t}] if conversational else t for t in texts]
    completion_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    for function in functions:
        function(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
