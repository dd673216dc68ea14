"""The PPO arithmetic (recipes/ppo/algorithm.py) against hand computation on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from recipes.ppo import algorithm as ppo


def test_response_lengths_stop_at_the_first_stop_token() -> None:
    responses = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    assert ppo.response_lengths(responses, stop_token_id=2).tolist() == [2, 4, 1]
    assert ppo.response_lengths(responses, stop_token_id=None).tolist() == [4, 4, 4]
    assert ppo.length_mask(torch.tensor([2, 4, 1]), 4).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_token_logprobs_and_entropy_at_a_temperature() -> None:
    logits = torch.tensor([[[2.0, 0.0, 0.0]]])
    tokens = torch.tensor([[0]])
    # softmax([1, 0, 0]) at T = 2: e / (e + 2)
    expected = math.log(math.e / (math.e + 2))
    assert ppo.token_logprobs(logits, tokens, temperature=2.0).item() == pytest.approx(expected, abs=1e-6)
    p = torch.tensor([math.e, 1.0, 1.0]) / (math.e + 2)
    assert ppo.entropy(logits, 2.0).item() == pytest.approx(float(-(p * p.log()).sum()), abs=1e-6)


def test_per_token_rewards_put_the_score_on_the_last_real_token() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = ppo.per_token_rewards(torch.tensor([1.0, -1.0]), logprobs, ref, mask, kl_coef=0.1)
    assert kl.tolist() == [[0.5, 0.0, -1.0], [1.0, 0.0, 0.0]]
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 0.1 + 1.0], [-0.1, -1.0, 0.0]]))


def test_gae_by_hand() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 0.0]])
    values = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])  # 9.0 sits on padding: must not count
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    gamma, lam = 0.9, 0.8
    advantages, returns = ppo.gae(rewards, values, mask, gamma, lam)
    # row 0: deltas d2 = 1 - 0.3, d1 = 0 + 0.9*0.3 - 0.2, d0 = 0 + 0.9*0.2 - 0.1; A_t = d_t + 0.72 A_{t+1}
    d2, d1, d0 = 0.7, 0.07, 0.08
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    # row 1 ends after token 1: d1 = 2 - 0.5 (no next value), d0 = 0.5 + 0.9*0.5 - 0.4
    b1 = 1.5
    b0 = 0.55 + gamma * lam * b1
    torch.testing.assert_close(advantages, torch.tensor([[a0, a1, a2], [b0, b1, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[a0 + 0.1, a1 + 0.2, a2 + 0.3], [b0 + 0.4, b1 + 0.5, 0.0]]))


def test_gae_with_gamma_and_lambda_one_is_the_reward_to_go_minus_the_value() -> None:
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, 0.25, 0.125]])
    advantages, returns = ppo.gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    torch.testing.assert_close(returns, torch.tensor([[6.0, 5.0, 3.0]]))
    torch.testing.assert_close(advantages, torch.tensor([[5.5, 4.75, 2.875]]))


def test_masked_whiten_uses_only_real_tokens() -> None:
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    real = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    mean, std = real.mean(), real.std()  # unbiased
    whitened = ppo.masked_whiten(values, mask)
    torch.testing.assert_close(whitened[mask.bool()], (real - mean) / std, atol=1e-5, rtol=1e-5)
    assert whitened[0, 2] == 0
    kept = ppo.masked_whiten(values, mask, shift_mean=False)
    torch.testing.assert_close(kept[mask.bool()], (real - mean) / std + mean, atol=1e-5, rtol=1e-5)


def test_policy_loss_clips_the_ratio() -> None:
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    advantages = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.ones(1, 3)
    loss, stats = ppo.policy_loss(new, old, advantages, mask, cliprange=0.2)
    # token 0: A>0, r=1.5 -> clipped at 1.2: max(-1.5, -1.2) = -1.2 (clipped); token 1: A>0, r=0.5: max(-0.5, -0.8)
    # = -0.5 (unclipped); token 2: A<0, r=1.1 inside the range: 2.2
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    assert stats["ratio"].item() == pytest.approx((1.5 + 0.5 + 1.1) / 3, abs=1e-6)
    # the gradient flows only where the unclipped term is the maximum
    new = new.clone().requires_grad_(True)
    ppo.policy_loss(new, old, advantages, mask, cliprange=0.2)[0].backward()
    torch.testing.assert_close(new.grad, torch.tensor([[0.0, -0.5 / 3, 2.2 / 3]]))


def test_policy_loss_ignores_padding() -> None:
    loss, _ = ppo.policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([[2.0, 50.0]]),
                              torch.tensor([[1.0, 0.0]]), 0.2)  # fmt: skip
    assert loss.item() == pytest.approx(-2.0)


def test_value_loss_clips_around_the_old_value() -> None:
    values = torch.tensor([[1.0, 0.3]])
    old = torch.tensor([[0.0, 0.0]])
    returns = torch.tensor([[0.0, 1.0]])
    loss, stats = ppo.value_loss(values, old, returns, torch.ones(1, 2), cliprange_value=0.2)
    # token 0: V=1 vs clipped 0.2, R=0: max(1, 0.04) = 1; token 1: V=0.3 vs clipped 0.2, R=1: max(0.49, 0.64) = 0.64
    assert loss.item() == pytest.approx(0.5 * (1.0 + 0.64) / 2, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(0.5)


def _whiten_on_rank(rank: int, port: int, values: torch.Tensor, mask: torch.Tensor, results) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        half = slice(rank * 2, rank * 2 + 2)  # rank 0 rows 0-1, rank 1 rows 2-3
        results[rank] = ppo.masked_whiten(values[half], mask[half])
    finally:
        torch.distributed.destroy_process_group()


def test_masked_whiten_uses_the_whole_batch_of_every_process() -> None:
    """Two processes, each holding half the rows: each half is whitened with the statistics of all four rows."""
    import socket

    import torch.multiprocessing as mp

    values = torch.tensor([[1.0, 2.0, 0.0], [3.0, 4.0, 5.0], [10.0, 0.0, 0.0], [-2.0, 6.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_whiten_on_rank, args=(port, values, mask, results), nprocs=2, join=True)
    together = torch.cat([results[0], results[1]])
    torch.testing.assert_close(together, ppo.masked_whiten(values, mask), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(results[0], ppo.masked_whiten(values[:2], mask[:2]))  # not per process
