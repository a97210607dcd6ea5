"""THE research API: pure MixAT / CAT training and evaluation steps (MixAT spec §3, §4, §5, §12).

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

Parallelism: ``make_jitted_train_step`` jits with in/out shardings from the parameters' logical
axes and donates the LoRA/optimizer/step buffers (frozen weights are not donated). Under
``jax.pmap`` set ``cfg.pmap_axis_name``: gradients are ``pmean``-ed (data-parallel semantics: each
device's micro-batches are micro-batches of the global step) and metrics are reduced over devices.

Metrics: loss, away, toward, utility, ce_harm, ce_safe, attack_loss_before, attack_loss_after,
delta_norm_mean, delta_norm_max, frac_at_boundary, eps_abs, grad_norm, lr, num_adv_rows,
num_util_rows, targets_dropped. Means over micro-batches that have the relevant rows (NaN if none
in the whole step). ``attack_loss_after`` is CE_harm of the training away pass (same δ).
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
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mixat_jax import lora as lora_lib
from mixat_jax.attacks.continuous import continuous_attack
from mixat_jax.training import losses
from mixat_jax.training.batches import BATCH_KEYS
from mixat_jax.training.state import TrainState, train_state_shardings
from mixat_jax.training.step_config import StepConfig

ATTACK_DIAG_KEYS = ("loss_before", "delta_norm_mean", "delta_norm_max", "frac_at_boundary")
MEAN_OVER_ADV = (
    "away",
    "toward",
    "ce_harm",
    "ce_safe",
    "attack_loss_before",
    "attack_loss_after",
    "delta_norm_mean",
    "frac_at_boundary",
)
MEAN_OVER_UTIL = ("utility",)
MEAN_OVER_ALL = ("loss", "eps_abs")
MAX_METRICS = ("delta_norm_max",)
SUM_METRICS = ("num_adv_rows", "num_util_rows", "targets_dropped")


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


# ------------------------------------------------------------------------------ one micro-batch
def _embed_f32(model, ids_BxL, delta_BxLxD, m_in_BxL):
    """E[ids] (+ δ on the attacked positions), in fp32 (spec §11.15)."""
    emb = model.embed(ids_BxL).astype(jnp.float32)
    if delta_BxLxD is None:
        return emb
    return emb + delta_BxLxD * m_in_BxL[..., None].astype(jnp.float32)


ATTACK_STREAM = 0x61747461  # fold_in tag of the attack's randomness ("atta")


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


def _attack(graphdef, lora, frozen, eps_abs, emb_norm, mb, row_keys, cfg: StepConfig, groups):
    """δ for the away rows [rows, L, D] + diagnostics; zeros when no away row is valid.

    ``mb`` holds flat [rows, L] away arrays; ``groups`` = (group id per row, number of groups):
    each group (micro-batch) keeps its own token-mean objective (see ``continuous_attack``)."""
    valid_A = mb["adv_valid_A"]
    a, l = mb["away_ids_AxL"].shape
    d = lora_lib.merge(graphdef, lora, frozen).cfg.hidden_size
    group_B, num_groups = groups

    def run(_):
        delta, diag = continuous_attack(
            graphdef,
            lora,
            frozen,
            mb["away_ids_AxL"],
            mb["away_mask_AxL"],
            mb["away_prompt_mask_AxL"],
            mb["away_target_mask_AxL"],
            row_keys,
            cfg=cfg.attack,
            eps_abs=eps_abs,
            row_valid_B=valid_A,
            emb_norm=emb_norm,
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
    make it the same δ, up to float rounding). Returns δ [G, A, L, D] and diagnostics (means over
    the micro-batches that have adversarial rows; max for ``delta_norm_max``)."""
    g, a, l = batch["away_ids_AxL"].shape
    names = ("away_ids_AxL", "away_mask_AxL", "away_prompt_mask_AxL", "away_target_mask_AxL")
    flat = {k: batch[k].reshape(g * a, l) for k in names}
    flat["adv_valid_A"] = batch["adv_valid_A"].reshape(g * a)
    keys = attack_row_keys(key, offset + jnp.arange(g), a)
    groups = (jnp.repeat(jnp.arange(g), a), g)
    eps_abs = cfg.attack.eps * state.emb_norm
    delta, diag = _attack(
        state.graphdef, state.lora, state.frozen, eps_abs, state.emb_norm, flat, keys, cfg, groups
    )
    return delta.reshape(g, a, l, -1), diag


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
        both = {
            k: jnp.concatenate([mb[f"away_{k}_AxL"], mb[f"toward_{k}_AxL"]], axis=0)
            for k in ("ids", "mask", "prompt_mask", "target_mask")
        }
        delta2 = None if delta is None else jnp.concatenate([delta, delta], axis=0)
        logp, w, dropped = losses.sequence_logprobs(
            model,
            _embed_f32(model, both["ids"], delta2, both["prompt_mask"] & both["mask"]),
            both["mask"],
            both["ids"],
            both["target_mask"],
            jnp.concatenate([valid_A, valid_A], axis=0),
            dropout_key=dk(k_adv),
            max_targets=cfg.adv_max_targets,
        )
        a = valid_A.shape[0]
        ce_harm = losses.token_mean(-logp[:a], w[:a])
        ce_safe = losses.token_mean(-logp[a:], w[a:])
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
        return losses.sequence_ce(
            model,
            _embed_f32(model, mb["util_ids_UxM"], None, None),
            mb["util_mask_UxM"],
            mb["util_ids_UxM"],
            mb["util_target_mask_UxM"],
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
    when ``cfg.runs_attack``."""
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
    has_adv = aux["has_adv"].astype(jnp.float32)
    has_util = aux["has_util"].astype(jnp.float32)
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
        delta_norm_mean=zero if diag is None else diag["delta_norm_mean"],
        delta_norm_max=zero if diag is None else diag["delta_norm_max"],
        frac_at_boundary=zero if diag is None else diag["frac_at_boundary"],
        eps_abs=eps_abs,
        num_adv_rows=jnp.sum(mb["adv_valid_A"]).astype(jnp.float32),
        num_util_rows=jnp.sum(mb["util_valid_U"]).astype(jnp.float32),
        targets_dropped=aux["targets_dropped"].astype(jnp.float32),
    )
    weights = {k: has_adv for k in MEAN_OVER_ADV}
    weights.update({k: has_util for k in MEAN_OVER_UTIL})
    weights.update({k: jnp.ones((), jnp.float32) for k in MEAN_OVER_ALL})
    parts = {
        k: (v.astype(jnp.float32) * weights[k], weights[k])
        for k, v in values.items()
        if k in weights
    }
    parts.update({k: (values[k].astype(jnp.float32), zero) for k in SUM_METRICS + MAX_METRICS})
    return grads, parts


def _combine_parts(acc, new):
    out = {}
    for k, (num, den) in new.items():
        a_num, a_den = acc[k]
        out[k] = (
            (jnp.maximum(a_num, num), a_den) if k in MAX_METRICS else (a_num + num, a_den + den)
        )
    return out


def _finish_parts(parts, axis_name: str | None) -> dict[str, jax.Array]:
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


def _accumulate(state: TrainState, batch, key, cfg: StepConfig, with_grads: bool):
    """Scan over the G micro-batches; (mean grads or None, reduced metric parts)."""
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
        acc = _combine_parts(acc, parts)
        return (grad_sum, acc), None

    names = MEAN_OVER_ADV + MEAN_OVER_UTIL + MEAN_OVER_ALL + SUM_METRICS + MAX_METRICS
    acc0 = {
        k: (
            jnp.full((), -jnp.inf if k in MAX_METRICS else 0.0, jnp.float32),
            jnp.zeros((), jnp.float32),
        )
        for k in names
    }
    grad0 = jax.tree.map(jnp.zeros_like, state.lora) if with_grads else None
    (grad_sum, acc), _ = jax.lax.scan(body, (grad0, acc0), (batch, jnp.arange(g), deltas))
    grads = None if grad_sum is None else jax.tree.map(lambda x: x / g, grad_sum)
    return grads, acc


# ------------------------------------------------------------------------------ public steps
def train_step(state: TrainState, batch, key: jax.Array, *, cfg: StepConfig):
    """One optimizer step over the G micro-batches of ``batch``; returns (new state, metrics)."""
    grads, parts = _accumulate(state, batch, key, cfg, with_grads=True)
    if cfg.pmap_axis_name is not None:
        grads = jax.lax.pmean(grads, cfg.pmap_axis_name)
    metrics = _finish_parts(parts, cfg.pmap_axis_name)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.lora)
    lora = optax.apply_updates(state.lora, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["lr"] = _learning_rate(opt_state)
    new_state = state.replace(lora=lora, opt_state=opt_state, step=state.step + 1)
    return new_state, metrics


def eval_loss_step(state: TrainState, batch, key: jax.Array | None = None, *, cfg: StepConfig):
    """Held-out C-AdvUL losses (same attack/variant as ``cfg``, dropout off, no update)."""
    cfg = cfg.replace(train_dropout=False, attack=dataclasses.replace(cfg.attack, dropout=False))
    key = jax.random.key(0) if key is None else key
    _, parts = _accumulate(state, batch, key, cfg, with_grads=False)
    return _finish_parts(parts, cfg.pmap_axis_name)


def _learning_rate(opt_state) -> jax.Array:
    """The injected learning rate of this update (``inject_hyperparams``; NaN if none)."""
    found = [
        x.hyperparams["learning_rate"]
        for x in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "hyperparams"))
        if hasattr(x, "hyperparams") and "learning_rate" in x.hyperparams
    ]
    return jnp.asarray(found[0] if found else jnp.nan, jnp.float32)


# ------------------------------------------------------------------------------ jit / pmap
def step_batch_shardings(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
    """[G, slots, ...] arrays: the slot axis over (data, fsdp) where divisible, else replicated."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    out = {}
    for k, v in batch.items():
        shape = np.shape(v)
        if len(shape) >= 2 and shape[1] % n == 0 and n > 1:
            spec = PartitionSpec(None, ("data", "fsdp"), *([None] * (len(shape) - 2)))
        else:
            spec = PartitionSpec()
        out[k] = NamedSharding(mesh, spec)
    return out


class JittedTrainStep:
    """``train_step`` jitted on a mesh: ``step(state, batch, key) -> (state, metrics)``.

    In/out shardings come from the parameters' logical axes (``mesh.state_shardings``); LoRA,
    optimizer state and step are donated, the frozen base and ē are not. ``lower(...)`` gives the
    ``jax.stages.Lowered``; ``compile(...)`` the cached executable that ``__call__`` runs (so
    ``step.compile(...).memory_analysis()`` costs no second compilation). ``compiler_options``
    are passed to XLA (e.g. ``{"xla_backend_optimization_level": 0}`` for fast CPU tests).
    """

    def __init__(
        self,
        cfg: StepConfig,
        tx: optax.GradientTransformation,
        mesh: Mesh,
        compiler_options: dict[str, Any] | None = None,
    ):
        if cfg.pmap_axis_name is not None:
            raise ValueError("make_jitted_train_step needs cfg.pmap_axis_name=None (jit, not pmap)")
        self.cfg, self.tx, self.mesh = cfg, tx, mesh
        self.compiler_options = compiler_options
        self._jitted: dict[Any, Any] = {}
        self._compiled: dict[Any, Any] = {}

    @staticmethod
    def _signature(state: TrainState, batch) -> Any:
        return (
            state.graphdef,
            tuple((k, np.shape(v), np.result_type(v)) for k, v in batch.items()),
        )

    def _jit(self, state: TrainState, batch):
        if state.tx is not self.tx:
            raise ValueError("state.tx is not the optimizer this step was built with")
        sig = self._signature(state, batch)
        if sig in self._jitted:
            return self._jitted[sig]
        sh = train_state_shardings(state, self.mesh)
        rep = NamedSharding(self.mesh, PartitionSpec())
        graphdef, tx, cfg = state.graphdef, self.tx, self.cfg

        def inner(lora, opt_state, step, frozen, emb_norm, batch, key):
            st = TrainState(graphdef, tx, lora, frozen, opt_state, step, emb_norm)
            new, metrics = train_step(st, batch, key, cfg=cfg)
            return (new.lora, new.opt_state, new.step), metrics

        in_sh = (
            sh.lora,
            sh.opt_state,
            sh.step,
            sh.frozen,
            sh.emb_norm,
            step_batch_shardings(batch, self.mesh),
            rep,
        )
        fn = jax.jit(
            inner,
            in_shardings=in_sh,
            out_shardings=((sh.lora, sh.opt_state, sh.step), rep),
            donate_argnums=(0, 1, 2),
        )
        self._jitted[sig] = (fn, in_sh)
        return fn, in_sh

    def _args(self, state: TrainState, batch, key):
        batch = with_microbatch_axis(batch)
        return (state.lora, state.opt_state, state.step, state.frozen, state.emb_norm, batch, key)

    def lower(self, state: TrainState, batch, key) -> jax.stages.Lowered:
        args = self._args(state, batch, key)
        fn, _ = self._jit(state, args[5])
        return fn.lower(*args)

    def compile(self, state: TrainState, batch, key) -> jax.stages.Compiled:
        args = self._args(state, batch, key)
        sig = self._signature(state, args[5])
        if sig not in self._compiled:
            lowered = self.lower(state, batch, key)
            self._compiled[sig] = lowered.compile(self.compiler_options)
        return self._compiled[sig]

    def __call__(self, state: TrainState, batch, key):
        compiled = self.compile(state, batch, key)
        _, in_sh = self._jit(state, with_microbatch_axis(batch))
        args = jax.device_put(self._args(state, batch, key), in_sh)
        (lora, opt_state, step), metrics = compiled(*args)
        return state.replace(lora=lora, opt_state=opt_state, step=step), metrics


def make_jitted_train_step(
    cfg: StepConfig,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    compiler_options: dict[str, Any] | None = None,
) -> JittedTrainStep:
    """``train_step`` under ``jax.jit`` with mesh shardings and donation (see JittedTrainStep)."""
    return JittedTrainStep(cfg, tx, mesh, compiler_options)


def make_pmapped_train_step(cfg: StepConfig, axis_name: str = "devices"):
    """``train_step`` under ``jax.pmap``: state replicated per device, batch split per device
    (leading device axis, then [G, ...]), one key shared by all devices."""
    cfg = cfg.replace(pmap_axis_name=axis_name)
    return jax.pmap(
        functools.partial(train_step, cfg=cfg),
        axis_name=axis_name,
        in_axes=(0, 0, None),
        donate_argnums=(0,),
    )
