"""Self-normalised importance sampling: weights, effective sample size, weighted means and resampling.

Used wherever samples come from one distribution and quantities are wanted under another known only up to a
constant: the sequence-level geometric mixture sampled through its token-level version, and the optimal policy
pi*_lambda ∝ pi_ref exp((r + lambda g) / beta) estimated from samples of pi_ref.

Given samples y_1..y_N from a proposal m and log-weights log w_i = log p~(y_i) - log m(y_i) (p~ an unnormalised
target), the self-normalised weights are w_i / sum_j w_j; E_p[f] is estimated by sum_i w_i f(y_i) / sum_j w_j
(consistent as N grows, biased for finite N), and the effective sample size (sum w)^2 / sum w^2 is in [1, N].
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["effective_sample_size", "normalized_weights", "resample", "snis_mean"]


def normalized_weights(log_weights: Tensor, dim: int = -1) -> Tensor:
    """Self-normalised importance weights ``softmax(log_weights)`` along ``dim`` (computed in float64).

    Args:
        log_weights: (..., N) log-weights, any finite values (``-inf`` gives weight 0; a slice of only ``-inf`` is an
            error).
    """
    log_weights = log_weights.to(torch.float64)
    if torch.isnan(log_weights).any() or torch.isposinf(log_weights).any():
        raise ValueError("importance log-weights must not be NaN or +inf")
    if torch.isneginf(log_weights).all(dim=dim).any():
        raise ValueError("every importance log-weight of a group is -inf: no sample has positive weight")
    return torch.softmax(log_weights, dim=dim)


def effective_sample_size(log_weights: Tensor, dim: int = -1) -> Tensor:
    """Kish's effective sample size ``1 / sum_i w_i^2`` of the normalised weights: N for equal weights, 1 when one
    sample carries all the weight. Shape: ``log_weights`` without ``dim``."""
    w = normalized_weights(log_weights, dim=dim)
    return 1.0 / (w * w).sum(dim=dim)


def snis_mean(values: Tensor, log_weights: Tensor, dim: int = -1) -> tuple[Tensor, Tensor]:
    """Self-normalised importance-sampling estimate of E_p[f] and its effective sample size.

    Args:
        values: (..., N) f(y_i) (broadcastable with ``log_weights``).
        log_weights: (..., N) log p~(y_i) - log m(y_i).

    Returns:
        (mean, ess), both shaped like the inputs without ``dim``; float64.
    """
    w = normalized_weights(log_weights, dim=dim)
    return (w * values.to(torch.float64)).sum(dim=dim), 1.0 / (w * w).sum(dim=dim)


def resample(log_weights: Tensor, num_samples: int, *, generator: torch.Generator | None = None) -> Tensor:
    """Multinomial resampling: (num_samples,) indices drawn with replacement with probability w_i.

    Sampling-importance-resampling turns weighted samples of the proposal into (approximate, exact as N grows)
    samples of the target.

    Args:
        log_weights: (N,) log-weights of one group.
    """
    if log_weights.dim() != 1:
        raise ValueError(f"resample takes the (N,) log-weights of one group, got shape {tuple(log_weights.shape)}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    w = normalized_weights(log_weights)
    return torch.multinomial(w, num_samples, replacement=True, generator=generator)
