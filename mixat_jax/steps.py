"""THE research API: pure MixAT / CAT training and evaluation steps (MixAT spec §3, §4, §5, §12).

This module is the documented public facade (explicit imports, listed in ``__all__``); the
implementation lives in ``training``: ``training.train_step`` (the pure steps; attack, loss and
gradients of a micro-batch), ``training.step_metrics`` (metric definitions and reduction),
``training.compiled_step`` (jit on a mesh, pmap). Import from here, e.g.
``from mixat_jax.steps import train_step, make_jitted_train_step``.

``train_step(state, batch, key, *, cfg) -> (state, metrics)`` for one optimizer step:

1. The batch (keys of ``training.batches.BATCH_KEYS``, right-padded) has a leading ``[G]``
   micro-batch axis (a batch without it is treated as G = 1). ``lax.scan`` runs the G
   micro-batches; gradients and losses are the MEAN over micro-batches (spec §3.1: each
   micro-batch loss is divided by the accumulation count).
2. The continuous attack (``attacks.continuous``, jax.grad w.r.t. δ only) on the valid away rows
   — by default (``cfg.attack_batching="step"``, ``step_attack``) for the rows of ALL G
   micro-batches in one batched call before the scan (the parameters are the same for every
   micro-batch of an optimizer step; each micro-batch keeps its own token-mean objective), or
   micro-batch by micro-batch (``"microbatch"``); under ``lax.cond`` so rows without valid
   adversarial slots skip it, and not traced at all for the "discrete_only" / "sft" variants or
   ``attack.iters == 0``.
3. C-AdvUL (spec §4): ``away_weight·floor_away(-CE_harm) + toward_weight·floor_toward(CE_safe) +
   utility_weight·CE_util`` with HF token-mean CEs over each sub-batch's valid rows; δ is
   stop_gradient'ed and added (fp32) position by position to the toward rows, whose prompt equals
   the away prompt (spec §12 "δ transfer"). The away/toward terms exist only when the micro-batch
   has valid adversarial rows, the utility term only when it has valid utility rows (reference:
   empty sub-batches contribute 0, spec §3.2).
4. Gradients w.r.t. the LoRA state only; the frozen base is an input, never updated; optax update.

Randomness: micro-batch ``g`` uses ``fold_in(key, g)`` (under pmap: the global index
``axis_index · G + g``, so pmap over devices equals jit over the concatenated micro-batches);
attack rows use per-row keys from (key, global g, slot) (``attack_row_keys``), so "step" and
"microbatch" attack batching, jit and pmap all give each row the same δ.
LoRA dropout is on in training passes (``cfg.train_dropout``) and in attack passes
(``cfg.attack.dropout``), as in the reference (spec §11.2).

Parallelism: ``make_jitted_train_step(cfg, mesh)`` jits with shardings from the parameters'
logical axes and donates the LoRA/optimizer/step buffers (frozen weights are not donated); the
optimizer is the state's (``TrainState.tx``). Under ``jax.pmap``
(``make_pmapped_train_step``, which sets ``cfg.pmap_axis_name``) gradients are ``pmean``-ed
(data-parallel semantics: each device's micro-batches are micro-batches of the global step) and
metrics are reduced over devices.

Metrics: loss, away, toward, utility, ce_harm, ce_safe, attack_loss_before, attack_loss_after,
delta_norm_mean, delta_norm_max, frac_at_boundary, eps_abs, grad_norm, lr, num_adv_rows,
num_util_rows, targets_dropped. Means over micro-batches that have the relevant rows (NaN if none
in the whole step); ``delta_norm_mean`` / ``frac_at_boundary`` are token-weighted over the whole
step; the same definitions under jit, pmap and either attack batching (exact definitions:
``training.step_metrics``). ``attack_loss_after`` is CE_harm of the training away pass (same δ).
"""

from __future__ import annotations

from mixat_jax.attacks.continuous import continuous_attack
from mixat_jax.objectives import TokenRows
from mixat_jax.training.batches import BATCH_KEYS, token_rows
from mixat_jax.training.compiled_step import (
    JittedTrainStep,
    make_jitted_train_step,
    make_pmapped_train_step,
    step_batch_shardings,
)
from mixat_jax.training.optim import injected_learning_rate
from mixat_jax.training.state import (
    TrainState,
    init_train_state,
    place_train_state,
    train_state_shardings,
)
from mixat_jax.training.step_config import LossConfig, StepConfig
from mixat_jax.training.step_metrics import (
    MAX_METRICS,
    MEAN_OVER_ADV,
    MEAN_OVER_ALL,
    MEAN_OVER_UTIL,
    SUM_METRICS,
    TOKEN_WEIGHTED,
)
from mixat_jax.training.train_step import (
    ATTACK_DIAG_KEYS,
    ATTACK_STREAM,
    attack_row_keys,
    eval_loss_step,
    microbatch_grads,
    microbatch_loss,
    step_attack,
    train_step,
    with_microbatch_axis,
)

__all__ = [
    "ATTACK_DIAG_KEYS",
    "ATTACK_STREAM",
    "BATCH_KEYS",
    "MAX_METRICS",
    "MEAN_OVER_ADV",
    "MEAN_OVER_ALL",
    "MEAN_OVER_UTIL",
    "SUM_METRICS",
    "TOKEN_WEIGHTED",
    "JittedTrainStep",
    "LossConfig",
    "StepConfig",
    "TokenRows",
    "TrainState",
    "attack_row_keys",
    "continuous_attack",
    "eval_loss_step",
    "init_train_state",
    "injected_learning_rate",
    "make_jitted_train_step",
    "make_pmapped_train_step",
    "microbatch_grads",
    "microbatch_loss",
    "place_train_state",
    "step_attack",
    "step_batch_shardings",
    "token_rows",
    "train_state_shardings",
    "train_step",
    "with_microbatch_axis",
]
