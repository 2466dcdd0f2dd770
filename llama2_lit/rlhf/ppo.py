"""Proximal Policy Optimization, the pieces a PPO step is made of (paper section 3.2.3).

The paper trains with PPO (Schulman et al. 2017) following Stiennon et al. 2020, with clip 0.2,
and says nothing else about the algorithm: the value model, the advantage estimator (we use GAE,
Schulman et al. 2016), the KL granularity (we penalise per token) and the loss aggregation are our
choices, stated where they are made.

All tensors of a rollout are (B, T) over the response tokens only, right-padded, with a response
mask that is 1 up to and including the EOS (when one was emitted). Masks may be bool, integer or
float. Functions are pure: tensors in, tensors out.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from llama2_lit.rlhf.rewards import last_valid_index, masked_mean, whiten

__all__ = ["PolicyLossOutput", "Trajectory", "ValueLossOutput", "entropy_from_logits", "explained_variance",
           "fit_value_calibration", "gae_advantages", "kl_per_token", "masked_mean", "masked_whiten",
           "ppo_policy_loss", "ppo_value_loss"]


class Trajectory(NamedTuple):
    """One PPO rollout batch: B prompts, one sampled response each (paper section 3.2.3).

    P = longest prompt, T = longest response. Every (B, T) float tensor is 0 where
    ``response_mask`` is 0. All of it is computed without gradients, at rollout time.
    """

    query_ids: Tensor
    """(B, P) long, the prompts, left-padded."""
    query_mask: Tensor
    """(B, P) 1 on real prompt tokens."""
    response_ids: Tensor
    """(B, T) long, the sampled responses, right-padded."""
    response_mask: Tensor
    """(B, T) 1 on generated tokens, up to and including EOS when emitted."""
    logprobs: Tensor
    """(B, T) log π_θ_old of each response token, at the sampling temperature."""
    ref_logprobs: Tensor
    """(B, T) log π_0 of each response token, at the same temperature."""
    values: Tensor
    """(B, T) the value model's estimate, before the update, of the state in which response token
    t is about to be generated: read at the same position whose logits give ``logprobs[:, t]``
    (the position before token t). So the response mask is also the values' mask."""
    score: Tensor
    """(B,) the sequence reward put on the last token: R̃_c = WHITEN(LOGIT(R_c)), after any
    missing-EOS penalty."""
    rewards: Tensor
    """(B, T) per-token rewards of Eq. (4) (``penalized_token_rewards``)."""
    advantages: Tensor
    """(B, T) GAE advantages (``gae_advantages``), whitened over valid tokens."""
    returns: Tensor
    """(B, T) value targets: advantages before whitening + values."""

    def select(self, index: Tensor | slice) -> Trajectory:
        """The rows ``index`` of every tensor (a PPO mini-batch)."""
        return Trajectory(*(t[index] for t in self))

    def trim_padding(self) -> Trajectory:
        """The same rows without the columns that are padding in every row: the leading prompt
        columns and the trailing response columns. A mini-batch's rows are a few of the batch's,
        so its longest prompt and response are usually shorter than the batch's; the forward and
        backward passes then skip what no row needs. Real tokens keep their positions (counted
        over real tokens) and what they attend to, so every number is the same."""
        prompt_real = self.query_mask.bool().any(0)
        begin = int(prompt_real.int().argmax()) if bool(prompt_real.any()) else self.query_mask.shape[1]
        response_real = self.response_mask.bool().any(0)
        end = int(response_real.nonzero().max()) + 1 if bool(response_real.any()) else 0
        fields = self._asdict()
        for name in ("query_ids", "query_mask"):
            fields[name] = fields[name][:, begin:]
        for name in ("response_ids", "response_mask", "logprobs", "ref_logprobs", "values", "rewards",
                     "advantages", "returns"):
            fields[name] = fields[name][:, :end]
        return Trajectory(**fields)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """``rewards.whiten`` over the valid positions of ``mask`` (used on the advantages)."""
    return whiten(x, mask, shift_mean)


def kl_per_token(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of D_KL(π_θ ‖ π_0) in Eq. (4), from tokens sampled from π_θ.

    ``"k1"``: ``log π_θ − log π_0``, unbiased but negative on some tokens.
    ``"k3"``: ``exp(r) − 1 − r`` with ``r = log π_0 − log π_θ``, also unbiased, non-negative on
    every token and of lower variance when the two policies are close.

    Both log-probs must be of the distribution the tokens were sampled from: the logits of the
    policy *and* of the reference divided by the same sampling temperature. Otherwise the
    estimate is of a different KL (and is biased).
    """
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k3":
        log_ratio = ref_logprobs - logprobs
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"kl_per_token: estimator must be 'k1' or 'k3', got {estimator!r}")


@torch.no_grad()
def gae_advantages(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0,
                   lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016): ``(advantages, returns)``, (B, T).

    ``δ_t = r_t + γ V_{t+1} − V_t`` and ``A_t = δ_t + γλ A_{t+1}``, with ``V`` and ``A`` taken as 0
    after the last valid token (the episode ends there: no bootstrap). ``returns = A + V`` are the
    value model's targets. ``values[:, t]`` is the estimate of the state before token t (see
    ``Trajectory.values``) and ``rewards[:, t]`` the reward for emitting it. Masked positions give
    0. The paper does not say how it estimates advantages; γ = 1, λ = 0.95 are the usual choice
    for language-model PPO. No gradient flows: advantages and returns are targets.
    """
    if not rewards.shape == values.shape == mask.shape:
        raise ValueError(f"gae_advantages: shapes differ: rewards {tuple(rewards.shape)}, values "
                         f"{tuple(values.shape)}, mask {tuple(mask.shape)}")
    last_valid_index(mask)  # checks right padding
    valid = mask.to(values.dtype)
    rewards, values = rewards * valid, values * valid
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * valid[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * valid


@torch.no_grad()
def fit_value_calibration(values: Tensor, returns: Tensor, mask: Tensor) -> tuple[float, float]:
    """The affine map ``(a, c)`` minimising ``Σ_t (a · V_t + c − G_t)²`` over the valid tokens.

    A value model initialised from a reward model outputs the RM's raw logits (several units, all
    positive when the RM likes most answers), while PPO's returns are in the units of the whitened
    score (mean 0, spread 1). Fitted once on the first rollout with Monte-Carlo returns ``G``
    (which do not depend on V), ``a · V + c`` keeps what the RM knows about each state and speaks
    the returns' units. Without it the clipped value loss (``ppo_value_loss``) lets V move only
    ``clip_eps`` per iteration towards targets several units away, and GAE's advantages are
    dominated by the offset instead of the score. When V carries no information (constant), the
    fit is ``a = 0`` and ``c`` the mean return: a plain baseline.
    """
    valid = mask.bool()
    if not values.shape == returns.shape == valid.shape:
        raise ValueError(f"fit_value_calibration: shapes differ: values {tuple(values.shape)}, returns "
                         f"{tuple(returns.shape)}, mask {tuple(valid.shape)}")
    v, g = values[valid].double(), returns[valid].double()
    if v.numel() == 0:
        raise ValueError("fit_value_calibration: the mask selects no token")
    variance = v.var(unbiased=False)
    if variance < 1e-12:
        return 0.0, float(g.mean())
    scale = ((v - v.mean()) * (g - g.mean())).mean() / variance
    return float(scale), float(g.mean() - scale * v.mean())


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 − mean((G − V)²) / Var(G)`` over the valid tokens (R², the coefficient of determination):
    1 for a perfect value model, 0 for one no better than the mean return, negative for one worse
    than that (a diagnostic to log). Unlike the ``1 − Var(G − V) / Var(G)`` some libraries log, it
    also counts a constant offset between V and G, which biases every advantage GAE computes."""
    valid = mask.bool()
    g, v = returns[valid].float(), values[valid].float()
    variance = g.var(unbiased=False)
    if variance < 1e-12:
        return torch.zeros(())
    return 1 - ((g - v) ** 2).mean() / variance


class PolicyLossOutput(NamedTuple):
    """``ppo_policy_loss`` output: the loss (with gradient) and detached statistics to log."""

    loss: Tensor
    """() the clipped surrogate loss, to minimise."""
    clip_fraction: Tensor
    """() share of valid tokens where the clipped term is the one used."""
    ratio_mean: Tensor
    """() mean probability ratio π_θ / π_θ_old (exactly 1 on the first mini-batch)."""
    approx_kl: Tensor
    """() estimate of D_KL(π_θ_old ‖ π_θ) over the mini-batch: mean of ``(ratio − 1) − log ratio``."""


def ppo_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                    clip_eps: float = 0.2) -> PolicyLossOutput:
    """PPO's clipped surrogate loss, per token, clip ε = 0.2 (paper section 3.2.3).

    ``loss = mean_t max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε))`` with ``ρ_t = π_θ / π_θ_old``.
    Aggregation: a plain mean over all valid tokens of the mini-batch, so each token counts once
    and longer responses weigh more (a per-sequence mean would weigh each response once instead;
    the paper does not say which it used).
    """
    valid = mask.bool()
    log_ratio = torch.where(valid, logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), valid)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(ratio.dtype), valid)
        ratio_mean = masked_mean(ratio, valid)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, valid)
    return PolicyLossOutput(loss, clip_fraction, ratio_mean, approx_kl)


class ValueLossOutput(NamedTuple):
    """``ppo_value_loss`` output."""

    loss: Tensor
    """() the clipped value loss, to minimise."""
    clip_fraction: Tensor
    """() share of valid tokens where the clipped prediction gives the larger error."""


def ppo_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *,
                   clip_eps: float = 0.2) -> ValueLossOutput:
    """Clipped value loss: ``0.5 · mean_t max((V_t − R_t)², (clip(V_t, V_old ± ε) − R_t)²)``.

    The paper does not describe its value model or its loss; this is the clipped form of the
    PPO reference implementations, with the same token-level mean as ``ppo_policy_loss``.
    """
    valid = mask.bool()
    clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(error, clipped_error), valid)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_error > error).to(values.dtype), valid)
    return ValueLossOutput(loss, clip_fraction)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy ``−Σ_v p_v log p_v`` of ``softmax(logits)`` over the last dimension, in float32.

    For logging: divide the logits by the sampling temperature first to get the entropy of the
    distribution that was sampled. Stable for large logits and for ``-inf`` (masked) entries.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
