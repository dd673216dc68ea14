"""The PPO arithmetic on tensors, as plain functions (tested against hand computation in tests/unit).

Shapes: `(rows, response tokens)`; `mask` is 1 on a response's real tokens (up to and including its stop token) and
0 on the padding after it. Statistics over "the batch" are over every process's rows when torch.distributed runs:
`masked_whiten` all-reduces the sums and counts, so the scale of rewards and advantages depends neither on how many
processes share the batch nor on the chunk size used to collect it.
"""

from __future__ import annotations

import torch


def response_lengths(responses: torch.Tensor, stop_token_id: int | None) -> torch.Tensor:
    """Tokens each response keeps: up to and including the first stop token, all of them without one."""
    width = responses.shape[1]
    if stop_token_id is None:
        return torch.full((responses.shape[0],), width, dtype=torch.long, device=responses.device)
    is_stop = responses == stop_token_id
    first_stop = is_stop.int().argmax(1)  # 0 where there is none: replaced below
    return torch.where(is_stop.any(1), first_stop + 1, torch.full_like(first_stop, width))


def length_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    return (torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]).float()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T)[token], without materialising the full log-softmax (large vocabularies)."""
    logits = logits.float() / temperature
    return logits.gather(-1, tokens[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Entropy of softmax(logits / T) per position."""
    logits = logits.float() / temperature
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor


def global_masked_mean_var(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance of the masked values of every process (two all-reduces, float64 sums)."""
    v, m = values.double(), mask.double()
    totals = _all_reduce(torch.stack([m.sum(), (v * m).sum()]))
    count = totals[0].clamp(min=1)
    mean = totals[1] / count
    squares = _all_reduce(((v - mean) ** 2 * m).sum().reshape(1))[0]
    var = squares / (count - 1).clamp(min=1)
    return mean.to(values.dtype), var.to(values.dtype)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8):
    """(x - mean) / std over the masked entries of the whole batch; `shift_mean=False` keeps the mean (rewards)."""
    mean, var = global_masked_mean_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def per_token_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, kl): r_t = -kl_coef (log p - log p_ref) at every response token, + the score at the last one."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    return rewards, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), backwards over the response tokens:

    delta_t = r_t + gamma V_{t+1} - V_t        (V after the last real token is 0: the episode ends there)
    A_t     = delta_t + gamma lam A_{t+1}
    returns = A + V (the value targets)
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, advantages + values


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cliprange: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate, as a loss: mean over tokens of max(-A r, -A clip(r, 1-eps, 1+eps)), r = p / p_old."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approxkl": 0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """0.5 x mean over tokens of max((V - R)^2, (V_clipped - R)^2), V_clipped = V_old + clip(V - V_old, +-eps)."""
    clipped_values = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_loss, clipped_loss), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped_loss > unclipped_loss).float(), mask)}
    return loss, stats
