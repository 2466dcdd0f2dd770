"""Reward-model losses against hand-computed values (paper Eq. 1-2, Table 27; safety auxiliary loss)."""

from __future__ import annotations

import math

import pytest
import torch

from llama2_lit.data.records import RATINGS
from llama2_lit.rlhf.ranking import MARGINS, ranking_loss, rating_margins, safety_auxiliary_loss

# One pair per rating, in RATINGS order, plus one with an unknown rating (-1); every score gap is 1.
RATING_INDICES = torch.tensor([0, 1, 2, 3, -1])
R_CHOSEN = torch.tensor([1.5, 0.0, -2.0, 3.0, 0.25])
R_REJECTED = R_CHOSEN - 1.0


def test_margins_are_table_27():
    assert list(MARGINS["small"].values()) == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    assert list(MARGINS["large"].values()) == [3.0, 2.0, 1.0, 0.0]
    assert list(MARGINS["none"].values()) == [0.0] * 4
    assert all(list(m) == list(RATINGS) for m in MARGINS.values())


@pytest.mark.parametrize(("kind", "margins"), [("none", [0, 0, 0, 0, 0]), ("small", [1, 2 / 3, 1 / 3, 0, 0]),
                                               ("large", [3, 2, 1, 0, 0])])
def test_rating_margins_unknown_rating_has_no_margin(kind, margins):
    assert rating_margins(RATING_INDICES, kind).tolist() == pytest.approx(margins)


@pytest.mark.parametrize(("kind", "per_pair"), [
    # -log sigmoid(1 - m) = log(1 + exp(m - 1)), by hand:
    ("none", [0.31326169, 0.31326169, 0.31326169, 0.31326169, 0.31326169]),  # log(1 + e^-1)
    ("small", [0.69314718, 0.54030557, 0.41437009, 0.31326169, 0.31326169]),  # log 2, log(1 + e^(-1/3)), ...
    ("large", [2.12692801, 1.31326169, 0.69314718, 0.31326169, 0.31326169]),  # log(1 + e^2), log(1 + e), log 2
])
def test_ranking_loss_per_margin_matches_hand_computed_values(kind, per_pair):
    margin = rating_margins(RATING_INDICES, kind)
    for i, expected in enumerate(per_pair):
        assert ranking_loss(R_CHOSEN[i:i + 1], R_REJECTED[i:i + 1], margin[i:i + 1]).item() == pytest.approx(expected)
    assert ranking_loss(R_CHOSEN, R_REJECTED, margin).item() == pytest.approx(sum(per_pair) / 5)


def test_ranking_loss_is_eq_1_without_margin_and_stable_for_large_gaps():
    assert ranking_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(math.log(2))
    assert ranking_loss(torch.tensor([-200.0]), torch.tensor([0.0])).item() == pytest.approx(200.0)
    assert ranking_loss(torch.tensor([200.0]), torch.tensor([0.0])).item() == pytest.approx(0.0, abs=1e-30)
    chosen = torch.tensor([0.5], requires_grad=True)
    ranking_loss(chosen, torch.tensor([0.5]), torch.tensor([1.0])).backward()
    assert chosen.grad.item() == pytest.approx(-(1 - 1 / (1 + math.exp(1.0))))  # -(1 - σ(-1)) = -σ(1)


def test_rating_margins_refuses_unknown_kinds_and_indices():
    with pytest.raises(ValueError, match="unknown margin 'huge'"):
        rating_margins(RATING_INDICES, "huge")
    with pytest.raises(ValueError, match="rating indices must lie in"):
        rating_margins(torch.tensor([4]), "small")


def test_safety_auxiliary_loss_is_bce_of_the_sigmoid_against_the_safe_label():
    scores = torch.tensor([2.0, -1.0, 0.0, 5.0])
    is_safe = torch.tensor([1, 0, 1, -1])  # the last label is unknown: left out
    expected = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-1.0)) + math.log(2)) / 3
    assert safety_auxiliary_loss(scores, is_safe).item() == pytest.approx(expected)
    mask = torch.tensor([True, False, False, True])
    assert safety_auxiliary_loss(scores, is_safe, mask).item() == pytest.approx(math.log1p(math.exp(-2.0)))
    nothing = safety_auxiliary_loss(scores.requires_grad_(), torch.full((4,), -1))
    assert nothing.item() == 0.0 and nothing.requires_grad
