"""The demos' statistics (issue #17 "Demo statistics"): paired bootstrap CIs and seed summaries.

* ALO-ASR drop = mean_b [s(b) before - s(b) after], s(b) = max_a s_a(b) (MixAT spec §8.1), with a
  percentile-bootstrap CI that resamples *behaviours* and uses the same resample for both models
  (paired: the two measurements are of the same behaviours).
  Behaviours that share a topic are not independent, so the drop also gets a *cluster* bootstrap
  CI that resamples whole topics (clusters) with replacement (`ci95_clustered`); with few topics it
  is wide and coarse, which is the honest statement of what the demo can tell.
* Utility retention = accuracy after / accuracy before on the same benign questions, with a
  percentile-bootstrap CI that resamples *questions*, paired in the same way.
* Seed summaries: mean, sample standard deviation (ddof = 1), min and max over training seeds.

Every resample is drawn from `numpy.random.default_rng(seed)`, so a report is a pure function of
its inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np


def behavior_success(alo: Mapping[str, Any]) -> dict[str, int]:
    """Per-behaviour ALO success max_a s_a(b) from an evaluation's `alo_asr.json` result."""
    success = alo["success"]
    return {
        b: max(int(success[a][b]) for a in alo["attacks"] if b in success[a])
        for b in alo["behaviors"]
    }


def paired_bootstrap(
    before: Sequence[float],
    after: Sequence[float],
    statistic: Callable[[np.ndarray, np.ndarray], np.ndarray],
    *,
    n_bootstrap: int,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, list[float]]:
    """(statistic on the data, percentile CI); `statistic(before_RxN, after_RxN) -> [R]`."""
    b = np.asarray(before, dtype=np.float64)
    a = np.asarray(after, dtype=np.float64)
    if b.shape != a.shape or b.ndim != 1 or len(b) == 0:
        raise ValueError(
            f"paired bootstrap needs two equal-length non-empty vectors; got {b.shape} and {a.shape}"
        )
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1; got {n_bootstrap}")
    value = float(statistic(b[None], a[None])[0])
    idx = np.random.default_rng(seed).integers(0, len(b), size=(n_bootstrap, len(b)))
    stats = statistic(b[idx], a[idx])
    stats = stats[np.isfinite(stats)]
    tail = (1.0 - confidence) / 2 * 100
    lo, hi = np.percentile(stats, [tail, 100 - tail]) if len(stats) else (np.nan, np.nan)
    return value, [float(lo), float(hi)]


def alo_asr_drop(
    before: Mapping[str, int],
    after: Mapping[str, int],
    *,
    n_bootstrap: int,
    seed: int = 0,
    clusters: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """ALO-ASR before - after over the same behaviours (dicts behaviour id -> 0/1).

    `clusters` (behaviour id -> cluster key, e.g. its topic) adds `ci95_clustered`: a percentile
    CI from resampling whole clusters with replacement (same seed)."""
    if set(before) != set(after):
        raise ValueError("the two evaluations measured different behaviours; pass the same set")
    ids = sorted(before)
    value, ci = paired_bootstrap(
        [before[b] for b in ids],
        [after[b] for b in ids],
        lambda x, y: x.mean(axis=1) - y.mean(axis=1),
        n_bootstrap=n_bootstrap,
        seed=seed,
    )
    out = {"value": value, "ci95": ci, "n": len(ids), "resampled": "behaviours (paired)"}
    if clusters is not None:
        missing = [b for b in ids if b not in clusters]
        if missing:
            raise ValueError(f"behaviours {missing[:3]} have no cluster; give every behaviour one")
        keys, cluster_B = np.unique([clusters[b] for b in ids], return_inverse=True)
        diff_K = np.bincount(cluster_B, weights=[before[b] - after[b] for b in ids])
        count_K = np.bincount(cluster_B)
        idx_RxK = np.random.default_rng(seed).integers(0, len(keys), size=(n_bootstrap, len(keys)))
        drops_R = diff_K[idx_RxK].sum(axis=1) / count_K[idx_RxK].sum(axis=1)
        lo, hi = np.percentile(drops_R, [2.5, 97.5])
        out |= {"ci95_clustered": [float(lo), float(hi)], "n_clusters": len(keys)}
    return out


def utility_retention(
    before: Sequence[bool], after: Sequence[bool], *, n_bootstrap: int, seed: int = 0
) -> dict[str, Any]:
    """Benign accuracy after / before over the same questions (per-question correctness).

    A resample whose before-accuracy is 0 has no ratio and is left out of the percentiles.
    """
    b = np.asarray(before, dtype=np.float64)
    if len(b) and b.sum() == 0:
        raise ValueError("the base answers no benign question correctly; retention is undefined")

    def ratio(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        den = x.mean(axis=1)
        return np.where(den > 0, y.mean(axis=1) / np.where(den > 0, den, 1.0), np.nan)

    value, ci = paired_bootstrap(before, after, ratio, n_bootstrap=n_bootstrap, seed=seed)
    return {
        "value": value,
        "ci95": ci,
        "n": len(b),
        "before": float(np.mean(before)),
        "after": float(np.mean(after)),
        "resampled": "questions (paired)",
    }


def seed_summary(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample std (ddof=1; 0.0 for one seed), min and max of per-seed values."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        raise ValueError("no per-seed values to summarise")
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
        "min": float(v.min()),
        "max": float(v.max()),
        "values": [float(x) for x in v],
        "spread": "std = sample standard deviation (ddof=1) over seeds",
    }
