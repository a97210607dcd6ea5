"""The pure MixAT / CAT training and evaluation steps (MixAT spec §3, §4, §5, §12).

Public through ``mixat_jax.steps`` (the research API; see its docstring for the algorithm).
Implementation notes:

* ``train_step(state, batch, key, *, cfg)``: the batch (keys of ``training.batches.BATCH_KEYS``,
  right-padded, leading ``[G]`` micro-batch axis; without it G = 1) is scanned micro-batch by
  micro-batch; gradients and losses are the MEAN over micro-batches (spec §3.1).
* The continuous attack (``attacks.continuous``, ∇ w.r.t. δ only) runs on the valid away rows:
  by default (``cfg.attack_batching="step"``) for ALL G micro-batches in one batched call
  before the scan (:func:`step_attack`; the parameters are the same for every micro-batch of an
  optimizer step and each micro-batch keeps its own token-mean objective), or one micro-batch at
  a time (``"microbatch"``); under ``lax.cond`` so micro-batches without valid adversarial slots
  skip it, and not traced at all without δ (:attr:`StepConfig.runs_attack`).
* C-AdvUL (spec §4) in :func:`microbatch_loss`: away and toward rows in one ``[2A, L]`` forward
  with the same δ (stop_gradient'ed, added in fp32) at the same positions (spec §12 "δ transfer").
* Randomness: micro-batch ``g`` uses ``fold_in(key, g)`` with the GLOBAL index (under pmap
  ``axis_index · G + g``); attack rows use per-row keys (:func:`attack_row_keys`), so "step" and
  "microbatch" batching, jit and pmap give each row the same δ.
* Metrics and their reduction: ``training.step_metrics``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mixat_jax import lora as lora_lib
from mixat_jax.attacks.continuous import continuous_attack, delta_sums
from mixat_jax.objectives import (
    TokenRows,
    input_embeddings,
    sequence_ce,
    sequence_logprobs,
    token_mean,
)
from mixat_jax.training import losses
from mixat_jax.training import step_metrics as sm
from mixat_jax.training.batches import BATCH_KEYS, token_rows
from mixat_jax.training.optim import injected_learning_rate
from mixat_jax.training.state import TrainState
from mixat_jax.training.step_config import StepConfig

ATTACK_DIAG_KEYS = ("loss_before",)  # what the step keeps of the attack's diagnostics
ATTACK_STREAM = 0x61747461  # fold_in tag of the attack's randomness ("atta")


# ------------------------------------------------------------------------------ batch checks
def with_microbatch_axis(batch: Mapping[str, Any]) -> dict[str, Any]:
    """Validates the batch keys/shapes; adds a leading G = 1 axis to an un-stacked batch."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch lacks keys {missing}; build it with training.batches")
    batch = {k: batch[k] for k in BATCH_KEYS}
    if jnp.ndim(batch["away_ids_AxL"]) == 2:
        batch = {k: v[None] for k, v in batch.items()}
    g, a, la = np.shape(batch["away_ids_AxL"])
    u, lu = np.shape(batch["util_ids_UxM"])[1:]
    by_suffix = {"_AxL": (g, a, la), "_A": (g, a), "_UxM": (g, u, lu), "_U": (g, u)}
    for k, v in batch.items():
        want = next(shape for suffix, shape in by_suffix.items() if k.endswith(suffix))
        if tuple(np.shape(v)) != want:
            raise ValueError(f"batch[{k!r}] has shape {tuple(np.shape(v))}, expected {want}")
    return batch


# ------------------------------------------------------------------------------ the attack
def attack_row_keys(key: jax.Array, g_index: jax.Array, a: int) -> jax.Array:
    """Per-row attack keys [len(g_index) · a] for the adversarial slots of the micro-batches with
    GLOBAL indices ``g_index``: a row's key depends only on (step key, micro-batch, slot), so
    attacking micro-batches together, one by one, or on different pmap devices gives each row
    the same dropout masks (and the same δ)."""
    base = jax.random.fold_in(key, ATTACK_STREAM)
    per_g = jax.vmap(lambda g: jax.random.fold_in(base, g))(g_index)
    return jax.vmap(lambda k: jax.vmap(lambda i: jax.random.fold_in(k, i))(jnp.arange(a)))(
        per_g
    ).reshape(-1)


def _attack(state: TrainState, rows: TokenRows, valid_A, row_keys, cfg: StepConfig, groups):
    """δ for the away rows [rows, L, D] + diagnostics; zeros when no away row is valid.

    ``rows`` / ``valid_A``: flat [rows, L] away rows; ``groups`` = (group id per row, number of
    groups): each group (micro-batch) keeps its own token-mean objective (``continuous_attack``).
    """
    a, l = rows.ids_BxL.shape
    graphdef, lora, frozen = state.graphdef, state.lora, state.frozen
    d = lora_lib.merge(graphdef, lora, frozen).cfg.hidden_size
    group_B, num_groups = groups
    eps_abs = cfg.attack.eps * state.emb_norm

    def run(_):
        delta, diag = continuous_attack(
            graphdef,
            lora,
            frozen,
            rows,
            row_keys,
            cfg=cfg.attack,
            eps_abs=eps_abs,
            row_valid_B=valid_A,
            emb_norm=state.emb_norm,
            eval_final=False,
            group_B=group_B,
            num_groups=num_groups,
        )
        return delta, {k: diag[k] for k in ATTACK_DIAG_KEYS}

    def skip(_):
        zero = jnp.zeros((), jnp.float32)
        return jnp.zeros((a, l, d), jnp.float32), {k: zero for k in ATTACK_DIAG_KEYS}

    return jax.lax.cond(jnp.any(valid_A), run, skip, None)


def step_attack(state: TrainState, batch, key: jax.Array, offset, cfg: StepConfig):
    """The continuous attack of ALL G micro-batches in one batched call (parameters do not change
    within an optimizer step, so this equals attacking each micro-batch in turn; per-row keys
    make it the same δ, up to float rounding). Returns δ [G, A, L, D] and diagnostics:
    ``loss_before`` (mean over the micro-batches with adversarial rows of their token-mean
    objective at the initial δ)."""
    g, a, l = batch["away_ids_AxL"].shape
    flat = jax.tree.map(lambda x: x.reshape(g * a, l), token_rows(batch, "away"))
    valid = batch["adv_valid_A"].reshape(g * a)
    keys = attack_row_keys(key, offset + jnp.arange(g), a)
    groups = (jnp.repeat(jnp.arange(g), a), g)
    delta, diag = _attack(state, flat, valid, keys, cfg, groups)
    return delta.reshape(g, a, l, -1), diag


# ------------------------------------------------------------------------------ one micro-batch
def microbatch_loss(lora, frozen, graphdef, mb, delta_AxLxD, key, cfg: StepConfig):
    """C-AdvUL loss of one micro-batch (differentiable in ``lora``); returns (loss, aux)."""
    lc = cfg.loss
    k_adv, k_util = jax.random.split(key)
    dk = (lambda k: k) if cfg.train_dropout else (lambda k: None)
    valid_A, valid_U = mb["adv_valid_A"], mb["util_valid_U"]
    has_adv, has_util = jnp.any(valid_A), jnp.any(valid_U)
    zero = jnp.zeros((), jnp.float32)

    def adv_terms(ops):
        # Away and toward rows in ONE forward ([2A, L]): same δ, same positions (spec §12).
        lora, frozen = ops
        model = lora_lib.merge(graphdef, lora, frozen)
        delta = None if delta_AxLxD is None else jax.lax.stop_gradient(delta_AxLxD)
        both = jax.tree.map(
            lambda x, y: jnp.concatenate([x, y], axis=0),
            token_rows(mb, "away"),
            token_rows(mb, "toward"),
        )
        delta2 = None if delta is None else jnp.concatenate([delta, delta], axis=0)
        logp, w, dropped = sequence_logprobs(
            model,
            input_embeddings(model, both.ids_BxL, delta2, both.prompt_BxL & both.mask_BxL),
            both.mask_BxL,
            both.ids_BxL,
            both.target_BxL,
            jnp.concatenate([valid_A, valid_A], axis=0),
            dropout_key=dk(k_adv),
            max_targets=cfg.adv_max_targets,
        )
        a = valid_A.shape[0]
        ce_harm = token_mean(-logp[:a], w[:a])
        ce_safe = token_mean(-logp[a:], w[a:])
        if lc.away_loss_type == "negative_cross_entropy":
            away = losses.floor_away(-ce_harm, lc.away_cutoff, lc.cutoff_slope)
        else:
            away = losses.log_1_minus_p_loss(logp[:a], w[:a], lc.away_cutoff)
        toward = losses.floor_toward(ce_safe, lc.toward_cutoff, lc.cutoff_slope)
        return away, toward, ce_harm, ce_safe, dropped.astype(jnp.int32)

    def no_adv(_):
        return zero, zero, zero, zero, jnp.zeros((), jnp.int32)

    def util_term(ops):
        lora, frozen = ops
        model = lora_lib.merge(graphdef, lora, frozen)
        util = token_rows(mb, "util")
        return sequence_ce(
            model,
            input_embeddings(model, util.ids_BxL),
            util.mask_BxL,
            util.ids_BxL,
            util.target_BxL,
            valid_U,
            dropout_key=dk(k_util),
        )

    ops = (lora, frozen)
    away, toward, ce_harm, ce_safe, dropped = jax.lax.cond(has_adv, adv_terms, no_adv, ops)
    utility = jax.lax.cond(has_util, util_term, lambda _: zero, ops)
    loss = lc.away_weight * away + lc.toward_weight * toward + lc.utility_weight * utility
    aux = dict(
        away=away,
        toward=toward,
        utility=utility,
        ce_harm=ce_harm,
        ce_safe=ce_safe,
        targets_dropped=dropped,
        has_adv=has_adv,
        has_util=has_util,
    )
    return loss, aux


def microbatch_grads(
    state: TrainState,
    mb,
    key,
    *,
    cfg: StepConfig,
    with_grads: bool = True,
    attack: tuple[jax.Array, dict[str, jax.Array]] | None = None,
):
    """(LoRA grads or None, metric parts) of one micro-batch (no G axis).

    ``attack``: this micro-batch's (δ [A, L, D], diagnostics) from ``step_attack``; required
    when ``cfg.runs_attack``. Metric parts: ``training.step_metrics.microbatch_parts``."""
    _, k_train = jax.random.split(key)
    eps_abs = cfg.attack.eps * state.emb_norm
    delta, diag = None, None
    if cfg.runs_attack:
        if attack is None:
            raise ValueError("microbatch_grads needs the micro-batch's attack (steps.step_attack)")
        delta, diag = attack
    fn = functools.partial(
        microbatch_loss, graphdef=state.graphdef, mb=mb, delta_AxLxD=delta, key=k_train, cfg=cfg
    )
    if with_grads:
        (loss, aux), grads = jax.value_and_grad(fn, has_aux=True)(state.lora, state.frozen)
    else:
        (loss, aux), grads = fn(state.lora, state.frozen), None
    ce_harm = aux["ce_harm"]
    zero = jnp.zeros((), jnp.float32)
    values = dict(
        loss=loss,
        away=aux["away"],
        toward=aux["toward"],
        utility=aux["utility"],
        ce_harm=ce_harm,
        ce_safe=aux["ce_safe"],
        attack_loss_before=ce_harm if diag is None else diag["loss_before"],
        attack_loss_after=ce_harm,
        delta_norm_max=zero,
        eps_abs=eps_abs,
        num_adv_rows=jnp.sum(mb["adv_valid_A"]).astype(jnp.float32),
        num_util_rows=jnp.sum(mb["util_valid_U"]).astype(jnp.float32),
        targets_dropped=aux["targets_dropped"].astype(jnp.float32),
    )
    if delta is None:  # no δ: 0 wherever there are adversarial rows
        has_adv = aux["has_adv"].astype(jnp.float32)
        tokens = {k: (zero, has_adv) for k in sm.TOKEN_WEIGHTED}
    else:  # token sums of this micro-batch's attacked tokens (token-weighted over the step)
        away = token_rows(mb, "away")
        valid_A = mb["adv_valid_A"].astype(bool)
        m_in = away.prompt_BxL.astype(bool) & away.mask_BxL.astype(bool) & valid_A[:, None]
        s = delta_sums(delta, m_in, eps_abs)
        values["delta_norm_max"] = s["norm_max"]
        tokens = {
            "delta_norm_mean": (s["norm_sum"], s["count"]),
            "frac_at_boundary": (s["at_boundary"], s["count"]),
        }
    parts = sm.microbatch_parts(values, tokens, has_adv=aux["has_adv"], has_util=aux["has_util"])
    return grads, parts


def accumulate(state: TrainState, batch, key, cfg: StepConfig, with_grads: bool):
    """Scan over the G micro-batches; (mean grads or None, summed metric parts)."""
    batch = with_microbatch_axis(batch)
    g = batch["away_ids_AxL"].shape[0]
    offset = 0 if cfg.pmap_axis_name is None else jax.lax.axis_index(cfg.pmap_axis_name) * g

    step_wide = cfg.runs_attack and cfg.attack_batching == "step"
    deltas = diag = None  # None: an empty scan input
    if step_wide:  # all micro-batches' attacks in one batched call, before the scan
        deltas, diag = step_attack(state, batch, key, offset, cfg)

    def body(carry, xs):
        grad_sum, acc = carry
        mb, i, delta = xs
        attack = None
        if step_wide:
            attack = (delta, diag)
        elif cfg.runs_attack:  # one micro-batch at a time (same per-row keys)
            one = {k: v[None] for k, v in mb.items()}
            d1, diag1 = step_attack(state, one, key, offset + i, cfg)
            attack = (d1[0], diag1)
        grads, parts = microbatch_grads(
            state,
            mb,
            jax.random.fold_in(key, offset + i),
            cfg=cfg,
            with_grads=with_grads,
            attack=attack,
        )
        if with_grads:
            grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
        acc = sm.combine_parts(acc, parts)
        return (grad_sum, acc), None

    grad0 = jax.tree.map(jnp.zeros_like, state.lora) if with_grads else None
    carry0 = (grad0, sm.empty_parts())
    (grad_sum, acc), _ = jax.lax.scan(body, carry0, (batch, jnp.arange(g), deltas))
    grads = None if grad_sum is None else jax.tree.map(lambda x: x / g, grad_sum)
    return grads, acc


# ------------------------------------------------------------------------------ public steps
def train_step(state: TrainState, batch, key: jax.Array, *, cfg: StepConfig):
    """One optimizer step over the G micro-batches of ``batch``; returns (new state, metrics)."""
    grads, parts = accumulate(state, batch, key, cfg, with_grads=True)
    if cfg.pmap_axis_name is not None:
        grads = jax.lax.pmean(grads, cfg.pmap_axis_name)
    metrics = sm.finish_parts(parts, cfg.pmap_axis_name)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.lora)
    lora = optax.apply_updates(state.lora, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["lr"] = injected_learning_rate(opt_state)
    new_state = state.replace(lora=lora, opt_state=opt_state, step=state.step + 1)
    return new_state, metrics


def eval_loss_step(state: TrainState, batch, key: jax.Array | None = None, *, cfg: StepConfig):
    """Held-out C-AdvUL losses (same attack/variant as ``cfg``, dropout off, no update)."""
    cfg = cfg.replace(train_dropout=False, attack=dataclasses.replace(cfg.attack, dropout=False))
    key = jax.random.key(0) if key is None else key
    _, parts = accumulate(state, batch, key, cfg, with_grads=False)
    return sm.finish_parts(parts, cfg.pmap_axis_name)
