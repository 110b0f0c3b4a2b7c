"""Confidence intervals of a metric's difference between two models scored on the same rows.

Two models evaluated on one test split are correlated (the same hard rows trip both), so the interval of
their difference is paired: the same resampled rows for both (bootstrap), or the joint covariance of
both AUCs (DeLong). Every function takes the per-row arrays evaluation writes (labels and each model's
served output) and returns a :class:`Interval` of ``challenger - champion`` in the metric's own units.

- :func:`paired_bootstrap`: seeded, vectorized over resamples in chunks (bootstrap counts times per-row
  terms), for every metric a task computes; ``B`` and ``alpha`` come from the policy.
- :func:`delong`: DeLong et al. (1988) for ROC AUC, with Sun & Xu's (2014) O(n log n) midrank
  computation of the structural components.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Callable

# Metrics whose per-resample value the bootstrap computes from weighted sums (weights = bootstrap counts).
# DeLong applies only to the area under the ROC curve.
DELONG_METRICS = frozenset({"roc_auc"})
_CHUNK_CELLS = 4_000_000  # resamples x rows held in memory at once (32 MB of float64)


@dataclass(frozen=True)
class Interval:
    """``estimate`` (challenger - champion on all rows) and its two-sided ``1 - alpha`` interval."""

    method: str
    estimate: float
    low: float
    high: float
    alpha: float
    samples: int = 0  # bootstrap resamples (0 for DeLong)

    def to_dict(self) -> dict[str, float | str | int]:
        return asdict(self)


# ---- weighted metrics: value per resample from bootstrap counts w (resamples x rows) --------------
def _auc(y: np.ndarray, score: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """f(counts) -> ROC AUC per resample: the weighted probability a positive outscores a negative (ties
    count half). The scores are sorted once; per resample it is cumulative sums over groups of equal scores."""
    order = np.argsort(score, kind="mergesort")
    s, pos = score[order], (y[order] == 1)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])

    def auc(w: np.ndarray) -> np.ndarray:
        ws = w[:, order]
        wpos = ws * pos
        wneg = ws - wpos
        neg_in_group = np.add.reduceat(wneg, starts, axis=1)
        pos_in_group = np.add.reduceat(wpos, starts, axis=1)
        neg_before_group = np.cumsum(neg_in_group, axis=1) - neg_in_group
        wins = np.einsum("ij,ij->i", pos_in_group, neg_before_group + 0.5 * neg_in_group, dtype="float64")
        return wins / (wpos.sum(axis=1, dtype="float64") * wneg.sum(axis=1, dtype="float64"))

    return auc


def _weighted_mean(terms: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    terms32 = terms.astype("float32")
    return lambda w: (w @ terms32).astype("float64") / w.sum(axis=1, dtype="float64")


def _metric(name: str, y: np.ndarray, p: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """f(counts) -> the metric ``name`` for each resample, from labels ``y`` and served outputs ``p``."""
    eps = 1e-15
    if name in DELONG_METRICS:
        return _auc(y, p.reshape(-1))
    if name == "accuracy":
        hit = (p.argmax(axis=1) == y) if p.ndim == 2 and p.shape[1] > 1 else ((p.reshape(-1) >= 0.5) == y)
        return _weighted_mean(hit.astype("float64"))
    if name == "log_loss":
        if p.ndim == 2 and p.shape[1] > 1:
            picked = p[np.arange(len(y)), y.astype(int)]
        else:
            q = p.reshape(-1)
            picked = np.where(y == 1, q, 1 - q)
        return _weighted_mean(-np.log(np.clip(picked, eps, 1.0)))
    q = p.reshape(-1)
    if name == "rmse":
        mse = _weighted_mean((y - q) ** 2)
        return lambda w: np.sqrt(mse(w))
    if name == "mae":
        return _weighted_mean(np.abs(y - q))
    if name == "r2":
        yc = y - y.mean()  # r2 is shift-invariant; centring keeps E[y^2] - E[y]^2 accurate in float32
        sse, ym, y2 = _weighted_mean((y - q) ** 2), _weighted_mean(yc), _weighted_mean(yc**2)
        return lambda w: 1 - sse(w) / (y2(w) - ym(w) ** 2)
    raise ValueError(f"no paired bootstrap for metric {name!r}; supported: {', '.join(sorted(BOOTSTRAP_METRICS))}")


BOOTSTRAP_METRICS = frozenset({*DELONG_METRICS, "accuracy", "log_loss", "rmse", "mae", "r2"})


def _resample_counts(n: int, samples: int, seed: int):
    """Bootstrap counts (how often each of ``n`` rows is drawn), ``samples`` resamples in chunks."""
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_CELLS // max(n, 1))
    for start in range(0, samples, chunk):
        b = min(chunk, samples - start)
        rows = rng.integers(0, n, size=(b, n), dtype=np.int64) + n * np.arange(b, dtype=np.int64)[:, None]
        # float32 holds every count exactly and halves the memory traffic of the per-resample sums.
        yield np.bincount(rows.ravel(), minlength=b * n).reshape(b, n).astype("float32")


def _percentiles(values: list[np.ndarray], alpha: float) -> tuple[float, float]:
    v = np.concatenate(values)
    v = v[np.isfinite(v)]  # a resample without a positive has no AUC
    low, high = np.quantile(v, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def paired_bootstrap(metric: str, y: np.ndarray, challenger: np.ndarray, champion: np.ndarray,
                     samples: int = 1000, alpha: float = 0.05, seed: int = 0) -> Interval:
    """Percentile interval of ``metric(challenger) - metric(champion)`` over ``samples`` resamples of the
    rows, the same resampled rows for both models (so their shared errors cancel)."""
    y = np.asarray(y)
    f_new = _metric(metric, y, np.asarray(challenger, "float64"))
    f_old = _metric(metric, y, np.asarray(champion, "float64"))
    ones = np.ones((1, len(y)))
    estimate = float(f_new(ones)[0] - f_old(ones)[0])
    diffs = [f_new(w) - f_old(w) for w in _resample_counts(len(y), samples, seed)]
    return Interval("paired_bootstrap", estimate, *_percentiles(diffs, alpha), alpha, samples)


def bootstrap_interval(metric: str, y: np.ndarray, outputs: np.ndarray, samples: int = 1000,
                       alpha: float = 0.05, seed: int = 0) -> Interval:
    """One model's ``metric`` on all rows and its percentile bootstrap interval."""
    y = np.asarray(y)
    f = _metric(metric, y, np.asarray(outputs, "float64"))
    estimate = float(f(np.ones((1, len(y))))[0])
    values = [f(w) for w in _resample_counts(len(y), samples, seed)]
    return Interval("bootstrap", estimate, *_percentiles(values, alpha), alpha, samples)


# ---- DeLong ---------------------------------------------------------------------------------------
def _midrank(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given their mean rank (O(n log n))."""
    order = np.argsort(x, kind="mergesort")
    s = x[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    mid = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(mid, ends - starts)
    return ranks


def delong_components(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs (k models) and their structural components V10 (k x positives), V01 (k x negatives)."""
    pos, neg = scores[:, y == 1], scores[:, y != 1]
    m, n = pos.shape[1], neg.shape[1]
    if m == 0 or n == 0:
        raise ValueError("DeLong needs at least one positive and one negative row")
    aucs, v10, v01 = [], [], []
    for k in range(scores.shape[0]):
        tx, ty, tz = _midrank(pos[k]), _midrank(neg[k]), _midrank(np.r_[pos[k], neg[k]])
        aucs.append((tz[:m].sum() - m * (m + 1) / 2) / (m * n))
        v10.append((tz[:m] - tx) / n)
        v01.append(1.0 - (tz[m:] - ty) / m)
    return np.array(aucs), np.array(v10), np.array(v01)


def delong(y: np.ndarray, challenger: np.ndarray, champion: np.ndarray, alpha: float = 0.05) -> Interval:
    """DeLong's normal interval of AUC(challenger) - AUC(champion) on the same rows."""
    from scipy.stats import norm

    y = np.asarray(y)
    scores = np.vstack([np.asarray(challenger, "float64").reshape(-1), np.asarray(champion, "float64").reshape(-1)])
    aucs, v10, v01 = delong_components(y, scores)
    cov = np.cov(v10) / v10.shape[1] + np.cov(v01) / v01.shape[1]
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    estimate = float(aucs[0] - aucs[1])
    half = float(norm.ppf(1 - alpha / 2) * np.sqrt(max(var, 0.0)))
    return Interval("delong", estimate, estimate - half, estimate + half, alpha)


def auc_with_interval(y: np.ndarray, score: np.ndarray, alpha: float = 0.05) -> Interval:
    """One model's AUC and its DeLong interval (``estimate`` is the AUC itself)."""
    from scipy.stats import norm

    aucs, v10, v01 = delong_components(np.asarray(y), np.asarray(score, "float64").reshape(1, -1))
    var = v10.var(ddof=1) / v10.shape[1] + v01.var(ddof=1) / v01.shape[1]
    half = float(norm.ppf(1 - alpha / 2) * np.sqrt(var))
    return Interval("delong", float(aucs[0]), float(aucs[0]) - half, float(aucs[0]) + half, alpha)
