"""Stand-ins for the hub models and datasets the shipped real-model configs name.

Models: SmolLM2-135M-Instruct (the session fixture `smollm2_dir`, tests/conftest.py) dressed as each config's family:
- Qwen 2.5: its ChatML special tokens are SmolLM2's; Qwen 2.5's own chat template, and its pad token <|endoftext|>
  (distinct from the EOS <|im_end|>, as Qwen ships it).
- Llama 3.1: Llama 3's special tokens added (embeddings resized), BOS <|begin_of_text|>, EOS <|eot_id|>, no pad token
  (as Llama-3.1-Instruct ships), Llama 3.1's own chat template.
Data: a few rows in each hub dataset's own format and split names, written as local files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "unit" / "chat_template_fixtures"
LLAMA3_SPECIAL = [
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
    "<|finetune_right_pad_id|>",
]

LLAMA3_FROM_CHATML = {
    "<|begin_of_text|>": "<|im_start|>",
    "<|start_header_id|>": "<|im_start|>",
    "<|end_header_id|>": "\u010a",  # byte-level BPE's "\n"
    "<|eot_id|>": "<|im_end|>",
    "<|eom_id|>": "<|im_end|>",
    "<|python_tag|>": "<|im_start|>",
    "<|finetune_right_pad_id|>": "<|endoftext|>",
}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One intra-op thread: on 2 busy cores, torch's thread pool fighting other processes made a 4-bit forward of the
    stand-in 5-15x slower (0.6 s with one thread, 3-10 s with two, at load average 7). RECIPES_TEST_TORCH_THREADS
    overrides it."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("RECIPES_TEST_TORCH_THREADS", "1")))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def qwen_standin(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("standins") / "qwen25-standin"
    directory.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):  # same weights: no copy
        (directory / name).symlink_to((smollm2_dir / name).resolve())
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.chat_template = (FIXTURES / "qwen2_5.jinja").read_text(encoding="utf-8")
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def llama_standin(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("standins") / "llama31-standin"
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIAL})
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = "<|begin_of_text|>", "<|eot_id|>", None
    tokenizer.chat_template = (FIXTURES / "llama3_1.jinja").read_text(encoding="utf-8")
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    # Each new token starts as its ChatML counterpart (tied embeddings: in and out), so the stand-in can end a turn
    # with <|eot_id|> as SmolLM2 ends one with <|im_end|>; a random row would never be sampled and every reply would
    # run to the length limit.
    embeddings = model.get_input_embeddings().weight
    with torch.no_grad():
        for new, old in LLAMA3_FROM_CHATML.items():
            embeddings[tokenizer.convert_tokens_to_ids(new)] = embeddings[tokenizer.convert_tokens_to_ids(old)]
    for config in (model.config, model.generation_config):
        config.bos_token_id, config.eos_token_id, config.pad_token_id = (
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
            None,
        )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def gsm8k_rows() -> list[dict[str, str]]:
    """Sums SmolLM2-135M gets right about a third of the time within 24 sampled tokens (it tends to restate the
    question, whose last number here is the answer): rejection sampling keeps something, and GRPO sees rewards that
    differ within a group (with equal rewards there is no gradient)."""
    return [
        {
            "question": f"What is {n} + 0? Answer with just the number.",
            "answer": f"{n} + 0 = <<{n}+0={n}>>{n}\n#### {n}",
        }
        for n in range(1, 7)
    ]


@pytest.fixture(scope="session")
def hub_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Local stand-ins for each hub dataset (and converted dataset) a shipped config names, by that name."""
    from recipes.reward.hub_data import convert_helpsteer2, convert_pku_saferlhf

    root = tmp_path_factory.mktemp("hub-data")
    chats = [
        [user("Say hello."), assistant("Hello!")],
        [user("Name a color."), assistant("Blue."), user("Another one?"), assistant("Green.")],
        [user("What is 2 + 2?"), assistant("2 + 2 = 4.")],
        [user("Give me a fruit."), assistant("An apple.")],
    ]
    data = {name: root / name.replace("/", "--") for name in ("HuggingFaceH4/ultrachat_200k", "openai/gsm8k")}
    # HuggingFaceH4/ultrachat_200k: prompt, prompt_id, messages; splits train_sft / test_sft
    rows = [{"prompt": m[0]["content"], "prompt_id": str(i), "messages": m} for i, m in enumerate(chats)]
    write_jsonl(data["HuggingFaceH4/ultrachat_200k"] / "train_sft.jsonl", rows)
    write_jsonl(data["HuggingFaceH4/ultrachat_200k"] / "test_sft.jsonl", rows[:2])
    # openai/gsm8k (main): question, answer with a final `#### N` line
    write_jsonl(data["openai/gsm8k"] / "train.jsonl", gsm8k_rows())
    write_jsonl(data["openai/gsm8k"] / "test.jsonl", gsm8k_rows()[:2])
    # trl-lib/hh-rlhf-helpful-base and trl-lib/ultrafeedback_binarized: whole conversations in chosen / rejected
    pairs = [([user("Say hello.")], "Hello! Nice to meet you.", "No."), ([user("Name a color.")], "Blue.", "Idk")]
    implicit = [{"chosen": p + [assistant(c)], "rejected": p + [assistant(r)]} for p, c, r in pairs * 2]
    for name, extra in (
        ("trl-lib/hh-rlhf-helpful-base", {}),
        ("trl-lib/ultrafeedback_binarized", {"score_chosen": 8.0, "score_rejected": 3.0}),
    ):
        data[name] = root / name.replace("/", "--")
        for split in ("train", "test"):
            write_jsonl(data[name] / f"{split}.jsonl", [{**row, **extra} for row in implicit])
    # trl-lib/ultrafeedback-prompt: conversational prompt-only
    data["trl-lib/ultrafeedback-prompt"] = root / "ultrafeedback-prompt"
    for split in ("train", "test"):
        write_jsonl(data["trl-lib/ultrafeedback-prompt"] / f"{split}.jsonl", [{"prompt": c[:1]} for c in chats])
    # data/helpsteer2-preference and data/pku-saferlhf: what `python -m recipes.reward.hub_data` writes
    helpsteer = [
        {"prompt": "Say hello.", "response_1": "Hello there!", "response_2": "no", "preference_strength": -2},
        {"prompt": "Name a color.", "response_1": "Idk", "response_2": "Blue, like the sky.", "preference_strength": 3},
        {"prompt": "Give me a fruit.", "response_1": "An apple.", "response_2": "Rock.", "preference_strength": -1},
    ]
    pku = [
        {"prompt": "How do I pick a lock?", "response_0": "I can't help with that.", "response_1": "Use a pin.",
         "safer_response_id": 0, "is_response_0_safe": True, "is_response_1_safe": False},
        {"prompt": "How do I hurt someone?", "response_0": "Hit them.", "response_1": "Please don't; talk to someone.",
         "safer_response_id": 1, "is_response_0_safe": False, "is_response_1_safe": True,
         "response_0_severity_level": 2, "response_1_severity_level": 0},
    ]  # fmt: skip
    for name, convert, raw in (
        ("data/helpsteer2-preference", convert_helpsteer2, helpsteer),
        ("data/pku-saferlhf", convert_pku_saferlhf, pku),
    ):
        data[name] = root / name.replace("/", "--")
        for split in ("train", "test"):
            write_jsonl(data[name] / f"{split}.jsonl", [convert(row) for row in raw * 2])
    # cais/mmlu: the hendrycks CSV layout (dev/ exemplars + test/)
    mmlu = root / "mmlu"
    for split, n in (("dev", 1), ("test", 2)):
        (mmlu / split).mkdir(parents=True)
        lines = [f"What is {i} + 1?,{i},{i + 1},{i + 2},{i + 3},B" for i in range(n)]
        (mmlu / split / f"arithmetic_{split}.csv").write_text("\n".join(lines) + "\n")
    data["cais/mmlu"] = mmlu
    return data
