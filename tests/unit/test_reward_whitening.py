"""Whitening of the combined reward: `batch` statistics over every process's scores (real gloo, 2 processes), and
`fixed` statistics that come from the config or the helpfulness RM's rm_eval.json, never a silent (x - 0) / 1."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from recipes.common.config import parse_config
from recipes.common.reward import RewardCombination, RewardModelError, combination_for, combine_rewards

# Each rank's raw scores in one call: uneven sizes, and rank 1's half of a prompt group scored on another process.
RANK_SCORES = [[1.0, 2.0, 3.0], [10.0, 20.0]]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _whiten_on_rank(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        scores = torch.tensor(RANK_SCORES[rank])
        whitened = combine_rewards(scores, combination=RewardCombination(whitening="batch"))
        torch.save(whitened, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_batch_whitening_uses_the_scores_of_every_process(tmp_path: Path) -> None:
    mp.spawn(_whiten_on_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    everything = torch.tensor(RANK_SCORES[0] + RANK_SCORES[1])
    expected = (everything - everything.mean()) / (everything.std() + 1e-6)
    got = torch.cat([torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)])
    assert torch.allclose(got, expected, atol=1e-5), (got, expected)
    # What per-process whitening gave (each rank's own mean 0, std 1) is far from it.
    per_rank = torch.cat([(torch.tensor(s) - torch.tensor(s).mean()) / torch.tensor(s).std() for s in RANK_SCORES])
    assert not torch.allclose(got, per_rank, atol=0.1)


def test_batch_whitening_in_one_process_is_unchanged() -> None:
    scores = torch.tensor([1.0, 2.0, 6.0])
    whitened = combine_rewards(scores, combination=RewardCombination(whitening="batch"))
    assert torch.allclose(whitened, (scores - scores.mean()) / (scores.std() + 1e-6))


def rm_dir(tmp_path: Path, final: dict | None) -> Path:
    path = tmp_path / "rm"
    path.mkdir()
    if final is not None:
        (path / "rm_eval.json").write_text(json.dumps({"final": final}))
    return path


def grpo_args(tmp_path: Path, *extra: str):
    from recipes.grpo.train import GRPORecipeArguments

    return parse_config([GRPORecipeArguments], ["--reward_whitening", "fixed", *extra])[0]


def test_fixed_whitening_takes_the_rm_eval_statistics(tmp_path: Path) -> None:
    path = rm_dir(tmp_path, {"accuracy": 0.7, "score_mean": 2.0, "score_std": 4.0})
    combination = combination_for(grpo_args(tmp_path), str(path))
    assert (combination.whitening, combination.whiten_mean, combination.whiten_std) == ("fixed", 2.0, 4.0)
    assert combine_rewards(torch.tensor([2.0, 6.0]), combination=combination).tolist() == [0.0, 1.0]


def test_fixed_whitening_statistics_from_the_config_win(tmp_path: Path) -> None:
    path = rm_dir(tmp_path, {"score_mean": 2.0, "score_std": 4.0})
    args = grpo_args(tmp_path, "--reward_whitening_mean", "-1", "--reward_whitening_std", "0.5")
    combination = combination_for(args, str(path))
    assert (combination.whiten_mean, combination.whiten_std) == (-1.0, 0.5)


def test_fixed_whitening_without_statistics_is_an_error(tmp_path: Path) -> None:
    path = rm_dir(tmp_path, None)  # an RM trained without an eval split: no rm_eval.json
    with pytest.raises(RewardModelError, match="reward_whitening_mean") as err:
        combination_for(grpo_args(tmp_path), str(path))
    assert "rm_eval.json" in str(err.value)
    with pytest.raises(RewardModelError, match="reward_whitening_std"):
        combination_for(grpo_args(tmp_path, "--reward_whitening_mean", "1.0"), str(path))


def test_fixed_whitening_of_two_rms_needs_explicit_statistics(tmp_path: Path) -> None:
    path = rm_dir(tmp_path, {"score_mean": 2.0, "score_std": 4.0})
    args = grpo_args(tmp_path, "--safety_reward_model_path", str(path))
    with pytest.raises(RewardModelError, match="safety"):
        combination_for(args, str(path))  # the helpfulness RM's statistics do not describe the safety scores


def test_ppo_config_has_the_same_whitening_fields(tmp_path: Path) -> None:
    from recipes.ppo.train import PPOScriptArguments

    args = parse_config(
        [PPOScriptArguments],
        ["--reward_whitening", "fixed", "--reward_whitening_mean", "3", "--reward_whitening_std", "2"],
    )[0]
    combination = combination_for(args, str(rm_dir(tmp_path, None)))
    assert (combination.whitening, combination.whiten_mean, combination.whiten_std) == ("fixed", 3.0, 2.0)


def test_batch_and_none_ignore_the_statistics(tmp_path: Path) -> None:
    from recipes.grpo.train import GRPORecipeArguments

    for mode in ("batch", "none"):
        args = parse_config([GRPORecipeArguments], ["--reward_whitening", mode])[0]
        assert combination_for(args, str(tmp_path)).whitening == mode
