"""The metrics of one optimizer step and how they are reduced (MixAT spec §3.1, §5, §11.5).

Every metric is accumulated as a ``(numerator, denominator)`` pair per micro-batch, summed over
the G micro-batches of the step (``lax.scan``) and, under ``jax.pmap``, over devices (``psum``;
``pmax`` for maxima), and divided once at the end. So a metric has ONE definition whether the
step runs under ``jax.jit`` (one program over all G micro-batches), under ``jax.pmap`` (each
device a share of them) or with ``attack_batching="step"`` / ``"microbatch"``; the only
differences are fp32 summation order. An "adversarial micro-batch" has at least one valid
adversarial slot; a mean over an empty set is NaN.

* ``loss``: mean over ALL micro-batches of the micro-batch C-AdvUL loss (spec §3.1: each
  micro-batch loss divided by the accumulation count). ``eps_abs``: the attack radius ε·ē.
* ``away``, ``toward``, ``ce_harm``, ``ce_safe``, ``attack_loss_after`` (= ``ce_harm`` of the
  training pass, same δ), ``attack_loss_before`` (the attack objective, token-mean CE_harm, at
  the initial δ; ``ce_harm`` when no attack runs): mean over adversarial micro-batches of the
  micro-batch value (itself a token mean over that micro-batch's valid rows).
* ``utility``: mean over micro-batches with valid utility rows.
* ``delta_norm_mean``: Σ_t ‖δ_t‖ / N over the N attacked tokens t of the STEP (prompt tokens
  of the valid away rows of all micro-batches, on all devices) — token-weighted over the step,
  not a mean of micro-batch means. ``frac_at_boundary``: the fraction of those N tokens with
  ‖δ_t‖ >= (1 - 1e-3)·eps_abs (``attacks.continuous.delta_sums``). Both are 0 when no attack
  runs (variants without δ, ``iters=0``) and NaN when the step has no adversarial row.
* ``delta_norm_max``: max_t ‖δ_t‖ over the step (0 without attack).
* ``num_adv_rows``, ``num_util_rows``, ``targets_dropped``: sums over the step.
* ``grad_norm``, ``lr``: of the optimizer update (added by ``train_step``).

Absent terms (issue #17): inside the program a mean over an empty set is NaN; on the host
:func:`drop_absent` removes those terms before anything is logged, so a step without
adversarial (utility) rows is reported by ``num_adv_rows == 0`` (``num_util_rows == 0``) and
no value for the absent term — never a NaN.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

MEAN_OVER_ADV = (
    "away",
    "toward",
    "ce_harm",
    "ce_safe",
    "attack_loss_before",
    "attack_loss_after",
)
MEAN_OVER_UTIL = ("utility",)
MEAN_OVER_ALL = ("loss", "eps_abs")
TOKEN_WEIGHTED = ("delta_norm_mean", "frac_at_boundary")
MAX_METRICS = ("delta_norm_max",)
SUM_METRICS = ("num_adv_rows", "num_util_rows", "targets_dropped")
METRIC_NAMES = (
    MEAN_OVER_ADV + MEAN_OVER_UTIL + MEAN_OVER_ALL + TOKEN_WEIGHTED + SUM_METRICS + MAX_METRICS
)

ABSENT_WITHOUT = {"num_adv_rows": MEAN_OVER_ADV + TOKEN_WEIGHTED, "num_util_rows": MEAN_OVER_UTIL}

Parts = dict[str, tuple[jax.Array, jax.Array]]


def microbatch_parts(
    values: dict[str, jax.Array],
    token_weighted: dict[str, tuple[jax.Array, jax.Array]],
    *,
    has_adv: jax.Array,
    has_util: jax.Array,
) -> Parts:
    """One micro-batch's ``(numerator, denominator)`` per metric.

    ``values``: the micro-batch's scalar of every metric except :data:`TOKEN_WEIGHTED`, whose
    ``(token sum, token count)`` pairs come in ``token_weighted``; ``has_adv`` / ``has_util``:
    whether it has valid adversarial / utility rows."""
    one = jnp.ones((), jnp.float32)
    zero = jnp.zeros((), jnp.float32)
    weights = {k: has_adv.astype(jnp.float32) for k in MEAN_OVER_ADV}
    weights.update({k: has_util.astype(jnp.float32) for k in MEAN_OVER_UTIL})
    weights.update({k: one for k in MEAN_OVER_ALL})
    parts = {k: (values[k].astype(jnp.float32) * w, w) for k, w in weights.items()}
    parts.update(
        {k: (num.astype(jnp.float32), den.astype(jnp.float32)) for k, (num, den) in
         token_weighted.items()}
    )  # fmt: skip
    parts.update({k: (values[k].astype(jnp.float32), zero) for k in SUM_METRICS + MAX_METRICS})
    return parts


def empty_parts() -> Parts:
    """The accumulator before the first micro-batch (0 sums, -inf maxima)."""
    return {
        k: (
            jnp.full((), -jnp.inf if k in MAX_METRICS else 0.0, jnp.float32),
            jnp.zeros((), jnp.float32),
        )
        for k in METRIC_NAMES
    }


def combine_parts(acc: Parts, new: Parts) -> Parts:
    """Adds one micro-batch's parts to the accumulator (max for :data:`MAX_METRICS`)."""
    out = {}
    for k, (num, den) in new.items():
        a_num, a_den = acc[k]
        out[k] = (
            (jnp.maximum(a_num, num), a_den) if k in MAX_METRICS else (a_num + num, a_den + den)
        )
    return out


def finish_parts(parts: Parts, axis_name: str | None) -> dict[str, jax.Array]:
    """The step's metrics: parts reduced over ``axis_name`` (pmap) if given, then divided."""
    metrics = {}
    for k, (num, den) in parts.items():
        if axis_name is not None:
            num = jax.lax.pmax(num, axis_name) if k in MAX_METRICS else jax.lax.psum(num, axis_name)
            den = jax.lax.psum(den, axis_name)
        if k in SUM_METRICS or k in MAX_METRICS:
            metrics[k] = num
        else:
            metrics[k] = jnp.where(den > 0, num / jnp.maximum(den, 1.0), jnp.nan)
    return metrics


def drop_absent(metrics: Mapping[str, float]) -> dict[str, float]:
    """Host metrics of a step without the terms it did not have: the adversarial means when
    ``num_adv_rows == 0``, ``utility`` when ``num_util_rows == 0`` (the row counts stay)."""
    out = dict(metrics)
    for count, names in ABSENT_WITHOUT.items():
        if count in out and float(out[count]) == 0.0:
            for k in names:
                out.pop(k, None)
    return out
