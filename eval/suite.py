"""The suite: load and check each task's data, run the tasks on a model (or score predictions made elsewhere), and
name the metrics `eval/<task>/<metric>`.

Tasks: gsm8k, mmlu (on their own data) and length, diversity, reward (on one shared set of sampled responses: the
`prompts` file, or the GSM8K questions when none is given; `samples_per_prompt` samples each at `temperature`).

Every per-sample record names its `item`: the position of the question (prompt) in its source data, the same for
every model evaluated with the same data seed, so that results can be paired item by item (`scripts/study_ppo_vs_dpo.py`
does). The data seed picks the subset of items; the sampling seed only the samples.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from eval import diversity, gsm8k, length, mmlu, reward_kl
from eval.data import EvalError, seeded_subset
from eval.generation import generate, pad_token_id
from recipes.common.files import read_jsonl

TASKS = ("gsm8k", "mmlu", "length", "diversity", "reward")
SAMPLED_TASKS = ("length", "diversity", "reward")
DEFAULT_GSM8K = "outputs/demo/data/math"
DEFAULT_MMLU = "outputs/demo/data/mmlu"


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """Task names from "a,b" or a list, checked; unknown names fail naming the known ones."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t and t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise EvalError(f"Unknown task(s) {unknown}: choose from {', '.join(TASKS)} (comma-separated).")
    if not names:
        raise EvalError(f"No task given: choose from {', '.join(TASKS)} (comma-separated).")
    return list(dict.fromkeys(names))


def resolve_chat(gsm8k_chat: bool | None, tokenizer: PreTrainedTokenizerBase | None) -> bool:
    """None means: the chat variant when the tokenizer has a chat template (a trained chat model), else k-shot."""
    if gsm8k_chat is None:
        return bool(getattr(tokenizer, "chat_template", None))
    return gsm8k_chat


@dataclass
class Prompt:
    """One prompt of the sampled set: the user's text, and the messages when the record was conversational."""

    text: str
    messages: list[dict[str, str]] | None = None
    from_gsm8k: bool = False


@dataclass
class EvalData:
    gsm8k: list[dict[str, Any]] = field(default_factory=list)
    gsm8k_exemplars: list[dict[str, Any]] = field(default_factory=list)
    mmlu_dev: dict[str, list[mmlu.Question]] = field(default_factory=dict)
    mmlu: list[mmlu.Question] = field(default_factory=list)
    mmlu_split: str | None = None
    prompts: list[Prompt] = field(default_factory=list)
    # Positions of the items above in their source data (empty: positions in these lists).
    gsm8k_items: list[int] = field(default_factory=list)
    mmlu_items: list[int] = field(default_factory=list)
    prompt_items: list[int] = field(default_factory=list)


def subset_with_positions(items: Sequence[Any], size: int | None, seed: int) -> tuple[list[Any], list[int]]:
    """`seeded_subset` of `items`, and the positions in `items` of those picked."""
    positions = seeded_subset(range(len(items)), size, seed)
    return [items[i] for i in positions], positions


def prompt_from_record(record: dict[str, Any], where: str) -> Prompt:
    value = record.get("prompt", record.get("question"))
    if isinstance(value, str):
        return Prompt(value)
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        user_turns = [m["content"] for m in value if m.get("role") == "user"]
        return Prompt(user_turns[-1] if user_turns else value[-1]["content"], messages=list(value))
    raise EvalError(
        f"{where}: no usable prompt: needs 'prompt' (a string or a list of chat messages) or 'question' (a string)."
    )


def load_eval_data(
    tasks: Sequence[str],
    *,
    gsm8k_path: str | None = None,
    gsm8k_split: str = "test",
    gsm8k_fewshot_path: str | None = None,
    num_fewshot: int = 5,
    chat: bool = False,
    mmlu_dir: str | None = None,
    mmlu_split: str | None = None,
    prompts_path: str | None = None,
    num_samples: int | None = None,
    seed: int = 0,
) -> EvalData:
    """Load and check every task's data (before any model work), each cut to a fixed subset of `num_samples` items
    chosen by `seed` (the data seed: the same items for every model and sampling seed)."""
    data = EvalData()
    sampled = any(t in tasks for t in SAMPLED_TASKS)
    if "gsm8k" in tasks or (sampled and prompts_path is None):
        source = gsm8k_path or DEFAULT_GSM8K
        data.gsm8k, data.gsm8k_items = subset_with_positions(gsm8k.load_gsm8k(source, gsm8k_split), num_samples, seed)
        if "gsm8k" in tasks and not chat and num_fewshot > 0:
            fewshot_source = gsm8k_fewshot_path or gsm8k.default_fewshot_source(source)
            if fewshot_source is None:
                raise EvalError(
                    f"GSM8K {num_fewshot}-shot needs train-split exemplars and none sit beside {source!r} (expected "
                    "train.jsonl there): pass `--gsm8k_fewshot PATH`, `--num_fewshot 0`, or use the chat variant."
                )
            data.gsm8k_exemplars = gsm8k.load_gsm8k(fewshot_source, "train")[: num_fewshot + 1]
    if "mmlu" in tasks:
        dev, questions, data.mmlu_split = mmlu.load_mmlu(mmlu_dir or DEFAULT_MMLU, mmlu_split)
        data.mmlu_dev = dev
        data.mmlu, data.mmlu_items = subset_with_positions(mmlu.flatten(questions), num_samples, seed)
    if sampled:
        if prompts_path is not None:
            records = read_jsonl(prompts_path)
            prompts = [prompt_from_record(r, f"{prompts_path}:{i + 1}") for i, r in enumerate(records)]
            data.prompts, data.prompt_items = subset_with_positions(prompts, num_samples, seed)
        else:  # the GSM8K subset itself, under the GSM8K items' positions
            data.prompts = [Prompt(r["question"], from_gsm8k=True) for r in data.gsm8k]
            data.prompt_items = list(data.gsm8k_items)
    return data


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, chat: bool) -> str:
    """The text the model continues: the chat template over the messages (or the text as one user turn) in chat
    mode; otherwise a GSM8K question as "Question: ..\\nAnswer:" and any other prompt as it is."""
    if chat:
        messages = prompt.messages or [{"role": "user", "content": prompt.text}]
        if not getattr(tokenizer, "chat_template", None):
            raise EvalError("Chat prompts need a tokenizer with a chat template; this one has none.")
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if prompt.from_gsm8k:
        return gsm8k.format_question(prompt.text)
    if prompt.messages:
        return "\n".join(m["content"] for m in prompt.messages)
    return prompt.text


def is_checkpointing(model: torch.nn.Module) -> bool:
    # transformers 5 renamed is_gradient_checkpointing (now a deprecated alias) to is_activation_checkpointing.
    try:
        return bool(model.is_activation_checkpointing)
    except AttributeError:
        return bool(getattr(model, "is_gradient_checkpointing", False))


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode with the KV cache on for the block; afterwards the train/eval flag, `config.use_cache` and gradient
    checkpointing are as they were (generation would otherwise leave a training model in eval mode)."""
    was_training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    checkpointing = is_checkpointing(model)
    model.eval()
    if config is not None and use_cache is not None:
        config.use_cache = True
    try:
        yield
    finally:
        if config is not None and use_cache is not None:
            config.use_cache = use_cache
        if checkpointing and not is_checkpointing(model):
            model.gradient_checkpointing_enable()
        model.train(was_training)


def _resolve_embedder(embedder: Any) -> diversity.Embedder | None:
    if embedder == "auto":
        return diversity.load_embedder()
    return embedder or None


def _check_reward_setup(
    model: PreTrainedModel, reward_fns: Mapping[str, Any] | None, ref_model: PreTrainedModel | None
) -> None:
    if not reward_fns and ref_model is None and not reward_kl.has_adapter(model):
        raise EvalError(
            "Task 'reward' has nothing to measure: give reward model(s) (`--reward_model PATH`, or `reward_fns` in "
            "Python) and/or a reference for KL (`--ref_model PATH`, or a LoRA policy whose adapter can be disabled)."
        )


def normalize_reward_fns(reward_fns: Any) -> dict[str, reward_kl.RewardFn]:
    """A mapping name -> reward function; a bare callable is named "reward", a list gets "reward_<i>"."""
    if reward_fns is None:
        return {}
    if callable(reward_fns):
        return {"reward": reward_fns}
    if isinstance(reward_fns, Mapping):
        return dict(reward_fns)
    return {f"reward_{i}": fn for i, fn in enumerate(reward_fns)}


def run_tasks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str],
    data: EvalData,
    *,
    chat: bool = False,
    num_fewshot: int = 5,
    mmlu_num_fewshot: int = 5,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    samples_per_prompt: int = 4,
    temperature: float = 1.0,
    seed: int = 0,
    reward_fns: Mapping[str, reward_kl.RewardFn] | None = None,
    ref_model: PreTrainedModel | None = None,
    embedder: Any = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Run `tasks` on a model; returns {"results": {task: metrics}, "samples": {task: [records]}}."""
    tasks = parse_tasks(tasks)
    if "reward" in tasks:
        _check_reward_setup(model, reward_fns, ref_model)
    results: dict[str, Any] = {}
    samples: dict[str, list[dict[str, Any]]] = {}
    cuda_devices = list(range(torch.cuda.device_count()))
    # fork_rng: the sampling seed must not change the caller's random stream (a training run's data order, dropout).
    with eval_mode(model), torch.random.fork_rng(devices=cuda_devices):
        if "gsm8k" in tasks:
            results["gsm8k"], samples["gsm8k"] = gsm8k.evaluate_gsm8k(
                model,
                tokenizer,
                data.gsm8k,
                exemplars=data.gsm8k_exemplars,
                num_fewshot=0 if chat else num_fewshot,
                chat=chat,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                progress=progress,
            )
            completions = [record["completion"] for record in samples["gsm8k"]]
            n_tokens = length.count_tokens(tokenizer, completions) if completions else []
            for record, item, count in zip(samples["gsm8k"], data.gsm8k_items or range(len(data.gsm8k)), n_tokens):
                record.update(item=item, n_tokens=count)
        if "mmlu" in tasks:
            results["mmlu"], samples["mmlu"] = mmlu.evaluate_mmlu(
                model,
                tokenizer,
                data.mmlu_dev,
                data.mmlu,
                num_fewshot=mmlu_num_fewshot,
                batch_size=batch_size,
                progress=progress,
            )
            for record, item in zip(samples["mmlu"], data.mmlu_items or range(len(data.mmlu))):
                record["item"] = item
        sampled_tasks = [t for t in tasks if t in SAMPLED_TASKS]
        if sampled_tasks:
            rendered = [render_prompt(tokenizer, p, chat) for p in data.prompts]
            stop = gsm8k.STOP_SEQUENCES if not chat else ()
            outputs = generate(
                model,
                tokenizer,
                rendered,
                max_new_tokens=max_new_tokens,
                batch_size=max(1, batch_size // samples_per_prompt),
                do_sample=True,
                temperature=temperature,
                num_return_sequences=samples_per_prompt,
                stop=stop,
                seed=seed,
                progress=progress,
                desc="sampling",
            )
            flat = [(i, c) for i, group in enumerate(outputs) for c in group]
            texts = [c.text for _, c in flat]
            positions = data.prompt_items or list(range(len(data.prompts)))
            sample_records = [
                {"item": positions[i], "sample": k, "prompt": data.prompts[i].text, "completion": c.text,
                 "hit_limit": c.hit_limit}
                for i, group in enumerate(outputs) for k, c in enumerate(group)
            ]  # fmt: skip
            for record, n_tokens in zip(sample_records, length.count_tokens(tokenizer, texts)):
                record["n_tokens"] = n_tokens  # as `length` counts them
            if "length" in tasks:
                results["length"] = length.length_metrics(texts, tokenizer, hit_limit=[c.hit_limit for _, c in flat])
            if "diversity" in tasks:
                groups = [[c.text for c in group] for group in outputs]
                results["diversity"] = diversity.diversity_metrics(groups, _resolve_embedder(embedder))
            if "reward" in tasks:
                metrics: dict[str, Any] = {}
                prompts_text = [data.prompts[i].text for i, _ in flat]
                if reward_fns:
                    metrics, per_sample = reward_kl.reward_metrics(reward_fns, prompts_text, texts)
                    for name, values in per_sample.items():
                        for record, value in zip(sample_records, values):
                            record[f"reward/{name}"] = value
                if ref_model is not None or reward_kl.has_adapter(model):
                    kl_metrics, per_kl = reward_kl.kl_to_reference(
                        model,
                        [c.prompt_ids for _, c in flat],
                        [c.token_ids for _, c in flat],
                        ref_model=ref_model,
                        pad_id=pad_token_id(tokenizer),
                        batch_size=batch_size,
                        progress=progress,
                    )
                    metrics.update(kl_metrics)
                    for record, value in zip(sample_records, per_kl):
                        record["kl"] = value
                metrics["n"] = len(texts)
                results["reward"] = metrics
            samples["sampled"] = sample_records
    return {"results": {t: results[t] for t in tasks if t in results}, "samples": samples}


def score_predictions(
    tasks: Sequence[str],
    records: Sequence[dict[str, Any]],
    *,
    where: str = "predictions",
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_new_tokens: int | None = None,
    reward_fns: Mapping[str, reward_kl.RewardFn] | None = None,
    embedder: Any = "auto",
) -> dict[str, Any]:
    """Score completions produced elsewhere. Each record is the task's own record plus "completion": gsm8k needs
    question/answer, mmlu answer (letter or index; subject optional), reward and diversity group by prompt/question.
    Every record is checked for every task's fields before anything is scored."""
    tasks = parse_tasks(tasks)
    required = {"gsm8k": ("question", "answer"), "mmlu": ("answer",), "reward": ()}
    for line_no, record in enumerate(records, start=1):
        if not isinstance(record.get("completion"), str):
            raise EvalError(f"{where}:{line_no}: record lacks a string field 'completion' (has {sorted(record)}).")
        for task in tasks:
            missing = [name for name in required.get(task, ()) if name not in record]
            if missing:
                raise EvalError(
                    f"{where}:{line_no}: record lacks field(s) {missing} that task {task!r} needs (has "
                    f"{sorted(record)}); add them, or drop {task!r} from --tasks."
                )
            if task == "reward" and "prompt" not in record and "question" not in record:
                raise EvalError(f"{where}:{line_no}: task 'reward' needs 'prompt' or 'question' in every record.")
        if "mmlu" in tasks:
            mmlu._answer_index(record["answer"], f"{where}:{line_no}")
    if "reward" in tasks and not reward_fns:
        raise EvalError("Task 'reward' on predictions needs reward model(s): pass `--reward_model PATH`.")
    completions = [r["completion"] for r in records]
    results: dict[str, Any] = {}
    if "gsm8k" in tasks:
        results["gsm8k"] = gsm8k.score(completions, [r["answer"] for r in records])
    if "mmlu" in tasks:
        questions = [
            mmlu.Question(
                str(r.get("subject", "unknown")), str(r.get("question", "")), [], mmlu._answer_index(r["answer"], where)
            )
            for r in records
        ]
        predictions = [mmlu.letter_from_completion(c) for c in completions]
        results["mmlu"] = mmlu.score([-1 if p is None else p for p in predictions], questions)
    if "length" in tasks:
        results["length"] = length.length_metrics(completions, tokenizer, max_new_tokens=max_new_tokens)
    if "diversity" in tasks:
        groups: dict[str, list[str]] = {}
        for index, record in enumerate(records):
            key = record.get("prompt", record.get("question", f"#{index}"))
            groups.setdefault(str(key), []).append(record["completion"])
        results["diversity"] = diversity.diversity_metrics(list(groups.values()), _resolve_embedder(embedder))
    if "reward" in tasks and reward_fns:
        prompts = [prompt_from_record(r, f"{where}:{i + 1}").text for i, r in enumerate(records)]
        results["reward"], _ = reward_kl.reward_metrics(reward_fns, prompts, completions)
        results["reward"]["n"] = len(records)
    return {"results": {t: results[t] for t in tasks if t in results}, "samples": {}}


def flatten_metrics(results: Mapping[str, Mapping[str, Any]], prefix: str = "eval") -> dict[str, float]:
    """Scalar metrics as `{prefix}/<task>/<metric>`; nested values (MMLU per subject) and text are left out."""
    flat = {}
    for task, metrics in results.items():
        for name, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                continue
            flat[f"{prefix}/{task}/{name}"] = value
    return flat


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: str | Sequence[str],
    *,
    gsm8k_path: str | None = None,
    mmlu_dir: str | None = None,
    prompts_path: str | None = None,
    num_samples: int | None = None,
    max_new_tokens: int = 256,
    seed: int = 0,
    data_seed: int | None = None,
    gsm8k_chat: bool | None = None,
    num_fewshot: int = 5,
    samples_per_prompt: int = 4,
    temperature: float = 1.0,
    batch_size: int = 16,
    reward_fns: Mapping[str, reward_kl.RewardFn] | Callable | Sequence[Callable] | None = None,
    ref_model: PreTrainedModel | None = None,
    embedder: Any = "auto",
    progress: bool = False,
    data: EvalData | None = None,
    output: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Evaluate a model (e.g. at the end of training) and return scalar metrics named `eval/<task>/<metric>`.

    `num_samples` cuts each task to a fixed subset (None: all) chosen by `data_seed` (default: `seed`, which also
    seeds the sampling). `gsm8k_chat=None` picks the chat variant
    when the tokenizer has a chat template. Pass `output={}` to receive the full results and samples in it.
    """
    tasks = parse_tasks(tasks)
    chat = resolve_chat(gsm8k_chat, tokenizer)
    if data is None:
        data = load_eval_data(
            tasks,
            gsm8k_path=gsm8k_path,
            mmlu_dir=mmlu_dir,
            prompts_path=prompts_path,
            num_samples=num_samples,
            seed=seed if data_seed is None else data_seed,
            chat=chat,
            num_fewshot=num_fewshot,
        )
    full = run_tasks(
        model,
        tokenizer,
        tasks,
        data,
        chat=chat,
        num_fewshot=num_fewshot,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        samples_per_prompt=samples_per_prompt,
        temperature=temperature,
        seed=seed,
        reward_fns=normalize_reward_fns(reward_fns),
        ref_model=ref_model,
        embedder=embedder,
        progress=progress,
    )
    if output is not None:
        output.update(full)
    return flatten_metrics(full["results"])
