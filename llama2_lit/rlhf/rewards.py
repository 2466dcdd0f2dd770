"""The reward PPO maximises: paper section 3.2.3, Eq. (3)-(4).

    R(g | p)   = R̃_c(g | p) − β · D_KL(π_θ(g | p) ‖ π_0(g | p))                      (Eq. 4)
    R_c(g | p) = R_s(g | p)  if IS_SAFETY(p) or R_s(g | p) < 0.15,  else R_h(g | p)
    R̃_c(g | p) = WHITEN(LOGIT(R_c(g | p)))

``safety_first_reward`` is R_c, ``logit`` and ``whiten`` are LOGIT and WHITEN, and
``penalized_token_rewards`` spreads Eq. (4) over the response tokens. Every function is pure: tensors
in, tensors out, no state.

Masks may be bool, integer or float tensors (1 = a real token); responses are right-padded, so the
real tokens of a row are a prefix of it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

SAFETY_THRESHOLD = 0.15
"""Paper section 3.2.3: below this safety score the safety reward model decides (precision 0.89,
recall 0.55 on Meta's safety test set)."""


def uses_safety_reward(safety: Tensor, is_safety: Tensor, threshold: float = SAFETY_THRESHOLD) -> Tensor:
    """Where R_c takes the safety score: ``IS_SAFETY(p) or R_s(g | p) < threshold`` (bool).

    ``is_safety`` is the prompt's tag (prompts that may elicit unsafe answers); the comparison is
    strict, so a safety score of exactly ``threshold`` is left to the helpfulness model.
    """
    return is_safety.bool() | (safety < threshold)


def safety_first_reward(helpfulness: Tensor, safety: Tensor, is_safety: Tensor,
                        threshold: float = SAFETY_THRESHOLD) -> Tensor:
    """R_c of paper section 3.2.3: the safety score where ``uses_safety_reward``, else helpfulness.

    Both scores are on the sigmoid scale, in [0, 1] (the reward models' ``sigmoid(logit)``): the
    0.15 threshold is defined on that scale. Raw reward-model logits are refused.
    """
    if helpfulness.shape != safety.shape or is_safety.shape != safety.shape:
        raise ValueError(f"safety_first_reward: shapes differ: helpfulness {tuple(helpfulness.shape)}, "
                         f"safety {tuple(safety.shape)}, is_safety {tuple(is_safety.shape)}")
    for name, score in (("helpfulness", helpfulness), ("safety", safety)):
        if ((score < 0) | (score > 1)).any():
            raise ValueError(f"safety_first_reward: {name} scores must be sigmoid-scale, in [0, 1]; got "
                             f"range [{score.min().item():.4g}, {score.max().item():.4g}] (raw RM logits?)")
    return torch.where(uses_safety_reward(safety, is_safety, threshold), safety, helpfulness)


def logit(p: Tensor, eps: float = 1e-6) -> Tensor:
    """LOGIT of paper section 3.2.3: ``log(p / (1 − p))``, the inverse of the sigmoid.

    The paper applies it to R_c to recover "the final linear scores" before whitening. The result
    is clamped to ``±log((1 − eps) / eps)`` (about ±13.8 for the default eps), as if ``p`` were
    clamped to ``[eps, 1 − eps]``, so scores that saturated to exactly 0 or 1 stay finite. We clamp
    the output, not ``p``: in float32, ``1 − 1e-6`` is not representable and clamping ``p`` would
    give +13.80 but −13.82.
    """
    bound = math.log((1.0 - eps) / eps)
    return torch.logit(p).clamp(-bound, bound)


class WhitenStats(NamedTuple):
    """``whiten_with_stats`` output: the whitened tensor and the statistics it was whitened with."""

    whitened: Tensor
    """Same shape as the input; 0 where the mask is 0."""
    mean: float
    """Mean of the valid values before whitening."""
    std: float
    """Population standard deviation of the valid values before whitening."""


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is set, over all of them or along ``dim``.

    Masked-out positions are ignored even when they hold NaN or inf. With ``dim``, a row with no
    valid position gives 0; without, an empty mask is an error (a loss over nothing).
    """
    mask = mask.bool()
    total = torch.where(mask, x, torch.zeros_like(x)).sum(dim)
    count = mask.sum(dim)
    if dim is None:
        if count.item() == 0:
            raise ValueError("masked_mean: the mask selects no position")
        return total / count
    return total / count.clamp(min=1)


def whiten_with_stats(x: Tensor, mask: Tensor | None = None, shift_mean: bool = True,
                      eps: float = 1e-8) -> WhitenStats:
    """WHITEN of paper section 3.2.3, also returning the mean and standard deviation it used.

    The paper says only that whitening the scores "is important for stability and balance with
    the KL penalty term (β)"; it does not define WHITEN. We standardise over the whole batch (or
    over the valid positions of ``mask``): ``(x − mean) / sqrt(var + eps)`` with the population
    variance (divide by n), so the result has mean 0 and mean square 1 over the valid positions.
    ``shift_mean=False`` rescales to unit variance but keeps the original mean:
    ``(x − mean) / sqrt(var + eps) + mean``. Masked positions come out as 0. Statistics are of
    this tensor only (one process, one batch).

    Fewer than two valid values is an error: whitening a single value erases it.
    """
    valid = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
    if valid.shape != x.shape:
        raise ValueError(f"whiten: mask shape {tuple(valid.shape)} differs from values {tuple(x.shape)}")
    count = int(valid.sum().item())
    if count < 2:
        raise ValueError(f"whiten: needs at least 2 valid values, got {count} (whitening one value erases it)")
    mean = masked_mean(x, valid)
    var = masked_mean((x - mean) ** 2, valid)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    whitened = torch.where(valid, whitened, torch.zeros_like(whitened))
    return WhitenStats(whitened, mean.item(), var.sqrt().item())


def whiten(x: Tensor, mask: Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """WHITEN of paper section 3.2.3 (see ``whiten_with_stats``, which also returns the statistics)."""
    return whiten_with_stats(x, mask, shift_mean, eps).whitened


def last_valid_index(mask: Tensor) -> Tensor:
    """(B,) index of the last valid position of each row of a right-padded (B, T) mask.

    Raises if a row is empty or not right-padded (a valid position after a padding one).
    """
    valid = mask.bool()
    if valid.dim() != 2:
        raise ValueError(f"expected a (batch, response_len) mask, got shape {tuple(valid.shape)}")
    if not valid.any(-1).all():
        raise ValueError("response mask has a row with no valid token (an empty response)")
    if (valid[:, 1:] & ~valid[:, :-1]).any():
        raise ValueError("response mask is not right-padded (a valid token follows a padding one)")
    return valid.sum(-1) - 1


def penalized_token_rewards(score: Tensor, kl: Tensor, response_mask: Tensor, *, beta: float,
                            missing_eos: Tensor | None = None, missing_eos_penalty: float = 0.0) -> Tensor:
    """Eq. (4) of paper section 3.2.3 as per-token rewards (B, T) for the response tokens.

    ``score`` (B,) is the sequence reward R̃_c, already whitened; ``kl`` (B, T) the per-token KL
    to π_0 (``ppo.kl_per_token``). Every valid response token gets ``−β · kl``; the last valid
    token, the EOS when the response emitted one, also gets the score. Positions after it are 0.
    So the rewards of a row sum to ``score − β · Σ_t kl_t``, Eq. (4) with the sequence KL taken
    as the sum of per-token log-ratios; the paper does not say at which granularity it applies
    the KL penalty.

    ``missing_eos`` (B,) bool marks responses cut at the length limit without an EOS; their
    score becomes ``score − missing_eos_penalty``. The paper does not discuss truncated
    responses. A reward model scores the truncated text as if it were a finished answer, so without
    a penalty the policy is free to ramble; forcing an EOS onto the sample instead would make it
    off-policy. The N+ implementation details of RLHF (Huang et al. 2024) replace such scores by a
    constant; we subtract a configurable penalty (0 = off).
    """
    valid = response_mask.bool()
    if kl.shape != valid.shape or score.shape != valid.shape[:1]:
        raise ValueError(f"penalized_token_rewards: expected score (B,) and kl, mask (B, T); got score "
                         f"{tuple(score.shape)}, kl {tuple(kl.shape)}, mask {tuple(valid.shape)}")
    last = last_valid_index(valid)
    if missing_eos is not None:
        score = score - missing_eos_penalty * missing_eos.to(score.dtype)
    rewards = torch.where(valid, -beta * kl, torch.zeros_like(kl))
    return rewards.scatter_add(1, last[:, None], score[:, None].to(rewards.dtype))
