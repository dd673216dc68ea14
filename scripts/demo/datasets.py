"""Assembles every demo dataset and the pretraining corpus from the template generators, and writes them.

Each component draws from its own `random.Random(f"{seed}-<name>")`, so resizing one dataset leaves the others
unchanged. Splits never share a question: math test problems, chat/unsafe test requests (by core) and MMLU test
questions are held out from every train split and from the pretraining corpus (MMLU *facts* are in the corpus on
purpose, as plain sentences).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from .conversations import (
    NEEDLESS_REFUSALS,
    UNHELPFUL,
    ChatItem,
    UnsafeItem,
    benign_prompt,
    borderline_items,
    chat_items,
    compliance,
    refusal,
    split_by_core,
    unsafe_items,
    unsafe_prompt,
)
from .facts import MMLU_SUBJECTS, build_mmlu, fact_sentences, mc_prompt, write_csv
from .math_problems import MathProblem, arithmetic_facts, generate_math

# Share of SFT math replies that give only the final line "#### N", as many real SFT mixes do. The tiny model
# cannot do a two-step sum in its head, so an answer-only reply is usually wrong. The SFT policy samples either kind
# about equally, but greedy decoding picks the bare answer (one first token against many ways to start a worked
# one); learning to work the problem out is what RL can teach in CPU minutes.
ANSWER_ONLY_SHARE = 0.5
# Copies of the arithmetic table (`arithmetic_facts`) in the pretraining corpus, about 4% of its tokens.
ARITHMETIC_DRILLS = 8
RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better")


@dataclass(frozen=True)
class DemoSizes:
    math_train_per_level: int = 1400
    math_test_per_level: int = 100
    sft_train: int = 3000
    sft_test: int = 300
    preferences_train: int = 2000
    preferences_test: int = 400
    safety_train: int = 1200
    safety_test: int = 300
    prompts_train: int = 1000
    prompts_test: int = 200
    mmlu_test_per_subject: int = 60


@dataclass
class DemoData:
    math: dict[str, list[dict]]
    sft: dict[str, list[dict]]
    preferences: dict[str, list[dict]]
    safety: dict[str, list[dict]]
    prompts: dict[str, list[dict]]
    mmlu_dev: dict[str, list[list[str]]]
    mmlu_test: dict[str, list[list[str]]]
    corpus: list[str] = field(default_factory=list)  # pretraining documents (train splits only)
    heldout: list[str] = field(default_factory=list)  # same style, from test splits: for the held-out loss

    def sizes(self) -> dict[str, dict[str, int]]:
        sizes = {
            name: {split: len(rows) for split, rows in getattr(self, name).items()}
            for name in ("math", "sft", "preferences", "safety", "prompts")
        }
        sizes["mmlu"] = {"dev": sum(map(len, self.mmlu_dev.values())), "test": sum(map(len, self.mmlu_test.values()))}
        sizes["corpus"] = {"documents": len(self.corpus)}
        return sizes


def _user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def _assistant(content: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": content}]


def qa_text(question: str, answer: str) -> str:
    """The raw-text math format of the corpus and of base-model evaluation prompts."""
    return f"Question: {question}\nAnswer: {answer}"


def _gibberish(rng: random.Random, text: str) -> str:
    words = re.sub(r"[\d#]+", "", text).split()
    rng.shuffle(words)
    return " ".join(words[: max(4, len(words) // 2)]) or "banana banana banana"


def math_pair(rng: random.Random, problem: MathProblem, rating: str, off_topic: list[ChatItem]) -> tuple[str, str]:
    """(chosen, rejected) for a math problem; how much better chosen is matches `rating`."""
    good = problem.solution()
    if rating == "significantly_better":
        kind = rng.randrange(3)
        if kind == 0:
            return good, rng.choice(off_topic).answer
        return good, _gibberish(rng, good) if kind == 1 else "I don't know how to solve this."
    if rating == "better":  # plausible work, one wrong intermediate result carried to a wrong final answer
        while True:
            wrong_step, delta = rng.randrange(len(problem.steps)), rng.choice([-3, -2, -1, 1, 2, 3])
            values = problem.evaluate(wrong_step, delta)
            if min(values.values()) >= 0 and values[problem.steps[-1].out] != problem.result:
                return good, problem.solution(wrong_step, delta)
    if rating == "slightly_better":  # right number, but no `####` line or no work shown
        kind = rng.randrange(3)
        if kind == 0:
            return good, problem.solution(final_line=False)
        if kind == 1:
            return good, problem.solution(final_line=False) + f"\nThe answer is {problem.result}."
        return good, f"#### {problem.result}"
    pair = [good, problem.solution(reworded=True)]
    rng.shuffle(pair)
    return pair[0], pair[1]


def chat_pair(rng: random.Random, item: ChatItem, rating: str, off_topic: list[ChatItem]) -> tuple[str, str]:
    if rating == "significantly_better":
        kind = rng.randrange(3)
        if kind == 0:
            other = rng.choice([o for o in off_topic if o.kind != item.kind])
            return item.answer, other.answer
        return item.answer, _gibberish(rng, item.answer + " " + item.wrong) if kind == 1 else "I don't know."
    if rating == "better":
        return item.answer, item.wrong
    if rating == "slightly_better":
        return item.answer, item.terse
    pair = [item.answer, item.paraphrase]
    rng.shuffle(pair)
    return pair[0], pair[1]


def preference_rows(
    rng: random.Random, n: int, problems: list[MathProblem], chats: list[ChatItem], math_share: float = 0.6
) -> list[dict]:
    rows = []
    for i in range(n):
        rating = RATINGS[i % len(RATINGS)]
        if rng.random() < math_share:
            problem = rng.choice(problems)
            prompt, (chosen, rejected), task = problem.question, math_pair(rng, problem, rating, chats), "math"
        else:
            item = rng.choice(chats)
            prompt, (chosen, rejected), task = (
                benign_prompt(rng, item.core),
                chat_pair(rng, item, rating, chats),
                "chat",
            )
        rows.append(
            {
                "prompt": _user(prompt),
                "chosen": _assistant(chosen),
                "rejected": _assistant(rejected),
                "rating": rating,
                "task": task,
            }
        )
    rng.shuffle(rows)
    return rows


def safety_rows(rng: random.Random, n: int, unsafe: list[UnsafeItem], benign: list[ChatItem]) -> list[dict]:
    rows = []
    for i in range(n):
        if i % 2 == 0:
            item = rng.choice(unsafe)
            hedged = rng.random() < 1 / 3
            row = {
                "prompt": _user(unsafe_prompt(rng, item.core)),
                "chosen": _assistant(refusal(rng, item)),
                "rejected": _assistant(compliance(rng, item, hedged)),
                "rating": "better" if hedged else "significantly_better",
                "task": "unsafe",
                "is_unsafe_prompt": True,
                "chosen_safe": True,
                "rejected_safe": False,
            }
        else:
            item = rng.choice(benign)
            needless_refusal = item.kind == "borderline" or rng.random() < 0.5
            rejected = rng.choice(NEEDLESS_REFUSALS) if needless_refusal else rng.choice([item.wrong, *UNHELPFUL])
            row = {
                "prompt": _user(benign_prompt(rng, item.core)),
                "chosen": _assistant(item.answer),
                "rejected": _assistant(rejected),
                "rating": "better" if needless_refusal else "slightly_better",
                "task": "chat",
                "is_unsafe_prompt": False,
                "chosen_safe": True,
                "rejected_safe": True,
            }
        rows.append(row)
    rng.shuffle(rows)
    return rows


def math_reply(rng: random.Random, problem: MathProblem, answer_only_share: float = ANSWER_ONLY_SHARE) -> str:
    """The worked solution, or (with probability `answer_only_share`) only its last line "#### N"."""
    return problem.solution() if rng.random() >= answer_only_share else f"#### {problem.result}"


def sft_rows(
    rng: random.Random, n: int, problems: list[MathProblem], chats: list[ChatItem], unsafe: list[UnsafeItem]
) -> list[dict]:
    n_math, n_unsafe = round(n * 0.6), round(n * 0.1)
    rows = [
        {"messages": _user(p.question) + _assistant(math_reply(rng, p)), "task": "math"}
        for p in rng.sample(problems, n_math)
    ]
    for _ in range(n - n_math - n_unsafe):
        item = rng.choice(chats)
        rows.append({"messages": _user(benign_prompt(rng, item.core)) + _assistant(item.answer), "task": "chat"})
    for _ in range(n_unsafe):
        item = rng.choice(unsafe)
        rows.append(
            {"messages": _user(unsafe_prompt(rng, item.core)) + _assistant(refusal(rng, item)), "task": "unsafe"}
        )
    rng.shuffle(rows)
    return rows


def prompt_rows(
    rng: random.Random, n: int, problems: list[MathProblem], chats: list[ChatItem], unsafe: list[UnsafeItem]
) -> list[dict]:
    n_math, n_unsafe = round(n * 0.8), round(n * 0.1)
    rows = [{"prompt": _user(p.question), "answer": p.solution(), "task": "math"} for p in rng.sample(problems, n_math)]
    rows += [
        {"prompt": _user(benign_prompt(rng, rng.choice(chats).core)), "answer": "", "task": "chat"}
        for _ in range(n - n_math - n_unsafe)
    ]
    rows += [
        {"prompt": _user(unsafe_prompt(rng, rng.choice(unsafe).core)), "answer": "", "task": "unsafe"}
        for _ in range(n_unsafe)
    ]
    rng.shuffle(rows)
    return rows


def _corpus(
    rng: random.Random, problems: list[MathProblem], chats: list[ChatItem], practice: list[tuple[str, list[str]]]
) -> list[str]:
    docs = []
    blocks = [qa_text(p.question, p.solution()) for p in problems]
    while blocks:  # 1-3 problems per document, so that the model also sees few-shot style text
        take = rng.randint(1, 3)
        docs.append("\n\n".join(blocks[:take]))
        blocks = blocks[take:]
    facts = arithmetic_facts()
    for _ in range(ARITHMETIC_DRILLS):  # each time in a new order, 12 equations a document
        rng.shuffle(facts)
        docs += ["\n".join(facts[i : i + 12]) for i in range(0, len(facts), 12)]
    sentences = fact_sentences()
    rng.shuffle(sentences)
    docs += [" ".join(sentences[i : i + 8]) for i in range(0, len(sentences), 8)]
    dialogues = [f"User: {benign_prompt(rng, item.core)}\nAssistant: {item.answer}" for item in chats]
    docs += ["\n\n".join(dialogues[i : i + 2]) for i in range(0, len(dialogues), 2)]
    docs += [mc_prompt(row, subject) for subject, row in practice]
    rng.shuffle(docs)
    return docs


def build_datasets(seed: int, sizes: DemoSizes | None = None) -> DemoData:
    """Every dataset of the demo, deterministic for `seed`."""
    sizes = sizes or DemoSizes()

    def rng(name: str) -> random.Random:
        return random.Random(f"{seed}-{name}")  # str seeds are hashed with sha512: stable across runs

    math_train, math_test = generate_math(rng("math"), sizes.math_train_per_level, sizes.math_test_per_level)
    chat_train, chat_test = split_by_core(rng("chat-split"), chat_items(rng("chat")), 0.15)
    border_train, border_test = split_by_core(rng("borderline-split"), borderline_items(), 0.25)
    unsafe_train, unsafe_test = split_by_core(rng("unsafe-split"), unsafe_items(), 0.2)
    mmlu_dev, mmlu_test, practice_rows = build_mmlu(rng("mmlu"), sizes.mmlu_test_per_subject)

    benign_train, benign_test = chat_train + border_train * 4, chat_test + border_test * 4
    r = rng("sft")
    sft = {
        "train": sft_rows(r, sizes.sft_train, math_train, benign_train, unsafe_train),
        "test": sft_rows(r, sizes.sft_test, math_test, benign_test, unsafe_test),
    }
    r = rng("preferences")
    preferences = {
        "train": preference_rows(r, sizes.preferences_train, math_train, chat_train),
        "test": preference_rows(r, sizes.preferences_test, math_test, chat_test),
    }
    r = rng("safety")
    safety = {
        "train": safety_rows(r, sizes.safety_train, unsafe_train, benign_train),
        "test": safety_rows(r, sizes.safety_test, unsafe_test, benign_test),
    }
    r = rng("prompts")
    prompts = {
        "train": prompt_rows(r, sizes.prompts_train, math_train, benign_train, unsafe_train),
        "test": prompt_rows(r, sizes.prompts_test, math_test, benign_test, unsafe_test),
    }
    r = rng("corpus")
    corpus = _corpus(r, math_train, chat_train + border_train, practice_rows)
    heldout = [qa_text(p.question, p.solution()) for p in math_test]
    heldout += [f"User: {benign_prompt(r, item.core)}\nAssistant: {item.answer}" for item in chat_test]
    return DemoData(
        math={"train": [p.record() for p in math_train], "test": [p.record() for p in math_test]},
        sft=sft,
        preferences=preferences,
        safety=safety,
        prompts=prompts,
        mmlu_dev=mmlu_dev,
        mmlu_test=mmlu_test,
        corpus=corpus,
        heldout=heldout,
    )


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_datasets(data: DemoData, data_dir: Path) -> None:
    """The layout of scripts/README.md under `data_dir` (the `data/` folder of the demo)."""
    for name in ("math", "sft", "preferences", "safety", "prompts"):
        for split, rows in getattr(data, name).items():
            write_jsonl(data_dir / name / f"{split}.jsonl", rows)
    for subject in MMLU_SUBJECTS:
        write_csv(data_dir / "mmlu" / "dev" / f"{subject}_dev.csv", data.mmlu_dev[subject])
        write_csv(data_dir / "mmlu" / "test" / f"{subject}_test.csv", data.mmlu_test[subject])
