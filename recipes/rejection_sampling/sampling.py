"""Sampling from a policy: the transformers and vLLM samplers, the sampling model, and a round's sampling and
scoring as sharded, resumable work."""

from __future__ import annotations

import gc
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

from recipes.common.config import ConfigError
from recipes.rejection_sampling.prompts import Scorer
from recipes.rejection_sampling.selection import check_scores
from recipes.rejection_sampling.shards import run_sharded

Sampler = Callable[[Sequence[str], int, float, int], list[list[dict[str, Any]]]]


def chunk_seed(seed: int, k: int, first_key: str) -> int:
    """A seed per (round, chunk), so an interrupted chunk redone after a relaunch draws the same samples."""
    return int(hashlib.sha256(f"{seed}/{k}/{first_key}".encode()).hexdigest()[:8], 16)


def hf_sampler(model: Any, tokenizer: Any, max_new_tokens: int, batch_size: int, top_p: float) -> Sampler:
    """Sampling with transformers' `generate`, through the evaluation suite's batched generation (left padding,
    length-sorted batches, `num_return_sequences` per prompt)."""
    from eval.generation import generate
    from eval.suite import eval_mode

    def sample(prompts: Sequence[str], n: int, temperature: float, seed: int) -> list[list[dict[str, Any]]]:
        devices = list(range(torch.cuda.device_count()))
        with eval_mode(model), torch.random.fork_rng(devices=devices):
            groups = generate(
                model, tokenizer, list(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size,
                do_sample=True, temperature=temperature, top_p=top_p, num_return_sequences=n, seed=seed,
                progress=False,
            )  # fmt: skip
        return [
            [{"completion": c.text, "num_tokens": len(c.token_ids), "hit_limit": c.hit_limit} for c in group]
            for group in groups
        ]

    return sample


def vllm_sampler(
    policy_path: str, base: str | None, tokenizer: Any, max_new_tokens: int, top_p: float, load_in_4bit: bool
) -> Sampler:
    """The hook for a faster backend: vLLM on a GPU (`generation_backend: vllm`), never needed otherwise.

    The base loads once per round with the round's LoRA adapter; prompts go in as token ids (the rendered chat
    template already holds BOS). Not exercised by the CPU tests.
    """
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from eval.generation import encode

    llm = LLM(
        model=base or policy_path, tokenizer=policy_path if base else None, enable_lora=base is not None,
        quantization="bitsandbytes" if load_in_4bit else None, max_lora_rank=64, seed=0,
    )  # fmt: skip
    lora = LoRARequest("policy", 1, policy_path) if base else None

    def sample(prompts: Sequence[str], n: int, temperature: float, seed: int) -> list[list[dict[str, Any]]]:
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed)
        inputs = [{"prompt_token_ids": encode(tokenizer, p)} for p in prompts]
        outputs = llm.generate(inputs, params, lora_request=lora, use_tqdm=False)
        return [
            [
                {"completion": o.text, "num_tokens": len(o.token_ids), "hit_limit": o.finish_reason == "length"}
                for o in out.outputs
            ]
            for out in outputs
        ]

    return sample


def check_backend(backend: str) -> None:
    if backend == "hf":
        return
    if not torch.cuda.is_available():
        raise ConfigError("generation_backend: vllm needs a CUDA GPU; use `generation_backend: hf` on this machine.")
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            "generation_backend: vllm asked for, but vllm is not installed (`pip install vllm`); or use `hf`."
        ) from err


def load_generation_model(model_args: Any, policy_path: str) -> Any:
    """The policy for sampling only: the base as configured (4-bit by default) plus the round's adapter, frozen."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from recipes.common.modeling import check_model_path, keep_4bit_weights_unpacked, quantization_kwargs
    from recipes.common.policy import adapter_base

    base = adapter_base(policy_path)
    kwargs = quantization_kwargs(model_args)
    model = keep_4bit_weights_unpacked(
        AutoModelForCausalLM.from_pretrained(check_model_path(base or policy_path), **kwargs)
    )
    if "quantization_config" not in kwargs:
        model.to(PartialState().device)
    if base is not None:
        model = PeftModel.from_pretrained(model, policy_path)
    return model.eval()


def release_memory() -> None:
    """Give back what a model just dropped by the caller held (the next stage loads another)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sample_round(
    sampler: Sampler,
    prompts: Sequence[dict[str, Any]],
    k: int,
    n: int,
    temperature: float,
    seed: int,
    path: Path,
    chunk_size: int,
    state: PartialState,
) -> list[dict[str, Any]]:
    """`n` samples per prompt at `temperature`; prompts are sorted by length before sharding, so every batch holds
    similar lengths and every rank a similar load."""
    ordered = sorted(prompts, key=lambda p: (-p["num_tokens"], p["prompt_id"]))

    def work(chunk: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        groups = sampler([p["text"] for p in chunk], n, temperature, chunk_seed(seed, k, str(chunk[0]["prompt_id"])))
        return [
            [
                {
                    "round": k,
                    "prompt_id": p["prompt_id"],
                    "sample_id": j,
                    "prompt": p["user"],
                    "temperature": temperature,
                    **s,
                }
                for j, s in enumerate(group)
            ]
            for p, group in zip(chunk, groups, strict=True)
        ]

    records = run_sharded(ordered, lambda p: str(p["prompt_id"]), work, path, chunk_size, state)
    return sorted(records, key=lambda r: (r["prompt_id"], r["sample_id"]))


def score_samples(
    scorer: Scorer,
    scorer_name: str,
    samples: Sequence[dict[str, Any]],
    prompts: Sequence[dict[str, Any]],
    path: Path,
    state: PartialState,
    chunk_size: int = 256,
) -> list[dict[str, Any]]:
    """Scores for every sample (checked: one finite number each), written next to the samples in `path`."""
    by_id = {p["prompt_id"]: p for p in prompts}

    def work(chunk: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        rows = [by_id[s["prompt_id"]] for s in chunk]
        scores = check_scores(scorer(rows, [s["completion"] for s in chunk]), len(chunk), str(path), scorer_name)
        return [[{**s, "reward": score}] for s, score in zip(chunk, scores)]

    return run_sharded(list(samples), lambda s: f"{s['prompt_id']}:{s['sample_id']}", work, path, chunk_size, state)
