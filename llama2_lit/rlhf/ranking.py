"""Reward-model losses (paper section 3.2.2 and appendix A.3.4), as plain functions on tensors.

The binary ranking loss of Ouyang et al. (2022), Eq. (1), pushes the chosen response's score
above the rejected one's: ``-log σ(r_c − r_r)``. Llama 2 adds a margin that depends on how much
better the annotator said the chosen response is, Eq. (2): ``-log σ(r_c − r_r − m(r))``, with
``m`` a discrete function of the rating (Table 27); a larger margin asks for a larger score gap
on pairs that are easy to tell apart.

Scores are the reward model's raw scalars (logits); the paper reports them after a sigmoid, in
[0, 1] (Table 29's threshold of 0.5 is "negative values before Sigmoid").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from llama2_lit.data.records import RATINGS

MARGINS: dict[str, dict[str, float]] = {
    "none": dict.fromkeys(RATINGS, 0.0),
    "small": dict(zip(RATINGS, (1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0))),
    "large": dict(zip(RATINGS, (3.0, 2.0, 1.0, 0.0))),
}
"""Margin m(r) per rating (paper Table 27), for significantly better, better, slightly better and
negligibly better / unsure. The paper ablates small and large (Table 28) and does not say which
the final reward models used."""


def rating_margins(rating_indices: Tensor, kind: str) -> Tensor:
    """m(r) for each pair: ``rating_indices`` (B,) index ``RATINGS``; -1 (unknown, e.g. HH-RLHF) gives 0."""
    if kind not in MARGINS:
        raise ValueError(f"unknown margin {kind!r}; choose one of {sorted(MARGINS)}")
    if rating_indices.numel() and (int(rating_indices.min()) < -1 or int(rating_indices.max()) >= len(RATINGS)):
        raise ValueError(f"rating indices must lie in [-1, {len(RATINGS) - 1}], got {rating_indices.tolist()}")
    table = torch.tensor([MARGINS[kind][r] for r in RATINGS] + [0.0], device=rating_indices.device)
    return table[rating_indices]  # index -1 reads the trailing 0: unknown rating, no margin


def ranking_loss(r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | float = 0.0) -> Tensor:
    """Paper Eq. (2): mean over pairs of ``-log σ(r_c − r_r − m)``; Eq. (1) when ``margin`` is 0.

    ``logsigmoid`` is exact for large gaps, where ``log(sigmoid(x))`` would underflow.
    """
    return -F.logsigmoid(r_chosen.float() - r_rejected.float() - margin).mean()


def safety_auxiliary_loss(scores: Tensor, is_safe: Tensor, mask: Tensor | None = None) -> Tensor:
    """Binary cross-entropy of σ(r) against each response's safe (1) / unsafe (0) label.

    The paper trains the safety reward model with a "safety auxiliary loss" (appendix A.3.4,
    Table 29) that raises the recall of unsafe responses at score 0.5, and does not define it.
    This is our reading: it asks the score of every labelled response to sit on the right side of
    0 (σ = 0.5), safe above, unsafe below, which is the threshold Table 29's recall is measured at.
    ``scores`` (N,) raw scalars; ``is_safe`` (N,) 1/0, or -1 for unknown; ``mask`` (N,) bool selects
    the responses that count (default: every response with a known label). Mean over those; 0 when
    there are none.
    """
    known = is_safe >= 0 if mask is None else mask & (is_safe >= 0)
    if not bool(known.any()):
        return scores.sum() * 0.0  # keeps the graph (and the device) of the scores
    return F.binary_cross_entropy_with_logits(scores[known].float(), is_safe[known].float())
