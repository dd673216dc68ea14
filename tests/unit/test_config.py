"""Config parsing: YAML + CLI overrides through trl.TrlParser, unknown keys rejected by name and file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from trl import SFTConfig

from recipes.common.config import ConfigError, QLoRAModelConfig, RecipeArguments, parse_config

REPO_ROOT = Path(__file__).resolve().parents[2]
TYPES = (RecipeArguments, SFTConfig, QLoRAModelConfig)


def write_yaml(tmp_path: Path, content: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def test_yaml_values_and_cli_overrides(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        {"model_name_or_path": "m", "dataset_name": "d", "learning_rate": 1e-4, "output_dir": str(tmp_path / "o")},
    )
    recipe, training, model = parse_config(TYPES, ["--config", str(path), "--learning_rate", "3e-4"])
    assert training.learning_rate == pytest.approx(3e-4)  # CLI wins over YAML
    assert recipe.dataset_name == "d"
    assert model.model_name_or_path == "m"


def test_qlora_is_the_default(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"model_name_or_path": "m", "output_dir": str(tmp_path / "o")})
    _, training, model = parse_config(TYPES, ["--config", str(path)])
    assert model.load_in_4bit and model.use_peft and model.use_bnb_nested_quant
    assert model.bnb_4bit_quant_type == "nf4"
    assert model.lora_target_modules == "all-linear"
    assert training.bf16 is False  # no CUDA on this machine: float32 on CPU instead of TRL's bf16 default


def test_unknown_yaml_key_names_key_and_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"model_name_or_path": "m", "learning_rat": 1e-4, "output_dir": str(tmp_path)})
    with pytest.raises(ConfigError) as err:
        parse_config(TYPES, ["--config", str(path)])
    assert "learning_rat" in str(err.value) and str(path) in str(err.value)


def test_unknown_cli_flag_is_an_error(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"model_name_or_path": "m", "output_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="not_a_flag"):
        parse_config(TYPES, ["--config", str(path), "--not_a_flag", "1"])


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Config file not found"):
        parse_config(TYPES, ["--config", str(tmp_path / "nope.yaml")])


def test_bf16_on_cpu_explains_the_fix(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("bf16 is valid on this GPU machine")
    path = write_yaml(
        tmp_path, {"model_name_or_path": "m", "bf16": True, "use_cpu": False, "output_dir": str(tmp_path)}
    )
    with pytest.raises(ConfigError, match="bf16: false"):
        parse_config(TYPES, ["--config", str(path)])
