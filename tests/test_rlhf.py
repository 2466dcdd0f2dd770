"""The RLHF formulas of paper section 3.2.3, each on hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from llama2_lit.rlhf import (
    Trajectory,
    entropy_from_logits,
    explained_variance,
    fit_value_calibration,
    gae_advantages,
    kl_per_token,
    logit,
    masked_mean,
    masked_whiten,
    penalized_token_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    safety_first_reward,
    uses_safety_reward,
    whiten,
    whiten_with_stats,
)


def t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


# ---------------------------------------------------------------- R_c, logit, whiten


def test_safety_first_reward_threshold_and_tag():
    helpfulness = t([0.9, 0.9, 0.9, 0.9, 0.3, 0.7])
    safety = t([0.15, 0.1499, 0.5, 0.05, 0.8, 0.15])
    is_safety = t([False, False, True, False, True, True], torch.bool)
    # 0.15 is not < 0.15: helpfulness decides row 0 unless the prompt is tagged (row 5).
    assert uses_safety_reward(safety, is_safety).tolist() == [False, True, True, True, True, True]
    torch.testing.assert_close(safety_first_reward(helpfulness, safety, is_safety),
                               t([0.9, 0.1499, 0.5, 0.05, 0.8, 0.15]), rtol=0, atol=0)
    # Untagged and safe: always helpfulness; a different threshold moves the boundary.
    untagged = torch.zeros(6, dtype=torch.bool)
    torch.testing.assert_close(safety_first_reward(helpfulness, safety, untagged, threshold=0.1),
                               t([0.9, 0.9, 0.9, 0.05, 0.3, 0.7]), rtol=0, atol=0)
    # The tag may come as 0/1 integers.
    assert uses_safety_reward(safety, is_safety.long()).tolist() == [False, True, True, True, True, True]


def test_safety_first_reward_refuses_raw_logits_and_shape_mismatch():
    with pytest.raises(ValueError, match="helpfulness scores must be sigmoid-scale"):
        safety_first_reward(t([2.3]), t([0.5]), t([False], torch.bool))
    with pytest.raises(ValueError, match="shapes differ"):
        safety_first_reward(t([0.5, 0.5]), t([0.5]), t([False], torch.bool))


def test_logit_inverts_sigmoid_and_clamps():
    x = torch.linspace(-6, 6, 13)
    torch.testing.assert_close(logit(torch.sigmoid(x)), x, rtol=0, atol=1e-4)
    assert logit(t([0.5])).item() == 0.0
    assert logit(t([0.8])).item() == pytest.approx(math.log(4.0), abs=1e-6)
    edge = logit(t([0.0, 1.0]))  # symmetric, even though 1 − 1e-6 is not a float32
    bound = math.log((1 - 1e-6) / 1e-6)  # 13.8155
    assert torch.isfinite(edge).all()
    assert edge.tolist() == pytest.approx([-bound, bound], abs=1e-5)
    assert logit(t([0.0]), eps=1e-3).item() == pytest.approx(math.log(1e-3 / (1 - 1e-3)), abs=1e-4)


def test_whiten_over_valid_positions_only():
    x = t([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 6.0, float("nan")]])
    mask = t([[1, 1, 1, 0], [1, 1, 1, 0]], torch.long)
    mean, std = 3.5, math.sqrt(17.5 / 6)  # the valid values 1..6, population variance
    out = whiten_with_stats(x, mask)
    assert out.mean == pytest.approx(mean) and out.std == pytest.approx(std, rel=1e-6)
    expected = t([[(v - mean) / std for v in (1, 2, 3)] + [0.0], [(v - mean) / std for v in (4, 5, 6)] + [0.0]])
    torch.testing.assert_close(out.whitened, expected, rtol=0, atol=1e-6)
    valid = mask.bool()
    assert out.whitened[valid].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert out.whitened[valid].pow(2).mean().item() == pytest.approx(1.0, abs=1e-6)
    # Padding neither enters the statistics (100, NaN) nor comes out nonzero.
    assert out.whitened[~valid].tolist() == [0.0, 0.0]
    torch.testing.assert_close(masked_whiten(x, mask), out.whitened, rtol=0, atol=0)
    # shift_mean=False keeps the mean, still unit variance.
    kept = whiten(x, mask, shift_mean=False)
    assert kept[valid].mean().item() == pytest.approx(mean, abs=1e-5)
    assert kept[valid].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)


def test_whiten_whole_batch_and_single_value_refused():
    scores = t([2.0, 4.0])
    torch.testing.assert_close(whiten(scores), t([-1.0, 1.0]), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 valid values, got 1"):
        whiten(t([3.0, 9.0]), t([1, 0]))


# ---------------------------------------------------------------- Eq. (4) per token


def test_penalized_token_rewards_score_on_last_token_kl_on_every_token():
    score = t([2.0, -1.0, 0.5])
    kl = t([[0.1, -0.2, 0.3, 5.0], [0.5, 0.0, 9.0, 9.0], [0.2, 0.2, 0.2, 0.2]])
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], torch.long)
    missing_eos = t([False, True, True], torch.bool)  # rows 1 and 2 were cut at the length limit
    rewards = penalized_token_rewards(score, kl, mask, beta=0.1, missing_eos=missing_eos, missing_eos_penalty=1.0)
    expected = t([[-0.01, 0.02, -0.03 + 2.0, 0.0],       # EOS at position 2 gets the score
                  [-0.05, -0.0 + (-1.0 - 1.0), 0.0, 0.0],  # no EOS: score − penalty on the last token
                  [-0.02, -0.02, -0.02, -0.02 + 0.5 - 1.0]])
    torch.testing.assert_close(rewards, expected, rtol=0, atol=1e-6)
    # Positive KL lowers the reward; a row's rewards sum to score − β Σ kl (Eq. 4).
    no_penalty = penalized_token_rewards(score, kl, mask, beta=0.1)
    sums = score - 0.1 * (kl * mask).sum(-1)
    torch.testing.assert_close(no_penalty.sum(-1), sums, rtol=0, atol=1e-6)
    assert no_penalty[0, 0] < 0 < no_penalty[0, 1]


def test_penalized_token_rewards_refuses_bad_masks():
    with pytest.raises(ValueError, match="no valid token"):
        penalized_token_rewards(t([1.0]), t([[0.0, 0.0]]), t([[0, 0]]), beta=0.1)
    with pytest.raises(ValueError, match="not right-padded"):
        penalized_token_rewards(t([1.0]), t([[0.0, 0.0]]), t([[0, 1]]), beta=0.1)


# ---------------------------------------------------------------- KL estimators


def test_kl_per_token_hand_values():
    logp, ref = t([-1.0, -2.0]), t([-2.0, -1.0])
    assert kl_per_token(logp, ref).tolist() == [1.0, -1.0]
    # k3 with r = ref − logp = −1, +1: e^r − 1 − r.
    assert kl_per_token(logp, ref, "k3").tolist() == pytest.approx([math.exp(-1), math.e - 2], abs=1e-6)
    with pytest.raises(ValueError, match="'k1' or 'k3'"):
        kl_per_token(logp, ref, "k2")


def test_kl_estimators_on_samples_from_the_policy():
    p = t([0.5, 0.3, 0.15, 0.05])  # the policy
    q = t([0.25, 0.25, 0.25, 0.25])  # the reference
    exact = (p * (p / q).log()).sum().item()  # KL(p ‖ q) = 0.1648
    tokens = torch.multinomial(p, 20000, replacement=True, generator=torch.Generator().manual_seed(0))
    logp, ref = p.log()[tokens], q.log()[tokens]
    k1, k3 = kl_per_token(logp, ref, "k1"), kl_per_token(logp, ref, "k3")
    assert (k1 < 0).any()  # k1 is negative on some tokens...
    assert k1.mean().item() >= 0  # ...but its mean over on-policy samples is not
    tolerance = 4 * k1.std().item() / math.sqrt(len(tokens))  # ~0.02
    assert k1.mean().item() == pytest.approx(exact, abs=tolerance)
    assert (k3 >= 0).all()
    assert k3.mean().item() == pytest.approx(exact, abs=4 * k3.std().item() / math.sqrt(len(tokens)))


# ---------------------------------------------------------------- GAE


def test_gae_gamma_1_lambda_095_with_masking():
    rewards = t([[0.0, 0.0, 1.0], [0.2, 1.0, 999.0]])
    values = t([[0.5, 0.4, 0.3], [0.1, 0.2, 777.0]])
    mask = t([[1, 1, 1], [1, 1, 0]], torch.long)
    advantages, returns = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95)
    # Row 0: δ = (−0.1, −0.1, 0.7); A_2 = 0.7, A_1 = −0.1 + 0.95·0.7, A_0 = −0.1 + 0.95·A_1.
    # Row 1: no bootstrap after the last valid token: δ_1 = 1.0 − 0.2, δ_0 = 0.2 + 0.2 − 0.1.
    torch.testing.assert_close(advantages, t([[0.43675, 0.565, 0.7], [1.06, 0.8, 0.0]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(returns, t([[0.93675, 0.965, 1.0], [1.16, 1.0, 0.0]]), rtol=0, atol=1e-6)


def test_gae_gamma_09_lambda_05():
    advantages, returns = gae_advantages(t([[0.0, 0.0, 1.0]]), t([[0.5, 0.4, 0.3]]), t([[1, 1, 1]]),
                                         gamma=0.9, lam=0.5)
    # δ = (0.9·0.4 − 0.5, 0.9·0.3 − 0.4, 1 − 0.3) = (−0.14, −0.13, 0.7); γλ = 0.45.
    torch.testing.assert_close(advantages, t([[-0.05675, 0.185, 0.7]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(returns, t([[0.44325, 0.585, 1.0]]), rtol=0, atol=1e-6)


def test_gae_lambda_1_is_monte_carlo_and_no_gradient():
    rewards, values = t([[0.1, -0.2, 0.3, 0.4]]), t([[0.3, 0.1, 0.2, 0.5]], torch.float32).requires_grad_()
    advantages, returns = gae_advantages(rewards, values, t([[1, 1, 1, 0]]), gamma=1.0, lam=1.0)
    # λ = 1, γ = 1: A_t = (sum of future rewards) − V_t, returns = reward-to-go.
    torch.testing.assert_close(returns, t([[0.2, 0.1, 0.3, 0.0]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(advantages, t([[-0.1, 0.0, 0.1, 0.0]]), rtol=0, atol=1e-6)
    assert not advantages.requires_grad and not returns.requires_grad


# ---------------------------------------------------------------- clipped losses


def test_policy_loss_first_minibatch_ratio_is_exactly_one():
    generator = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(4, 6, generator=generator) * 5
    advantages = torch.randn(4, 6, generator=generator)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    out = ppo_policy_loss(logprobs.clone().requires_grad_(), logprobs, advantages, mask)
    assert out.ratio_mean.item() == 1.0
    assert out.clip_fraction.item() == 0.0
    assert out.approx_kl.item() == 0.0
    assert out.loss.item() == pytest.approx(-advantages[mask.bool()].mean().item(), abs=1e-7)


def test_policy_loss_clipping_for_positive_and_negative_advantages():
    ratios = [1.5, 0.5, 0.5, 1.5, 9.0]
    old = t([[-1.0] * 5])
    logprobs = (old + t([ratios]).log()).requires_grad_()
    advantages = t([[1.0, -1.0, 1.0, -1.0, 5.0]])
    mask = t([[1, 1, 1, 1, 0]])  # the last token is padding
    out = ppo_policy_loss(logprobs, old, advantages, mask, clip_eps=0.2)
    # Per token max(−Aρ, −A clip(ρ, 0.8, 1.2)):
    #   A>0, ρ=1.5 → max(−1.5, −1.2) = −1.2 (clipped)   A<0, ρ=0.5 → max(0.5, 0.8) = 0.8 (clipped)
    #   A>0, ρ=0.5 → max(−0.5, −0.8) = −0.5             A<0, ρ=1.5 → max(1.5, 1.2) = 1.5
    assert out.loss.item() == pytest.approx((-1.2 + 0.8 - 0.5 + 1.5) / 4, abs=1e-6)
    assert out.clip_fraction.item() == pytest.approx(0.5)
    assert out.ratio_mean.item() == pytest.approx(1.0, abs=1e-6)
    assert out.approx_kl.item() == pytest.approx((0.5 - math.log(1.5) - 0.5 - math.log(0.5)) / 2, abs=1e-6)
    # Where clipping binds the gradient vanishes; elsewhere d(−Aρ)/d log π = −Aρ, over 4 tokens.
    out.loss.backward()
    torch.testing.assert_close(logprobs.grad, t([[0.0, 0.0, -0.5 / 4, 1.5 / 4, 0.0]]), rtol=0, atol=1e-6)


def test_value_loss_clipping():
    values = t([[0.5, 0.1, -0.5, 50.0]]).requires_grad_()
    old_values = t([[0.0, 0.0, 0.0, 0.0]])
    returns = t([[1.0, 1.0, 0.0, 0.0]])
    mask = t([[1, 1, 1, 0]])
    out = ppo_value_loss(values, old_values, returns, mask, clip_eps=0.2)
    # clip(V, ±0.2) = (0.2, 0.1, −0.2): errors max((0.25, 0.64), (0.81, 0.81), (0.25, 0.04)).
    assert out.loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 0.25) / 3, abs=1e-6)
    assert out.clip_fraction.item() == pytest.approx(1 / 3)
    out.loss.backward()  # the clipped token pulls nothing: its gradient is 0
    torch.testing.assert_close(values.grad, t([[0.0, (0.1 - 1.0) / 3, -0.5 / 3, 0.0]]), rtol=0, atol=1e-6)


def test_value_calibration_is_the_least_squares_affine_map_over_valid_tokens():
    # Returns = 0.5 V - 1 exactly on the valid tokens; the padding (huge values) is ignored.
    values = t([[3.0, 4.0, 5.0, 100.0], [2.0, 6.0, -100.0, -100.0]])
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]])
    returns = torch.where(mask.bool(), 0.5 * values - 1.0, torch.zeros_like(values))
    scale, shift = fit_value_calibration(values, returns, mask)
    assert (scale, shift) == (pytest.approx(0.5), pytest.approx(-1.0))
    assert explained_variance(values * scale + shift, returns, mask).item() == pytest.approx(1.0)
    # A raw RM head a few units off the returns explains worse than nothing; after the fit, what it can.
    noisy = returns + 3.0 + t([[0.3, -0.3, 0.1, 0.0], [-0.1, 0.2, 0.0, 0.0]])
    assert explained_variance(noisy, returns, mask).item() < 0
    scale, shift = fit_value_calibration(noisy, returns, mask)
    assert explained_variance(noisy * scale + shift, returns, mask).item() > 0.9
    # A value model that says nothing becomes the mean return: a plain baseline.
    scale, shift = fit_value_calibration(torch.full_like(values, 2.0), returns, mask)
    assert scale == 0.0 and shift == pytest.approx(returns[mask.bool()].mean().item())


def test_masked_mean():
    x, mask = t([[1.0, 2.0, float("inf")], [3.0, float("nan"), 5.0]]), t([[1, 1, 0], [1, 0, 1]])
    assert masked_mean(x, mask).item() == pytest.approx(11 / 4)
    assert masked_mean(x, mask, dim=1).tolist() == [1.5, 4.0]
    assert masked_mean(x, t([[1, 1, 0], [0, 0, 0]]), dim=1).tolist() == [1.5, 0.0]
    with pytest.raises(ValueError, match="selects no position"):
        masked_mean(x, torch.zeros_like(mask))


# ---------------------------------------------------------------- entropy, Trajectory


def test_entropy_from_logits():
    assert entropy_from_logits(torch.zeros(2, 3, 7)).flatten().tolist() == pytest.approx([math.log(7)] * 6)
    assert entropy_from_logits(t([0.5, 0.25, 0.25]).log()).item() == pytest.approx(1.5 * math.log(2), abs=1e-6)
    assert entropy_from_logits(t([0.0, 0.0, -float("inf")])).item() == pytest.approx(math.log(2), abs=1e-6)
    peaked = entropy_from_logits(t([1000.0, 0.0]).to(torch.bfloat16))
    assert peaked.dtype == torch.float32 and peaked.item() == 0.0


def test_trajectory_select_slices_every_field():
    B, P, T = 3, 2, 4
    traj = Trajectory(
        query_ids=torch.arange(B * P).view(B, P), query_mask=torch.ones(B, P),
        response_ids=torch.arange(B * T).view(B, T), response_mask=torch.ones(B, T),
        logprobs=torch.zeros(B, T), ref_logprobs=torch.zeros(B, T), values=torch.zeros(B, T),
        score=torch.arange(B, dtype=torch.float32), rewards=torch.zeros(B, T), advantages=torch.zeros(B, T),
        returns=torch.zeros(B, T),
    )
    mini = traj.select(torch.tensor([2, 0]))
    assert mini.score.tolist() == [2.0, 0.0]
    assert mini.response_ids[:, 0].tolist() == [8, 0]
    assert all(field.shape[0] == 2 for field in mini)


def test_trajectory_trim_padding_drops_only_columns_that_are_padding_in_every_row():
    # Row 0: prompt of 1 token, response of 2; row 1: prompt of 2, response of 1 (left-padded
    # prompts of width 4, right-padded responses of width 5).
    query_mask = torch.tensor([[0, 0, 0, 1], [0, 0, 1, 1]])
    response_mask = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    per_token = torch.arange(10, dtype=torch.float32).view(2, 5)
    traj = Trajectory(query_ids=torch.arange(8).view(2, 4), query_mask=query_mask,
                      response_ids=torch.arange(10).view(2, 5), response_mask=response_mask,
                      logprobs=per_token, ref_logprobs=per_token + 1, values=per_token + 2,
                      score=torch.tensor([0.5, -0.5]), rewards=per_token + 3, advantages=per_token + 4,
                      returns=per_token + 5)
    trimmed = traj.trim_padding()
    assert trimmed.query_ids.tolist() == [[2, 3], [6, 7]] and trimmed.query_mask.tolist() == [[0, 1], [1, 1]]
    assert trimmed.response_ids.tolist() == [[0, 1], [5, 6]] and trimmed.response_mask.tolist() == [[1, 1], [1, 0]]
    for name in ("logprobs", "ref_logprobs", "values", "rewards", "advantages", "returns"):
        assert torch.equal(getattr(trimmed, name), getattr(traj, name)[:, :2]), name
    assert torch.equal(trimmed.score, traj.score)
    assert traj.select(slice(0, 1)).trim_padding().query_ids.tolist() == [[3]]  # row 0 alone: its one prompt token
