"""Best-of-K statistics (paper section 3.2.3, Fig 7 and Fig 8): what rejection sampling can expect.

Rejection sampling keeps the best of K samples per prompt. Its expected gain is an order
statistic: E[max of K draws] (and the median, the paper's other curve). Drawing K samples once
gives a noisy estimate; from N >= K samples the average over all C(N, K) subsets is unbiased and
far less noisy, and has a closed form (``order_statistic_weights``). Pure functions on tensors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["expected_max_of_k", "expected_median_of_k", "expected_order_statistic", "order_statistic_weights"]


def order_statistic_weights(n: int, k: int, j: int) -> Tensor:
    """Weights w (n,) float64 with ``sum_i w_i x_(i)`` the unbiased estimate of E[X_(j:k)].

    X_(j:k) is the j-th smallest of k i.i.d. draws, x_(1) <= ... <= x_(n) are n >= k draws sorted.
    Averaging the j-th smallest over all C(n, k) subsets of the n draws (each subset is itself k
    i.i.d. draws, hence unbiased) gives ``w_i = C(i-1, j-1) C(n-i, k-j) / C(n, k)``: the subsets
    whose j-th smallest is x_(i) take j-1 of the i-1 smaller draws and k-j of the n-i larger ones.
    """
    if not 1 <= j <= k <= n:
        raise ValueError(f"need 1 <= j <= k <= n, got j={j}, k={k}, n={n}")
    total = math.comb(n, k)
    return torch.tensor([math.comb(i - 1, j - 1) * math.comb(n - i, k - j) / total for i in range(1, n + 1)],
                        dtype=torch.float64)


def expected_order_statistic(values: Tensor, k: int, j: int, *, order_by: Tensor | None = None) -> Tensor:
    """Unbiased estimate of E[j-th smallest of k draws] from the n draws along the last dimension.

    With ``order_by`` (same shape), draws are ranked by it instead and the estimate is of the
    ``values`` of the draw ranked j-th of k: ``j = k`` with ``order_by`` = reward-model scores and
    ``values`` = oracle scores is the oracle's score of the RM's best-of-k pick. Returns (...) float64.
    """
    order = (values if order_by is None else order_by).argsort(dim=-1, stable=True)
    ranked = values.gather(-1, order).double()
    return (ranked * order_statistic_weights(values.shape[-1], k, j)).sum(-1)


def expected_max_of_k(values: Tensor, k: int) -> Tensor:
    """Unbiased estimate of E[max of k draws] from n >= k draws (last dimension)."""
    return expected_order_statistic(values, k, k)


def expected_median_of_k(values: Tensor, k: int) -> Tensor:
    """Unbiased estimate of E[median of k draws] (the mean of the two middle ones for even k)."""
    if k % 2:
        return expected_order_statistic(values, k, (k + 1) // 2)
    return 0.5 * (expected_order_statistic(values, k, k // 2) + expected_order_statistic(values, k, k // 2 + 1))
