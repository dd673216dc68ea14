"""One padding policy (`recipes.common.modeling.set_pad_token`): a pad token of the vocabulary other than EOS, chosen
once by the first stage, saved with the tokenizer and inherited by every later stage; the user's `pad_token` wins."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from eval.reward_kl import RewardModel
from eval.testing import build_char_tokenizer, build_tiny_model, save_tiny_model
from recipes.common.config import QLoRAModelConfig
from recipes.common.modeling import ModelLoadError, load_tokenizer, set_model_pad_token_id, set_pad_token
from recipes.common.policy import load_policy_tokenizer
from recipes.common.reward import load_reward_tokenizer
from recipes.ppo.data import load_policy_tokenizer as load_ppo_tokenizer


def word_tokenizer(tokens: list[str], **special: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over exactly `tokens`, with the given special tokens (eos_token=..., unk_token=...)."""
    backend = Tokenizer(
        models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token=special.get("unk_token"))
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


def eos_padded_model(directory: Path) -> Path:
    """The tiny model with a tokenizer that pads with EOS (as SmolLM2's and many hub tokenizers do)."""
    save_tiny_model(directory)
    tokenizer = build_char_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(directory)
    return directory


def test_eos_padding_is_replaced_by_a_known_pad_token_and_said(capsys: pytest.CaptureFixture) -> None:
    tokenizer = build_char_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    set_pad_token(tokenizer, name="tiny")
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    assert lines == [
        "[pad] tiny: the tokenizer has its EOS token '</s>'; padding with '<pad>' (id 0) instead, saved with the "
        "tokenizer (set `pad_token` to choose another)."
    ]


def test_family_pad_tokens_come_first() -> None:
    # Llama 3.1: no pad token; <|finetune_right_pad_id|> is its padding token, before any reserved or unknown one.
    llama = word_tokenizer(
        ["<|begin_of_text|>", "<|eot_id|>", "<|reserved_special_token_0|>", "<|finetune_right_pad_id|>", "hi"],
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
    )
    set_pad_token(llama)
    assert llama.pad_token == "<|finetune_right_pad_id|>"
    # Llama 3.0 has only the reserved tokens.
    llama30 = word_tokenizer(
        ["<|begin_of_text|>", "<|eot_id|>", "<|reserved_special_token_0|>"], eos_token="<|eot_id|>"
    )
    set_pad_token(llama30)
    assert llama30.pad_token == "<|reserved_special_token_0|>"
    # SmolLM2: pads with EOS <|im_end|>; <|endoftext|> (id 0) is its unknown token and a real vocabulary entry.
    smollm2 = word_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "hi"],
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    set_pad_token(smollm2)
    assert (smollm2.pad_token, smollm2.pad_token_id) == ("<|endoftext|>", 0)


def test_the_unknown_token_is_the_last_choice_and_bos_is_never_chosen() -> None:
    tokenizer = word_tokenizer(["<s>", "</s>", "<unk>", "a"], bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    set_pad_token(tokenizer)
    assert tokenizer.pad_token == "<unk>"
    only_bos = word_tokenizer(["<s>", "</s>", "a"], bos_token="<s>", eos_token="</s>")
    with pytest.raises(ModelLoadError, match=r"has no pad token and none of .*Set `pad_token`"):
        set_pad_token(only_bos, name="bare")
    set_pad_token(only_bos, eos_fallback=True)  # generation only: the attention mask hides padding
    assert only_bos.pad_token == "</s>"


def test_a_distinct_pad_token_is_kept_silently(capsys: pytest.CaptureFixture) -> None:
    tokenizer = build_char_tokenizer()
    tokenizer.pad_token = "<unk>"
    set_pad_token(tokenizer)
    assert tokenizer.pad_token == "<unk>" and capsys.readouterr().out == ""


def test_the_users_pad_token_wins_when_it_is_in_the_vocabulary() -> None:
    tokenizer = build_char_tokenizer()
    set_pad_token(tokenizer, "<unk>")  # the unknown token is in the vocabulary: a valid pad token
    assert tokenizer.pad_token == "<unk>"
    set_pad_token(tokenizer, "x")
    assert tokenizer.pad_token == "x"
    with pytest.raises(ModelLoadError, match=r"pad_token '<nope>' is not in the vocabulary of 'tiny'"):
        set_pad_token(tokenizer, "<nope>", "tiny")
    with pytest.raises(ModelLoadError, match=r"pads with its EOS token"):
        set_pad_token(tokenizer, "</s>", "tiny")
    assert tokenizer.pad_token == "x"  # a refused choice changes nothing


def test_the_first_stage_saves_its_choice_and_later_stages_inherit_it(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model_dir = eos_padded_model(tmp_path / "base")
    tokenizer = load_tokenizer(QLoRAModelConfig(model_name_or_path=str(model_dir)))  # SFT / reward from a base
    assert tokenizer.pad_token == "<pad>" and "[pad]" in capsys.readouterr().out
    model = build_tiny_model(tokenizer)
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.eos_token_id
    set_model_pad_token_id(model, tokenizer)
    assert model.config.pad_token_id == model.generation_config.pad_token_id == tokenizer.pad_token_id

    # What SFT writes: an adapter dir holding the tokenizer (no config.json), naming the base.
    sft_dir = tmp_path / "sft"
    sft_dir.mkdir()
    (sft_dir / "adapter_config.json").write_text(f'{{"base_model_name_or_path": "{model_dir}"}}')
    tokenizer.save_pretrained(sft_dir)
    assert AutoTokenizer.from_pretrained(sft_dir).pad_token == "<pad>"
    sft = QLoRAModelConfig(model_name_or_path=str(sft_dir))
    inherited = {
        "dpo/grpo/rs": load_policy_tokenizer(sft),
        "ppo": load_ppo_tokenizer(sft, pad_token=None, chat=True),
        "reward model": load_reward_tokenizer(str(sft_dir)),
    }
    assert {stage: tok.pad_token for stage, tok in inherited.items()} == dict.fromkeys(inherited, "<pad>")
    assert inherited["ppo"].padding_side == "left"
    assert "[pad]" not in capsys.readouterr().out  # nothing to choose any more


def test_later_stages_on_a_foreign_eos_padded_tokenizer_choose_too(tmp_path: Path) -> None:
    model_dir = eos_padded_model(tmp_path / "base")
    args = QLoRAModelConfig(model_name_or_path=str(model_dir))
    assert load_policy_tokenizer(args).pad_token == "<pad>"
    assert load_reward_tokenizer(str(model_dir)).pad_token == "<pad>"
    # PPO used to refuse the unknown token as "not in the vocabulary" (it converted it to the unknown id).
    assert load_ppo_tokenizer(args, pad_token="<unk>", chat=True).pad_token == "<unk>"
    with pytest.raises(ModelLoadError, match="not in the vocabulary"):
        load_ppo_tokenizer(args, pad_token="<no-such-token>", chat=True)


def test_eval_reward_model_pads_with_a_distinct_token() -> None:
    tokenizer = build_char_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    model = build_tiny_model(tokenizer)
    RewardModel(model, tokenizer)
    assert tokenizer.pad_token == "<pad>" and model.config.pad_token_id == tokenizer.pad_token_id
