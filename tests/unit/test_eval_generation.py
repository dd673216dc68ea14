"""Batched generation and log-likelihood agree with one-at-a-time, unpadded computation, in the caller's order."""

from __future__ import annotations

import pytest
import torch

from eval.generation import encode, generate, loglikelihood, score_token_ids
from eval.testing import build_char_tokenizer, build_tiny_model

PROMPTS = [
    "Question: Tom has 3 apples and buys 4 more. How many now?\nAnswer:",
    "Hi",
    "A medium sized prompt here:",
    "Question: 12 - 5 = ?\nAnswer:",
    "x",
]


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_char_tokenizer()
    return build_tiny_model(tokenizer, seed=1), tokenizer


def test_batched_greedy_equals_one_at_a_time(tiny) -> None:
    model, tokenizer = tiny
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=3, progress=False)
    for prompt, out in zip(PROMPTS, batched):
        single = generate(model, tokenizer, [prompt], max_new_tokens=12, batch_size=1, progress=False)[0][0]
        assert out[0].text == single.text
        assert out[0].token_ids == single.token_ids
        assert out[0].prompt_ids == encode(tokenizer, prompt)


def test_limit_stop_strings_and_samples(tiny) -> None:
    model, tokenizer = tiny
    free = generate(model, tokenizer, PROMPTS[:2], max_new_tokens=8, progress=False)
    assert all(out[0].hit_limit and len(out[0].token_ids) == 8 for out in free)
    # Any text the model produces becomes a stop string: the output is cut before it and is not "hit limit".
    stop = free[0][0].text[2:4]
    stopped = generate(model, tokenizer, PROMPTS[:1], max_new_tokens=8, stop=[stop], progress=False)[0][0]
    assert stopped.text == free[0][0].text[: free[0][0].text.find(stop)]
    assert not stopped.hit_limit
    sampled = generate(
        model, tokenizer, PROMPTS, max_new_tokens=6, do_sample=True, num_return_sequences=3, seed=0, progress=False
    )
    assert [len(group) for group in sampled] == [3] * len(PROMPTS)
    again = generate(
        model, tokenizer, PROMPTS, max_new_tokens=6, do_sample=True, num_return_sequences=3, seed=0, progress=False
    )
    assert [[c.text for c in g] for g in sampled] == [[c.text for c in g] for g in again]  # seeded
    with pytest.raises(ValueError, match="do_sample"):
        generate(model, tokenizer, PROMPTS, num_return_sequences=2, progress=False)


def _naive_loglik(model, tokenizer, context: str, continuation: str) -> float:
    context_ids = encode(tokenizer, context)
    whole = encode(tokenizer, context + continuation)
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return sum(logprobs[t - 1, whole[t]].item() for t in range(len(context_ids), len(whole)))


def test_batched_loglikelihood_equals_naive(tiny) -> None:
    model, tokenizer = tiny
    requests = [(p, c) for p in PROMPTS for c in (" A", " B", " yes please")]
    batched = loglikelihood(model, tokenizer, requests, batch_size=4, progress=False)
    naive = [_naive_loglik(model, tokenizer, p, c) for p, c in requests]
    assert batched == pytest.approx(naive, abs=1e-4)
    # The context's trailing space moves to the continuation, as lm-eval does.
    assert loglikelihood(model, tokenizer, [("Answer: ", "B")], progress=False)[0] == pytest.approx(
        _naive_loglik(model, tokenizer, "Answer:", " B"), abs=1e-4
    )


def test_score_token_ids_rejects_empty_continuation(tiny) -> None:
    model, _ = tiny
    with pytest.raises(ValueError, match="empty continuation"):
        score_token_ids(model, [([1, 2], [])], progress=False)


def test_four_bit_model_generates_and_scores(tiny) -> None:
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from eval.loading import four_bit_kwargs

    model, tokenizer = tiny
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        quantized = AutoModelForCausalLM.from_pretrained(directory, **four_bit_kwargs("cpu"))
    assert getattr(quantized, "is_loaded_in_4bit", False)
    out = generate(quantized, tokenizer, PROMPTS[:2], max_new_tokens=5, progress=False)
    assert all(len(group[0].token_ids) == 5 for group in out)
    scores = loglikelihood(quantized, tokenizer, [("Answer:", " A"), ("Answer:", " B")], progress=False)
    full = loglikelihood(model, tokenizer, [("Answer:", " A"), ("Answer:", " B")], progress=False)
    assert scores == pytest.approx(full, abs=0.5)  # NF4 moves the numbers a little, not a lot


def test_checkpoint_generation_config_does_not_leak_in() -> None:
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer, seed=1)
    greedy = generate(model, tokenizer, PROMPTS[:2], max_new_tokens=8, progress=False)
    sampled = generate(model, tokenizer, PROMPTS[:2], max_new_tokens=8, do_sample=True, seed=0, progress=False)
    # A checkpoint shipping sampling defaults must change neither greedy decoding nor "a sample from the policy".
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.top_k = 3
    model.generation_config.temperature = 0.3
    model.generation_config.do_sample = True
    assert [g[0].text for g in generate(model, tokenizer, PROMPTS[:2], max_new_tokens=8, progress=False)] == [
        g[0].text for g in greedy
    ]
    again = generate(model, tokenizer, PROMPTS[:2], max_new_tokens=8, do_sample=True, seed=0, progress=False)
    assert [g[0].text for g in again] == [g[0].text for g in sampled]
