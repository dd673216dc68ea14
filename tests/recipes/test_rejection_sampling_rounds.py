"""Rejection sampling over two rounds with `selection: best_of_all_rounds` (Llama 2's fix for regressions), end to
end on the tiny demo model with real 4-bit QLoRA: round 2 keeps, for every prompt, the best sample of rounds 1 and 2
together, and records how many of its kept samples came from the earlier round."""

from __future__ import annotations

import json
from pathlib import Path

from test_rejection_sampling import rs_args, start_policy  # noqa: F401  (same directory; start_policy is a fixture)

from recipes.rejection_sampling.train import main


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_second_round_keeps_the_best_sample_of_every_round(
    demo_dir: Path,
    start_policy: Path,  # noqa: F811  (the imported fixture)
    tmp_path: Path,
) -> None:
    output_dir = tmp_path / "run"
    main(rs_args(
        demo_dir, start_policy, output_dir, "--num_rounds", "2", "--selection", "best_of_all_rounds",
        "--report_to", "none", "--eval_tasks", "",
    ))  # fmt: skip
    samples = records(output_dir / "round_1" / "samples.jsonl") + records(output_dir / "round_2" / "samples.jsonl")
    best: dict[int, float] = {}
    for sample in samples:
        best[sample["prompt_id"]] = max(best.get(sample["prompt_id"], float("-inf")), sample["reward"])
    kept = records(output_dir / "round_2" / "selected.jsonl")
    assert kept, "round 2 kept nothing"
    assert {row["round"] for row in kept} <= {1, 2}
    for row in kept:  # one per prompt (keep_per_prompt 1), the best over both rounds, whichever round it came from
        assert row["reward"] == best[row["prompt_id"]], (row, best[row["prompt_id"]])
    assert len({row["prompt_id"] for row in kept}) == len(kept)
    selection = json.loads((output_dir / "round_2" / "selection.json").read_text())
    from_round_1 = sum(row["round"] == 1 for row in kept) / len(kept)
    assert abs(selection["selected"]["frac_from_earlier_rounds"] - from_round_1) < 1e-9
    round_1_kept = records(output_dir / "round_1" / "selected.jsonl")
    assert all(row["round"] == 1 for row in round_1_kept)  # round 1 has no earlier round to draw on
