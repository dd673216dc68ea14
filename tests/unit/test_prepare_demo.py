"""The embedded demo builder: deterministic, well-formed data, a chat template TRL can train on, a loadable base."""

from __future__ import annotations

import csv
import importlib
import importlib.util
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "prepare_demo.py"
RATINGS = {"significantly_better", "better", "slightly_better", "negligibly_better"}
STEP_RE = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")


def _load_script():
    spec = importlib.util.spec_from_file_location("prepare_demo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # puts scripts/ on sys.path, so the `demo` package imports too
    return module


prepare_demo = _load_script()
demo_datasets = importlib.import_module("demo.datasets")
demo_facts = importlib.import_module("demo.facts")


@pytest.fixture(scope="module")
def data():
    return demo_datasets.build_datasets(0)


@pytest.fixture(scope="module")
def tokenizer(data):
    return importlib.import_module("demo.tokenizer").build_tokenizer(prepare_demo.training_texts(data))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _user_text(row: dict) -> str:
    return (row["messages"] if "messages" in row else row["prompt"])[0]["content"]


def test_data_files_are_deterministic_per_seed(data, tmp_path: Path) -> None:
    demo_datasets.write_datasets(data, tmp_path / "a")
    demo_datasets.write_datasets(demo_datasets.build_datasets(0), tmp_path / "b")
    demo_datasets.write_datasets(demo_datasets.build_datasets(1), tmp_path / "c")
    first, again, other = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert first == again
    assert first.keys() == other.keys()
    assert all(first[name] != other[name] for name in first)
    expected = {
        f"{name}/{split}.jsonl"
        for name in ("math", "sft", "preferences", "safety", "prompts")
        for split in ("train", "test")
    }
    expected |= {
        f"mmlu/{split}/{subject}_{split}.csv" for subject in demo_facts.MMLU_SUBJECTS for split in ("dev", "test")
    }
    assert set(first) == expected


def test_math_solutions_are_right_and_end_with_the_answer(data) -> None:
    for split, size in (("train", 4000), ("test", 300)):
        rows = data.math[split]
        assert len(rows) >= size
        levels = Counter(row["level"] for row in rows)
        assert set(levels) == {1, 2, 3} and max(levels.values()) - min(levels.values()) <= len(rows) * 0.05
        for row in rows:
            assert set(row) == {"question", "answer", "level"}
            *work, last = row["answer"].split("\n")
            assert re.fullmatch(r"#### \d+", last), row
            value = None
            for line in work:  # every step's arithmetic checks out, and the last one is the final answer
                a, op, b, result = STEP_RE.search(line).groups()
                value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
                assert value == int(result) >= 0, line
            assert value == int(last[5:])


def test_sft_schema(data) -> None:
    for split in ("train", "test"):
        tasks, math_kinds = Counter(), Counter()
        for row in data.sft[split]:
            assert set(row) == {"messages", "task"}
            assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
            assert all(m["content"].strip() for m in row["messages"])
            tasks[row["task"]] += 1
            if row["task"] == "math":  # a worked solution ending "#### N", or that last line alone
                reply = row["messages"][1]["content"]
                assert re.search(r"(^|\n)#### \d+$", reply)
                math_kinds["answer_only" if reply.startswith("#### ") else "worked"] += 1
            if row["task"] == "unsafe":
                assert "can't help" in row["messages"][1]["content"]
        assert set(tasks) == {"math", "chat", "unsafe"}
        share = math_kinds["answer_only"] / sum(math_kinds.values())
        assert abs(share - demo_datasets.ANSWER_ONLY_SHARE) < 0.1, math_kinds


def _check_pair(row: dict) -> None:
    assert [m["role"] for m in row["prompt"]] == ["user"]
    assert [m["role"] for m in row["chosen"]] == ["assistant"] == [m["role"] for m in row["rejected"]]
    assert row["chosen"][0]["content"] != row["rejected"][0]["content"]
    assert row["rating"] in RATINGS


def test_preferences_schema_and_grades(data) -> None:
    final = importlib.import_module("demo.math_problems").final_answer
    for split in ("train", "test"):
        rows = data.preferences[split]
        ratings = Counter(row["rating"] for row in rows)
        assert set(ratings) == RATINGS and min(ratings.values()) >= len(rows) / 5
        for row in rows:
            assert set(row) == {"prompt", "chosen", "rejected", "rating", "task"}
            _check_pair(row)
            assert row["task"] in {"math", "chat"}
            if row["task"] != "math":
                continue
            chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
            assert final(chosen) is not None
            if row["rating"] == "significantly_better":
                assert final(rejected) is None
            elif row["rating"] == "better":
                assert final(rejected) not in (None, final(chosen))
            elif row["rating"] == "slightly_better":
                assert "####" not in rejected or "\n" not in rejected
            else:
                assert final(rejected) == final(chosen)


def test_safety_schema(data) -> None:
    for split in ("train", "test"):
        rows = data.safety[split]
        assert 0.3 < sum(row["is_unsafe_prompt"] for row in rows) / len(rows) < 0.7
        for row in rows:
            assert set(row) == {
                "prompt",
                "chosen",
                "rejected",
                "rating",
                "task",
                "is_unsafe_prompt",
                "chosen_safe",
                "rejected_safe",
            }
            _check_pair(row)
            assert row["chosen_safe"] is True
            assert row["rejected_safe"] is (not row["is_unsafe_prompt"])
            assert row["task"] == ("unsafe" if row["is_unsafe_prompt"] else "chat")


def test_prompts_schema(data) -> None:
    for split in ("train", "test"):
        tasks = Counter(row["task"] for row in data.prompts[split])
        assert set(tasks) == {"math", "chat", "unsafe"} and tasks["math"] > len(data.prompts[split]) / 2
        for row in data.prompts[split]:
            assert set(row) == {"prompt", "answer", "task"}
            assert [m["role"] for m in row["prompt"]] == ["user"]
            assert bool(row["answer"]) == (row["task"] == "math")
            if row["answer"]:
                assert re.search(r"\n#### \d+$", row["answer"])


def test_mmlu_csv_layout(data, tmp_path: Path) -> None:
    demo_datasets.write_datasets(data, tmp_path)
    assert len(demo_facts.MMLU_SUBJECTS) >= 4
    for subject in demo_facts.MMLU_SUBJECTS:
        with (tmp_path / "mmlu" / "dev" / f"{subject}_dev.csv").open(newline="") as handle:
            dev = list(csv.reader(handle))
        with (tmp_path / "mmlu" / "test" / f"{subject}_test.csv").open(newline="") as handle:
            test = list(csv.reader(handle))
        assert len(dev) == 5 and 40 <= len(test) <= 80
        for row in dev + test:  # no header: every row is a question with a letter answer
            assert len(row) == 6 and row[5] in "ABCD" and len(set(row[1:5])) == 4
        letters = Counter(row[5] for row in test)
        assert max(letters.values()) - min(letters.values()) <= 1 and len(letters) == 4
        assert not {row[0] for row in dev} & {row[0] for row in test}


def test_no_question_in_both_train_and_test(data) -> None:
    for name in ("math", "sft", "preferences", "safety", "prompts"):
        key = "question" if name == "math" else None
        train = {row[key] if key else _user_text(row) for row in getattr(data, name)["train"]}
        test = {row[key] if key else _user_text(row) for row in getattr(data, name)["test"]}
        assert not train & test, name
    corpus = "\n".join(data.corpus)
    assert not [row for row in data.math["test"] if row["question"] in corpus]


def test_corpus_has_the_arithmetic_table_every_solution_needs(data) -> None:
    """Every equation of every solution is a true fact of the table, and the table is in the corpus as often as set."""
    facts = importlib.import_module("demo.math_problems").arithmetic_facts()
    table = {}
    for fact in facts:
        left, op, right, result = STEP_RE.fullmatch(fact).groups()
        assert (
            int(result) == {"+": int(left) + int(right), "-": int(left) - int(right), "*": int(left) * int(right)}[op]
        )
        assert all(1 <= int(n) <= 20 for n in (left, right, result)), fact
        table[fact] = 0
    used = {" ".join(m) for row in data.math["train"] + data.math["test"] for m in STEP_RE.findall(row["answer"])}
    used = {re.sub(r"^(\S+) (\S) (\S+) (\S+)$", r"\1 \2 \3 = \4", u) for u in used}
    assert used <= set(facts), sorted(used - set(facts))[:5]
    lines = Counter(line for doc in data.corpus for line in doc.split("\n") if line in table)
    assert set(lines) == set(facts)
    assert min(lines.values()) >= demo_datasets.ARITHMETIC_DRILLS


def test_tokenizer_tokens(tokenizer) -> None:
    assert tokenizer.tokenize("12345 + 67") == ["1", "2", "3", "4", "5", "Ġ+", "Ġ", "6", "7"]
    assert tokenizer.eos_token == "<|end|>" and tokenizer.pad_token == "<|pad|>" and tokenizer.bos_token == "<|bos|>"
    assert len({tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id}) == 3
    assert tokenizer("Hi")["input_ids"][0] == tokenizer.bos_token_id
    assert 1000 <= len(tokenizer) <= 2000


def test_chat_template_masks_exactly_the_reply(data, tokenizer) -> None:
    system = [{"role": "system", "content": "You are a helpful assistant."}]
    rows = [data.sft["train"][i] for i in range(20)]
    conversations = [row["messages"] for row in rows] + [system + rows[0]["messages"] + rows[1]["messages"]]
    for messages in conversations:
        out = tokenizer.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)
        ids, mask = out["input_ids"], out["assistant_masks"]
        assert ids.count(tokenizer.bos_token_id) == 1
        replies = [m["content"] + tokenizer.eos_token for m in messages if m["role"] == "assistant"]
        assert tokenizer.decode([i for i, keep in zip(ids, mask) if keep]) == "".join(replies)


def test_generation_prompt_is_a_prefix_of_the_full_conversation(data, tokenizer) -> None:
    for row in data.sft["test"][:20]:
        prompt, reply = row["messages"][:1], row["messages"][1:]
        head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(prompt + reply, tokenize=False)
        assert full.startswith(head) and head.endswith("<|assistant|>\n")
        head_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"]
        full_ids = tokenizer.apply_chat_template(prompt + reply, return_dict=True)["input_ids"]
        assert full_ids[: len(head_ids)] == head_ids


def test_existing_output_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    done = tmp_path / "done"
    done.mkdir()
    (done / "prepared.json").write_text(json.dumps({"arguments": prepare_demo.arguments_record(0)}))
    started = time.perf_counter()
    assert prepare_demo.main(["--output_dir", str(done), "--seed", "0"]) == 0
    assert time.perf_counter() - started < 1 and "already prepared" in capsys.readouterr().out
    with pytest.raises(prepare_demo.PrepareError, match="another --output_dir"):
        prepare_demo.check_existing(done, seed=1)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not a demo")
    assert prepare_demo.main(["--output_dir", str(other)]) == 2
    assert "no prepared.json" in capsys.readouterr().err and (other / "notes.txt").exists()


def test_prepared_base_model_loads_in_fp32_and_4bit(demo_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    record = json.loads((demo_dir / "prepared.json").read_text())
    assert record["arguments"] == prepare_demo.arguments_record(0)
    assert abs(record["base_loss_4bit"] - record["base_loss_fp32"]) < 0.1 * record["base_loss_fp32"]
    assert {"overall", "level_1", "level_2", "level_3"} <= set(record["base_gsm_accuracy"])
    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "base")
    generation = GenerationConfig.from_pretrained(demo_dir / "base")
    assert generation.eos_token_id == tokenizer.eos_token_id and generation.pad_token_id == tokenizer.pad_token_id
    inputs = tokenizer(
        ["Question: Tom has 3 apples. He buys 4 more. How many apples does Tom have now?\nAnswer:"], return_tensors="pt"
    )
    fp32 = AutoModelForCausalLM.from_pretrained(demo_dir / "base")
    assert sum(p.numel() for p in fp32.parameters()) == record["num_parameters"] < 10_000_000
    quantized = importlib.import_module("demo.model").load_4bit(demo_dir / "base")
    assert quantized.is_loaded_in_4bit
    with torch.no_grad():
        loss_fp32 = fp32(**inputs, labels=inputs["input_ids"]).loss
        loss_4bit = quantized(**inputs, labels=inputs["input_ids"]).loss
    assert torch.isfinite(loss_4bit) and abs(loss_4bit - loss_fp32) < 0.2 * loss_fp32
    assert sys.modules["demo"].__file__.startswith(str(REPO_ROOT / "scripts"))


def test_data_only_writes_the_demos_datasets_without_a_model(tmp_path: Path, demo_dir: Path) -> None:
    out = tmp_path / "data-only"
    assert prepare_demo.main(["--output_dir", str(out), "--data_only"]) == 0
    assert not (out / "base").exists()
    written = sorted(p.relative_to(out / "data") for p in (out / "data").rglob("*.jsonl"))
    assert written == sorted(p.relative_to(demo_dir / "data") for p in (demo_dir / "data").rglob("*.jsonl"))
    for path in written:  # the same files as the full demo of that seed, byte for byte
        assert (out / "data" / path).read_bytes() == (demo_dir / "data" / path).read_bytes(), path
    assert prepare_demo.main(["--output_dir", str(out), "--data_only"]) == 0  # kept
    with pytest.raises(prepare_demo.PrepareError, match="data_only"):  # never mistaken for a full demo
        prepare_demo.check_existing(out, seed=0)
