"""The mathematics of RLHF (paper section 3.2), as plain functions on tensors.

No Lightning, no I/O, no state: each function is one formula of the paper (or one step of the
algorithm the paper names), tested in isolation on hand-computed cases, and the training stages
call them.

``ranking`` is the reward models' loss, paper section 3.2.2:

* ``ranking_loss`` — Eq. (2), ``-log σ(r_c − r_r − m(r))``, with ``rating_margins`` (Table 27's
  margins by rating) and ``safety_auxiliary_loss`` (our reading of the safety RM's auxiliary loss).

``rewards`` is the reward of PPO, paper section 3.2.3, Eq. (4):

* ``safety_first_reward`` — R_c, the safety reward model's score where the prompt is
  safety-tagged or the response looks unsafe (R_s < 0.15), the helpfulness score otherwise;
  ``uses_safety_reward`` is its condition.
* ``logit``, ``whiten`` (and ``whiten_with_stats``) — R̃_c = WHITEN(LOGIT(R_c)).
* ``penalized_token_rewards`` — R̃_c − β · KL spread over the response tokens: the score on the
  last token, −β · KL on every token, and a penalty for responses that never ended.

``ppo`` is the algorithm the paper trains with (PPO, Schulman et al. 2017, following Stiennon et
al. 2020), whose details the paper leaves open apart from clip 0.2 and β:

* ``kl_per_token`` — the per-token KL estimate to the original policy π_0 (k1 or k3).
* ``gae_advantages`` — advantages and value targets; ``fit_value_calibration`` — the affine map
  that puts a value model initialised from a reward model into the returns' units;
  ``explained_variance`` — how much of the returns the value model predicts.
* ``ppo_policy_loss``, ``ppo_value_loss`` — the clipped losses, with the statistics to log.
* ``entropy_from_logits``, ``masked_mean``, ``masked_whiten`` — helpers; ``Trajectory`` — the
  tensors of one rollout batch.
"""

from llama2_lit.rlhf.ppo import (
    PolicyLossOutput,
    Trajectory,
    ValueLossOutput,
    entropy_from_logits,
    explained_variance,
    fit_value_calibration,
    gae_advantages,
    kl_per_token,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)
from llama2_lit.rlhf.ranking import MARGINS, rating_margins, ranking_loss, safety_auxiliary_loss
from llama2_lit.rlhf.rewards import (
    SAFETY_THRESHOLD,
    WhitenStats,
    last_valid_index,
    logit,
    penalized_token_rewards,
    safety_first_reward,
    uses_safety_reward,
    whiten,
    whiten_with_stats,
)

__all__ = [
    "MARGINS", "rating_margins", "ranking_loss", "safety_auxiliary_loss",
    "SAFETY_THRESHOLD", "PolicyLossOutput", "Trajectory", "ValueLossOutput", "WhitenStats", "entropy_from_logits",
    "explained_variance", "fit_value_calibration", "gae_advantages", "kl_per_token", "last_valid_index", "logit",
    "masked_mean", "masked_whiten",
    "penalized_token_rewards", "ppo_policy_loss", "ppo_value_loss", "safety_first_reward", "uses_safety_reward",
    "whiten", "whiten_with_stats",
]
