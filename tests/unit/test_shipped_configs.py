"""Every shipped YAML parses: recipe configs through their recipe's dataclasses, accelerate configs as YAML."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from recipes.common.config import parse_config

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPE_CONFIGS = sorted(p for p in (REPO_ROOT / "recipes").glob("*/*.yaml") if p.parent.name != "common")


def test_there_are_recipe_configs() -> None:
    assert any(p.parent.name == "sft" for p in RECIPE_CONFIGS)


@pytest.mark.parametrize("path", RECIPE_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_config_parses(path: Path, tmp_path: Path) -> None:
    module = importlib.import_module(f"recipes.{path.parent.name}.train")
    types = module.CONFIG_TYPES
    # GPU configs ask for bf16; `--use_cpu true` lets this CPU machine validate every key of them all the same.
    cpu = ["--use_cpu", "true"] if any("use_cpu" in t.__dataclass_fields__ for t in types) else []  # no trainer: none
    parsed = parse_config(types, ["--config", str(path), "--output_dir", str(tmp_path / "out"), *cpu])
    assert len(parsed) == len(types)


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "accelerate_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_config_is_valid(path: Path) -> None:
    from accelerate.commands.config.config_args import ClusterConfig

    config = yaml.safe_load(path.read_text())
    ClusterConfig(**config)  # accelerate's own schema: unknown or mistyped keys raise


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "scripts" / "studies").glob("*.yaml")), ids=lambda p: p.name)
def test_study_config_parses_with_each_methods_recipe(path: Path, tmp_path: Path) -> None:
    """A study's method config plus its overrides is what the study launches: every key must be known."""
    study = yaml.safe_load(path.read_text())
    launches = {name: {**spec, "common": True} for name, spec in study["methods"].items()}
    for name, step in study.get("prepare", {}).items():  # a step is a recipe launch or a command
        if "recipe" in step:
            launches[f"prepare-{name}"] = {**step, "common": False}
        else:
            assert (REPO_ROOT / step["command"][1]).is_file(), step["command"]
            assert {"command", "done"} == set(step), step
    for method, spec in launches.items():
        # The recipe is the config's folder (a method's name may differ: ppo_grader runs recipes/ppo).
        module = importlib.import_module(f"recipes.{Path(spec['config']).parent.name}.train")
        common = study.get("common_overrides", {}) if spec["common"] else {}
        overrides = {**common, **spec.get("overrides", {})}
        argv = [
            "--config",
            str(REPO_ROOT / spec["config"]),
            "--output_dir",
            str(tmp_path / method),
            "--use_cpu",
            "true",
        ]
        for key, value in overrides.items():
            argv += [f"--{key}", *map(str, value)] if isinstance(value, list) else [f"--{key}", str(value)]
        assert len(parse_config(module.CONFIG_TYPES, argv)) == len(module.CONFIG_TYPES)
    assert set(study["eval"]) <= {"tasks", "gsm8k", "gsm8k_chat", "mmlu", "prompts", "limit", "max_new_tokens",
                                  "samples_per_prompt", "batch_size", "reward_models", "data_seed"}  # fmt: skip
