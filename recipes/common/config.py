"""Config dataclasses shared by every recipe, parsed by `trl.TrlParser` from YAML plus CLI overrides.

A recipe parses `(RecipeArguments, <TRL trainer config>, QLoRAModelConfig)` (plus its own dataclass when it has
one). Unknown keys in the YAML or on the command line are errors that name the key and the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import torch
import yaml
from trl import ModelConfig, ScriptArguments, TrlParser

from recipes.common.errors import UserError


@dataclass
class RecipeArguments(ScriptArguments):
    """Data, tracking and bookkeeping options common to all recipes (on top of TRL's `ScriptArguments`)."""

    eval_dataset_name: str | None = field(
        default=None,
        metadata={"help": "Optional separate eval dataset (hub name or local path); default: `dataset_name`."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most this many eval rows."})
    wandb_project: str = field(default="post-training-recipes", metadata={"help": "W&B project."})
    wandb_entity: str | None = field(default=None, metadata={"help": "W&B entity (team or user)."})
    wandb_group: str | None = field(default=None, metadata={"help": "W&B group (e.g. a study name)."})
    wandb_tags: list[str] = field(default_factory=list, metadata={"help": "Extra W&B tags."})
    parent_run: str | None = field(
        default=None,
        metadata={"help": "Output dir of the run this one starts from (e.g. the SFT run), recorded as lineage."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train again into an output_dir that holds a finished run (nothing is deleted up front)."},
    )
    eval_tasks: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Evaluation-suite tasks run every eval_steps and at the end (gsm8k, mmlu, length, diversity)."
        },
    )
    eval_gsm8k_path: str | None = field(default=None, metadata={"help": "GSM8K-layout data for eval (jsonl or hub)."})
    eval_mmlu_dir: str | None = field(default=None, metadata={"help": "MMLU CSV directory (dev/ + test/) for eval."})
    eval_num_samples: int = field(default=64, metadata={"help": "Size of the fixed, seeded eval subset."})
    eval_data_seed: int = field(
        default=0,
        metadata={
            "help": "Seed that picks the eval subset: the same items whatever the training `seed` (which seeds the "
            "evaluation's sampling), so curves of several seeds are on the same questions."
        },
    )
    eval_max_new_tokens: int = field(default=128, metadata={"help": "Generation limit for generative eval tasks."})
    eval_batch_size: int = field(
        default=64,
        metadata={
            "help": "Prompts per generate / log-likelihood batch of the evaluation suite (lower it on small GPUs)."
        },
    )


@dataclass
class QLoRAModelConfig(ModelConfig):
    """TRL's `ModelConfig` with the project's defaults: QLoRA (NF4, double quantization) on all linear layers."""

    load_in_4bit: bool = field(default=True, metadata={"help": "Load the base in 4-bit NF4 (QLoRA)."})
    use_bnb_nested_quant: bool = field(default=True, metadata={"help": "Double quantization of the 4-bit scales."})
    use_peft: bool = field(default=True, metadata={"help": "Train a LoRA adapter instead of all weights."})
    lora_target_modules: list[str] | None = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Modules that get LoRA; 'all-linear' is the QLoRA paper's choice."},
    )
    merge_adapter: bool = field(
        default=False,
        metadata={"help": "After training, also save the adapter merged into a bf16 copy of the base (never 4-bit)."},
    )


class ConfigError(UserError):
    """A config problem the user must fix; the message says what, where and how."""


def _config_path(args: Sequence[str]) -> str | None:
    if "--config" not in args:
        return None
    i = list(args).index("--config")
    if i + 1 >= len(args):
        raise ConfigError("`--config` needs a path to a YAML file, e.g. `--config recipes/sft/config.yaml`.")
    return args[i + 1]


def parse_config(dataclass_types: Sequence[type], args: Sequence[str] | None = None) -> tuple[Any, ...]:
    """Parse `--config FILE.yaml` plus `--key value` overrides into the given dataclasses.

    On a machine without CUDA, TRL's default `bf16=True` cannot run; we default to CPU in float32 instead
    (a YAML or CLI value still wins, and then fails with the explanation below).
    """
    args = list(sys.argv[1:] if args is None else args)
    config_path = _config_path(args)
    if config_path is not None and not Path(config_path).is_file():
        raise ConfigError(
            f"Config file not found: {config_path!r}. Pass an existing YAML, e.g. recipes/sft/config.yaml."
        )

    # exit_on_error=False: a bad command-line value (e.g. a choice not among a Literal field's) is an ArgumentError
    # we turn into one ConfigError, instead of argparse's exit after pages of usage.
    parser = TrlParser(list(dataclass_types), exit_on_error=False)
    # (Only for configs that have those fields: a recipe without a trainer config would get them back as an extra
    # namespace.)
    if not torch.cuda.is_available() and any("bf16" in getattr(t, "__dataclass_fields__", {}) for t in dataclass_types):
        parser.set_defaults(bf16=False, use_cpu=True)
    try:
        parsed = parser.parse_args_and_config(args=args)
    except yaml.YAMLError as err:
        raise ConfigError(f"Config file {config_path} is not valid YAML: {err}") from err
    except argparse.ArgumentError as err:
        raise ConfigError(command_line_error(parser, err)) from err
    except ValueError as err:
        message = str(err)
        if "Unknown arguments from config file" in message:
            raise ConfigError(
                f"{message.split('. Please')[0]} in {config_path}. Remove or rename them; the valid keys are the "
                f"fields of {', '.join(t.__name__ for t in dataclass_types)} (see `--help`)."
            ) from err
        if "not used by the HfArgumentParser" in message:
            raise ConfigError(
                f"Unknown command-line argument(s) {message.partition(': ')[2]}. Remove or rename them; the valid keys "
                f"are the fields of {', '.join(t.__name__ for t in dataclass_types)} (see `--help`)."
            ) from err
        if "bf16" in message or "fp16" in message:
            raise ConfigError(
                f"{message}\nThis machine has no CUDA GPU: set `bf16: false` (or pass `--bf16 false`) to train in "
                f"float32 on CPU, or run on a GPU."
            ) from err
        # The rest are the configs' own checks of the values given (TRL's and transformers' __post_init__).
        where = f"in {config_path} or on the command line" if config_path else "on the command line"
        raise ConfigError(f"{message}\nFix that value {where}.") from err
    check_choices(parsed, config_path)
    return tuple(parsed)


def command_line_error(parser: argparse.ArgumentParser, err: argparse.ArgumentError) -> str:
    """argparse's complaint about a command-line value; a bad choice worded as `check_choices` words a YAML one."""
    names = set((err.argument_name or "").split("/"))  # argparse joins an option's spellings: "--a_b/--a-b"
    action = next((a for a in parser._actions if names & set(a.option_strings)), None)
    given = re.search(r"invalid choice: (.+?) \(choose from", str(err))
    if action is not None and action.choices is not None and given:
        shown = ", ".join(str(choice) for choice in action.choices)
        return f"{action.dest}: {given.group(1)} is not one of {shown}; fix it on the command line."
    return f"{err}. Fix that value on the command line."


def literal_choices(annotation: Any) -> tuple[Any, ...] | None:
    """The allowed values of a `Literal[...]` (or `Literal[...] | None`) annotation, else None."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    if get_origin(annotation) is Union or type(annotation).__name__ == "UnionType":
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) == 1 and get_origin(members[0]) is Literal:
            return (*get_args(members[0]), None)
    return None


def check_choices(parsed: Sequence[Any], config_path: str | None) -> None:
    """Every `Literal` field holds one of its values. argparse checks `choices` only for values given on the command
    line; TrlParser hands YAML values to argparse as defaults, which it never checks, so they are checked here."""
    for section in parsed:
        if not dataclasses.is_dataclass(section):
            continue
        try:
            hints = get_type_hints(type(section))
        except (NameError, TypeError):  # a third-party config whose annotations do not resolve: nothing of ours
            continue
        for config_field in dataclasses.fields(section):
            allowed = literal_choices(hints.get(config_field.name))
            value = getattr(section, config_field.name)
            if allowed is not None and value not in allowed:
                shown = ", ".join(str(choice) for choice in allowed)
                where = f"in {config_path}" if config_path else "in the config"
                raise ConfigError(
                    f"{config_field.name}: {value!r} is not one of {shown} ({type(section).__name__}); fix it {where}."
                )


def config_to_dict(*configs: Any) -> dict[str, Any]:
    """The full resolved config, one section per dataclass, for logging and for `run_complete.json`."""
    resolved: dict[str, Any] = {}
    for config in configs:
        if hasattr(config, "to_dict"):
            section = config.to_dict()
        else:
            section = dataclasses.asdict(config)
        resolved[type(config).__name__] = {k: _jsonable(v) for k, v in section.items()}
    return resolved


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
