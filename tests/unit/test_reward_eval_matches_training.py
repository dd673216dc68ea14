"""The evaluation's reward (`python -m eval --tasks reward`, `eval.reward_kl.load_reward_model`) is the training
path's score (`recipes.common.reward.score`, as PPO, GRPO and rejection sampling use it) on the same prompts and
completions, for a chat template that appends a newline after EOS (as the character tokenizer's does).

The training path scores at the response's EOS: it drops the whitespace the template adds after it and adds no BOS
(the chat template renders the whole text). An evaluation that kept the newline or let the tokenizer prepend BOS
reads the score at another token: the last test shows both change the score, so the equality is not vacuous.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from eval.reward_kl import load_reward_model as load_eval_reward
from eval.testing import build_char_tokenizer, save_tiny_reward_model
from recipes.common.reward import load_reward_model, reward_tokenize, score

PROMPTS = ["2+3?", "hello", "10-4?"]
COMPLETIONS = ["5", "hi there, friend", "6"]


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = build_char_tokenizer()
    assert tokenizer.apply_chat_template([{"role": "user", "content": "q"}], tokenize=False).endswith("</s>\n")
    return save_tiny_reward_model(tmp_path_factory.mktemp("rm"), tokenizer, seed=0)


def test_eval_reward_equals_training_score(rm_dir: Path) -> None:
    evaluation = load_eval_reward(str(rm_dir), batch_size=2)(PROMPTS, COMPLETIONS)
    model, tokenizer = load_reward_model(str(rm_dir))
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    training = score(model, tokenizer, chats, COMPLETIONS).tolist()
    assert evaluation == pytest.approx(training, abs=1e-6)


def test_a_kept_newline_or_an_added_bos_changes_the_score(rm_dir: Path) -> None:
    model, tokenizer = load_reward_model(str(rm_dir))
    chat = [{"role": "user", "content": PROMPTS[0]}, {"role": "assistant", "content": COMPLETIONS[0]}]
    ids = reward_tokenize(tokenizer, chat[:1], COMPLETIONS[0])
    assert ids[-1] == tokenizer.eos_token_id and ids[0] != tokenizer.bos_token_id
    rendered = tokenizer.apply_chat_template(chat, tokenize=False)
    variants = {
        "as trained": ids,
        "newline kept": tokenizer(rendered, add_special_tokens=False)["input_ids"],
        "BOS added": [tokenizer.bos_token_id, *ids],
    }
    with torch.no_grad():
        scores = {k: float(model(input_ids=torch.tensor([v])).logits[0, 0]) for k, v in variants.items()}
    assert scores["newline kept"] != pytest.approx(scores["as trained"], abs=1e-4)
    assert scores["BOS added"] != pytest.approx(scores["as trained"], abs=1e-4)
