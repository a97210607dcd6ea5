"""`OUT/summary.json` and `OUT/summary.png` of a Stage A run (DAT spec §2.2; the paper measures
diversity as mean pairwise similarity, here with `selection.SIMILARITY_MEASURE`).

summary.json: counts; judge-score histograms (10 bins over [0, 1]) and the fraction passing the
threshold; statistics of the sampler's path log-likelihood and of the target loss; mean pairwise
similarity and diversity (1 − similarity) of all candidates and of the selected ones (each the
mean over behaviours of the within-behaviour mean); per-behaviour rows; `timing` (the only part
that differs between two runs of the same config: unit seconds, samples/s); the config.
summary.png: four panels (judge score, target loss, log-likelihood: all vs selected; target
loss against log-likelihood). matplotlib is imported lazily and a failing plot is reported, not
fatal.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mixat_jax.dat.selection import SIMILARITY_MEASURE, mean_pairwise_similarity

HIST_BINS = 10


def stats(values: Sequence[float]) -> dict[str, float | None]:
    if not len(values):
        return {"mean": None, "std": None, "min": None, "max": None, "median": None}
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
            "max": float(v.max()), "median": float(np.median(v))}  # fmt: skip


def histogram(values: Sequence[float]) -> dict[str, list]:
    counts, edges = np.histogram(np.asarray(values, np.float64), bins=HIST_BINS, range=(0.0, 1.0))
    return {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]}


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def build(
    records_by_behavior: Sequence[Sequence[dict]],
    *,
    threshold: float,
    config: dict[str, Any],
    timing: dict[str, Any],
) -> dict[str, Any]:
    """The summary of every behaviour's candidate records (each with `selected` set)."""
    all_recs = [r for recs in records_by_behavior for r in recs]
    sel = [r for r in all_recs if r["selected"]]
    per_behavior = []
    sims_all, sims_sel = [], []
    for recs in records_by_behavior:
        chosen = [r for r in recs if r["selected"]]
        s_all = mean_pairwise_similarity([r["prompt"] for r in recs])
        s_sel = mean_pairwise_similarity([r["prompt"] for r in chosen])
        sims_all.append(s_all)
        sims_sel.append(s_sel)
        per_behavior.append({
            "behavior_id": recs[0]["behavior_id"],
            "num_candidates": len(recs),
            "num_selected": len(chosen),
            "passing": sum(r["judge_score"] >= threshold for r in recs),
            "mean_judge_score_all": _mean([r["judge_score"] for r in recs]),
            "mean_judge_score_selected": _mean([r["judge_score"] for r in chosen]),
            "mean_target_loss_all": _mean([r["target_loss"] for r in recs]),
            "mean_target_loss_selected": _mean([r["target_loss"] for r in chosen]),
            "similarity_all": s_all,
            "similarity_selected": s_sel,
        })  # fmt: skip
    sim_all, sim_sel = _mean(sims_all), _mean(sims_sel)

    def part(recs: list[dict]) -> dict[str, Any]:
        scores = [r["judge_score"] for r in recs]
        return {
            "count": len(recs),
            "judge_score": {**stats(scores), "histogram": histogram(scores),
                            "passing_fraction": _mean([float(s >= threshold) for s in scores])},
            "log_likelihood": stats([r["log_likelihood"] for r in recs]),
            "target_loss": stats([r["target_loss"] for r in recs]),
        }  # fmt: skip

    return {
        "num_behaviors": len(records_by_behavior),
        "num_candidates": len(all_recs),
        "num_selected": len(sel),
        "judge_threshold": threshold,
        "all": part(all_recs),
        "selected": part(sel),
        "similarity": {
            "measure": SIMILARITY_MEASURE,
            "mean_pairwise_all": sim_all,
            "mean_pairwise_selected": sim_sel,
            "diversity_all": None if sim_all is None else 1.0 - sim_all,
            "diversity_selected": None if sim_sel is None else 1.0 - sim_sel,
        },
        "per_behavior": per_behavior,
        "timing": timing,
        "config": config,
    }


def plot(records: Sequence[dict], path: Path) -> bool:
    """summary.png (atomically); False (and one stderr line) if plotting fails."""
    try:
        import matplotlib  # lazy: plotting only at the end of a run

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # lazy: as above

        sel = [r for r in records if r["selected"]]
        fig, axes = plt.subplots(2, 2, figsize=(10, 8))
        panels = (("judge_score", "judge score"), ("target_loss", "target loss (CE, nats)"),
                  ("log_likelihood", "sampler path log-likelihood"))  # fmt: skip
        for ax, (key, label) in zip(axes.flat, panels, strict=False):
            bins = np.histogram_bin_edges([r[key] for r in records], bins=20)  # shared bins
            ax.hist([r[key] for r in records], bins=bins, alpha=0.6, label="all")
            ax.hist([r[key] for r in sel], bins=bins, alpha=0.8, label="selected")
            ax.set_xlabel(label)
            ax.set_ylabel("candidates")
            ax.legend()
        ax = axes.flat[3]
        ax.scatter([r["log_likelihood"] for r in records], [r["target_loss"] for r in records],
                   s=6, alpha=0.4, label="all")  # fmt: skip
        ax.scatter([r["log_likelihood"] for r in sel], [r["target_loss"] for r in sel], s=10,
                   label="selected")  # fmt: skip
        ax.set_xlabel("sampler path log-likelihood")
        ax.set_ylabel("target loss")
        ax.legend()
        fig.suptitle(f"DAT Stage A: {len(records)} candidates, {len(sel)} selected")
        fig.tight_layout()
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp, dpi=80)
        plt.close(fig)
        tmp.replace(path)
        return True
    except Exception as e:  # noqa: BLE001 - a plot never fails the run
        print(f"[mixat_jax.dat_sample] summary plot skipped: {type(e).__name__}: {e}",
              file=sys.stderr)  # fmt: skip
        return False
