"""Convert hub preference datasets into the reward recipe's format (conversational prompt/chosen/rejected + rating).

    python -m recipes.reward.hub_data hh-rlhf --subset harmless-base --output_dir data/hh-rlhf-harmless
    python -m recipes.reward.hub_data pku-saferlhf --output_dir data/pku-saferlhf
    python -m recipes.reward.hub_data helpsteer2 --output_dir data/helpsteer2-preference

Each writes `<output_dir>/{train,test}.jsonl`; point `dataset_name` at the directory. Why a conversion: these datasets
need `data_dir` to load (hh-rlhf, HelpSteer2), or hold two responses and labels instead of chosen/rejected
(PKU-SafeRLHF, HelpSteer2). Datasets already in TRL's format (e.g. `trl-lib/hh-rlhf-helpful-base`) need none.

Ratings (Llama 2's scale, for margins and the per-bucket evaluation):
- HelpSteer2 preference strength |s| = 3, 2, 1 -> significantly better, better, slightly better (s = 0 ties dropped).
- PKU-SafeRLHF: safe over unsafe -> significantly better; both unsafe -> by severity difference (>= 2 better,
  1 slightly better, 0 negligibly better); both safe -> negligibly better. A heuristic of ours, not the dataset's.
- hh-rlhf carries no rating (train with `margin_set: none`).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from recipes.common.errors import run_cli

HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text.strip()}


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text.strip()}


def hh_turns(transcript: str) -> list[dict[str, str]]:
    """An hh-rlhf transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as chat messages."""
    parts = HH_TURN.split(transcript)
    messages = []
    for speaker, text in zip(parts[1::2], parts[2::2]):
        messages.append(_user(text) if speaker == "Human" else _assistant(text))
    return messages


def convert_hh_rlhf(row: dict[str, Any]) -> dict[str, Any] | None:
    """Shared turns as the prompt, the final assistant turns as chosen/rejected; None when unusable."""
    chosen, rejected = hh_turns(row["chosen"]), hh_turns(row["rejected"])
    if len(chosen) < 2 or chosen[-1]["role"] != "assistant" or chosen[:-1] != rejected[:-1]:
        return None
    if not rejected or rejected[-1]["role"] != "assistant" or chosen[-1] == rejected[-1]:
        return None
    return {"prompt": chosen[:-1], "chosen": [chosen[-1]], "rejected": [rejected[-1]]}


def convert_pku_saferlhf(row: dict[str, Any]) -> dict[str, Any] | None:
    """The safer response as chosen, with safety flags and a rating from the safety labels and severities."""
    first = row["safer_response_id"]
    second = 1 - first
    chosen, rejected = row[f"response_{first}"], row[f"response_{second}"]
    if chosen.strip() == rejected.strip():
        return None
    chosen_safe, rejected_safe = bool(row[f"is_response_{first}_safe"]), bool(row[f"is_response_{second}_safe"])
    if chosen_safe and not rejected_safe:
        rating = "significantly_better"
    elif not chosen_safe and not rejected_safe:
        gap = int(row.get(f"response_{second}_severity_level") or 0) - int(
            row.get(f"response_{first}_severity_level") or 0
        )
        rating = "better" if gap >= 2 else "slightly_better" if gap == 1 else "negligibly_better"
    else:
        rating = "negligibly_better"
    return {
        "prompt": [_user(row["prompt"])],
        "chosen": [_assistant(chosen)],
        "rejected": [_assistant(rejected)],
        "rating": rating,
        "task": "unsafe",
        "is_unsafe_prompt": True,  # PKU-SafeRLHF prompts are red-teaming prompts
        "chosen_safe": chosen_safe,
        "rejected_safe": rejected_safe,
    }


def convert_helpsteer2(row: dict[str, Any]) -> dict[str, Any] | None:
    """HelpSteer2-Preference: strength < 0 prefers response_1, > 0 response_2; |strength| is the rating."""
    strength = int(row["preference_strength"])
    if strength == 0:
        return None
    chosen, rejected = (
        (row["response_1"], row["response_2"]) if strength < 0 else (row["response_2"], row["response_1"])
    )
    rating = {3: "significantly_better", 2: "better", 1: "slightly_better"}[abs(strength)]
    return {
        "prompt": [_user(row["prompt"])],
        "chosen": [_assistant(chosen)],
        "rejected": [_assistant(rejected)],
        "rating": rating,
    }


def write_jsonl(rows: Iterable[dict[str, Any] | None], path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w") as handle:
        for row in rows:
            if row is not None:
                handle.write(json.dumps(row) + "\n")
                count += 1
    return count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=["hh-rlhf", "pku-saferlhf", "helpsteer2"])
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--subset", default="harmless-base", help="hh-rlhf data_dir (harmless-base, helpful-base)")
    args = parser.parse_args(argv)

    import datasets

    sources: dict[str, tuple[Callable, Any, Any]] = {}
    if args.dataset == "hh-rlhf":
        loaded = datasets.load_dataset("Anthropic/hh-rlhf", data_dir=args.subset)
        sources = {"train": (convert_hh_rlhf, loaded["train"], None), "test": (convert_hh_rlhf, loaded["test"], None)}
    elif args.dataset == "pku-saferlhf":
        loaded = datasets.load_dataset("PKU-Alignment/PKU-SafeRLHF")
        sources = {split: (convert_pku_saferlhf, loaded[split], None) for split in ("train", "test")}
    else:
        loaded = datasets.load_dataset("nvidia/HelpSteer2", data_dir="preference")["train"]
        sources = {
            "train": (convert_helpsteer2, loaded, "train"),
            "test": (convert_helpsteer2, loaded, "validation"),  # the `split` column: train / validation
        }
    for split, (convert, rows, keep) in sources.items():
        selected = (row for row in rows if keep is None or row.get("split") in (keep, keep[:3]))
        count = write_jsonl((convert(row) for row in selected), args.output_dir / f"{split}.jsonl")
        print(f"{args.dataset} {split}: {count} pairs -> {args.output_dir / f'{split}.jsonl'}")


if __name__ == "__main__":
    run_cli(main)
