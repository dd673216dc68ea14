"""Config choices are `typing.Literal` fields: TrlParser (HfArgumentParser) turns them into argparse `choices`, and
`parse_config` checks YAML values too (TrlParser sets YAML values as defaults, which argparse never checks). A wrong
value, from the YAML or the command line, is one ConfigError naming the key, the value and the allowed values."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from recipes.common.config import ConfigError, parse_config

REPO_ROOT = Path(__file__).resolve().parents[2]


def recipe_config_types(recipe: str) -> tuple[type, ...]:
    if recipe == "grpo":
        from recipes.grpo.train import CONFIG_TYPES
    elif recipe == "ppo":
        from recipes.ppo.train import CONFIG_TYPES
    elif recipe == "reward":
        from recipes.reward.train import CONFIG_TYPES
    else:
        from recipes.rejection_sampling.train import CONFIG_TYPES
    return CONFIG_TYPES


# (recipe, key, a valid value other than the default, the allowed values)
CHOICES = [
    ("grpo", "reward_whitening", "none", {"batch", "fixed", "none"}),
    ("grpo", "correctness_mode", "strict", {"flexible", "strict"}),
    ("ppo", "reward_source", "reward_model", {"math", "reward_model"}),
    ("ppo", "reward_whitening", "none", {"batch", "fixed", "none"}),
    ("ppo", "math_grading", "strict", {"flexible", "strict"}),
    ("reward", "reward_kind", "safety", {"helpfulness", "safety"}),
    ("reward", "margin_set", "large", {"none", "small", "large"}),
    ("rejection_sampling", "method", "iterative_dpo", {"rejection_sampling", "iterative_dpo"}),
    ("rejection_sampling", "generation_backend", "vllm", {"hf", "vllm"}),
    ("rejection_sampling", "selection", "best_of_all_rounds", {"best_of_round", "best_of_all_rounds"}),
    ("rejection_sampling", "train_from", "sft", {"sft", "last_round"}),
    ("rejection_sampling", "scorer", "combined", {"gsm8k", "reward_model", "combined"}),
    ("rejection_sampling", "grader_mode", "strict", {"flexible", "strict"}),
]


def literal_field(types: tuple[type, ...], key: str) -> set[str]:
    for config_type in types:
        hints = typing.get_type_hints(config_type)
        for f in dataclasses.fields(config_type):
            if f.name == key:
                return set(typing.get_args(hints[key]))
    raise AssertionError(f"no field {key}")


def shipped_config(tmp_path: Path, recipe: str, **values: str) -> Path:
    config = yaml.safe_load((REPO_ROOT / "recipes" / recipe / "config.yaml").read_text())
    config.update(values, output_dir=str(tmp_path / "out"))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(("recipe", "key", "valid", "allowed"), CHOICES)
def test_choice_is_a_literal_field(recipe: str, key: str, valid: str, allowed: set[str]) -> None:
    assert literal_field(recipe_config_types(recipe), key) == allowed


@pytest.mark.parametrize(("recipe", "key", "valid", "allowed"), CHOICES)
def test_wrong_yaml_value_names_key_and_choices(
    tmp_path: Path, recipe: str, key: str, valid: str, allowed: set[str]
) -> None:
    path = shipped_config(tmp_path, recipe, **{key: "sometimes"})
    with pytest.raises(ConfigError) as err:
        parse_config(recipe_config_types(recipe), ["--config", str(path)])
    message = str(err.value)
    assert key in message and "'sometimes'" in message and str(path) in message
    assert all(choice in message for choice in allowed), message
    assert "usage:" not in message


@pytest.mark.parametrize(("recipe", "key", "valid", "allowed"), CHOICES)
def test_wrong_cli_value_names_key_and_choices(
    tmp_path: Path, recipe: str, key: str, valid: str, allowed: set[str], capsys: pytest.CaptureFixture
) -> None:
    path = shipped_config(tmp_path, recipe)
    with pytest.raises(ConfigError) as err:  # not argparse's SystemExit after pages of usage
        parse_config(recipe_config_types(recipe), ["--config", str(path), f"--{key}", "sometimes"])
    message = str(err.value)
    assert key in message and "'sometimes'" in message
    assert all(choice in message for choice in allowed), message
    assert "usage:" not in capsys.readouterr().err


@pytest.mark.parametrize(("recipe", "key", "valid", "allowed"), CHOICES)
def test_valid_value_parses(tmp_path: Path, recipe: str, key: str, valid: str, allowed: set[str]) -> None:
    types = recipe_config_types(recipe)
    from_yaml = parse_config(types, ["--config", str(shipped_config(tmp_path, recipe, **{key: valid}))])
    from_cli = parse_config(types, ["--config", str(shipped_config(tmp_path, recipe)), f"--{key}", valid])
    for parsed in (from_yaml, from_cli):
        assert any(getattr(section, key, None) == valid for section in parsed)
