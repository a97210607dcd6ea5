"""Continuous embedding-space attack: signed-gradient PGD in a per-token L2 ball (MixAT spec §5).

The attacker perturbs the input embeddings of every prompt position (BOS, system prompt, chat
template, instruction and assistant header; spec §11.4) with ``delta_BxLxD`` to LOWER the
token-mean cross entropy of the harmful affirmative target::

    e_adv = E[ids] + delta ⊙ M_in                 M_in = prompt_mask & mask & row_valid
    delta <- delta - lr · sign(∇_delta CE)         (optimizer "sign", absolute lr; §5)
    delta <- delta · min(1, eps_abs / ||delta_t||)  per token, after every step
    eps_abs = eps · mean_v ||E_v||_2               (relative radius, absolute step; §11.5)

Design (DESIGN.md rule 1; spec §11.1): the function is pure and differentiates with respect to
delta ONLY; LoRA and base parameters enter as ``stop_gradient`` constants, so no parameter
gradient can arise from the attack (the reference leaks ∇θ CE_harm into the LoRA gradients —
an intentional fix). The loop is a ``lax.scan`` over iterations and runs inside the caller's jit.
delta and the ``E[ids] + delta`` addition are fp32 (§11.15); the decoder then casts to its compute
dtype. The LAST iterate is returned by default (§11.3); ``best_iterate`` keeps, per row, the
iterate with the lowest own-row CE (costs one extra forward).

Dropout (§11.2): ``dropout=True`` (default) is faithful — the reference attacks the model in
training mode, so LoRA dropout (0.1) is active in every attack pass, each with a fresh key.
``dropout=False`` gives a deterministic attack on the same model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mixat_jax import lora as lora_lib
from mixat_jax.models import layers
from mixat_jax.objectives import (
    TokenRows,
    input_embeddings,
    mean_embedding_norm,
    sequence_logprobs,
)

OPTIMIZERS = ("sign", "adam", "grad")
INITS = ("zero", "uniform")
BOUNDARY_RTOL = 1e-3  # a token counts as "at the boundary" when ||delta|| >= (1 - rtol) eps_abs


@dataclasses.dataclass(frozen=True)
class ContinuousAttackConfig:
    """Reference values (spec §5, App. A): 10 sign steps of 1e-4, eps 0.075 (relative), zero init.

    ``max_targets``: if set, logits are computed only at the first ``max_targets`` target tokens
    per row (memory; targets beyond it are ignored and counted in the diagnostics).
    """

    eps: float = 0.075
    iters: int = 10
    lr: float = 1e-4
    optimizer: str = "sign"
    relative_lr: bool = False
    init: str = "zero"
    best_iterate: bool = False
    dropout: bool = True
    max_targets: int | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"attack optimizer {self.optimizer!r} unknown; use one of {OPTIMIZERS}"
            )
        if self.init not in INITS:
            raise ValueError(f"attack init {self.init!r} unknown; use one of {INITS}")
        if self.iters < 0 or self.eps < 0 or self.lr < 0:
            raise ValueError(
                f"attack iters/eps/lr must be >= 0; got {self.iters}/{self.eps}/{self.lr}"
            )
        if self.max_targets is not None and self.max_targets < 1:
            raise ValueError(f"attack max_targets must be >= 1 or None; got {self.max_targets}")


def project_l2(delta_BxLxD: jax.Array, eps_abs: jax.Array) -> jax.Array:
    """Rescales every token vector whose L2 norm exceeds ``eps_abs`` onto the sphere."""
    norm_BxLx1 = jnp.linalg.norm(delta_BxLxD, axis=-1, keepdims=True)
    scale = jnp.where(norm_BxLx1 > eps_abs, eps_abs / jnp.maximum(norm_BxLx1, 1e-30), 1.0)
    return delta_BxLxD * scale


def _init_delta(key, shape, eps_abs, m_in_BxLx1, init: str) -> jax.Array:
    if init == "zero":
        return jnp.zeros(shape, jnp.float32)
    # uniform: coordinates U(-1, 1) · eps_abs / sqrt(D), so every token starts inside the ball.
    if key.ndim == 0:
        u = jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0)
    else:  # per-row keys
        u = jax.vmap(lambda k: jax.random.uniform(k, shape[1:], jnp.float32, -1.0, 1.0))(key)
    return project_l2(u * eps_abs / jnp.sqrt(shape[-1]), eps_abs) * m_in_BxLx1


def _row_sums(logp_BxT: jax.Array, weight_BxT: jax.Array) -> jax.Array:
    """Per-row summed target CE (rows keep their token counts across iterates)."""
    return -jnp.sum(logp_BxT * weight_BxT.astype(jnp.float32), axis=-1)


def continuous_attack(
    graphdef,
    lora,
    frozen,
    rows: TokenRows,
    key: jax.Array,
    *,
    cfg: ContinuousAttackConfig,
    eps_abs: jax.Array | float,
    row_valid_B: jax.Array | None = None,
    emb_norm: jax.Array | float | None = None,
    eval_final: bool = True,
    group_B: jax.Array | None = None,
    num_groups: int = 1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Runs ``cfg.iters`` attack steps; returns ``(delta_BxLxD fp32, diagnostics)``.

    Args:
      graphdef, lora, frozen: the split model (``mixat_jax.lora.split``); used as constants.
      rows: the right-padded rows to attack (``objectives.TokenRows``): δ perturbs
        ``prompt_BxL & mask_BxL``, the objective is the CE of the ``target_BxL`` tokens
        (response + end of turn).
      key: randomness for LoRA dropout (if ``cfg.dropout``) and the uniform init: one key, or
        one key per row ([B]; a row's δ then depends only on its own key and data, so attacking
        rows together or apart gives the same result).
      eps_abs: absolute per-token radius (``cfg.eps · mean_embedding_norm(E)``).
      row_valid_B: rows that count (invalid rows get delta = 0 and no loss).
      emb_norm: ē for ``relative_lr`` (computed from the embedding matrix if None).
      eval_final: one extra forward to report the loss at the returned delta (forced on by
        ``best_iterate``); otherwise ``loss_after`` is NaN.
      group_B, num_groups: rows in ``num_groups`` independent groups (e.g. the micro-batches of
        one optimizer step, attacked together): the objective is the SUM of per-group token means,
        so each row's gradient equals that of attacking its group alone; reported losses are
        the mean over groups that have target tokens.

    Diagnostics (fp32 scalars unless noted): loss_before (at the initial delta), loss_after,
    loss_trace [iters] (loss at each iterate before its step), delta_norm_mean / delta_norm_max /
    frac_at_boundary (``delta_stats``: over ALL attacked tokens of all rows and groups), eps_abs,
    lr_abs (the absolute step; ``lr · ē`` with ``relative_lr``), targets_dropped.
    """
    if not isinstance(rows, TokenRows):
        raise TypeError("continuous_attack: pass the rows as objectives.TokenRows")
    rows.check_shapes("continuous_attack")
    if rows.prompt_BxL is None:
        raise ValueError("continuous_attack: rows.prompt_BxL is None; the attack needs prompts")
    ids_BxL, mask_BxL, prompt_mask_BxL, target_mask_BxL = rows
    b, l = ids_BxL.shape
    lora, frozen = jax.lax.stop_gradient((lora, frozen))
    model = lora_lib.merge(graphdef, lora, frozen)
    valid_B = jnp.ones((b,), bool) if row_valid_B is None else row_valid_B.astype(bool)
    m_in_BxL = prompt_mask_BxL.astype(bool) & mask_BxL.astype(bool) & valid_B[:, None]
    m_in_BxLx1 = m_in_BxL[..., None].astype(jnp.float32)
    emb0_BxLxD = input_embeddings(model, ids_BxL)
    eps_abs = jnp.asarray(eps_abs, jnp.float32)
    lr_abs = jnp.asarray(cfg.lr, jnp.float32)
    if cfg.relative_lr:
        e_bar = mean_embedding_norm(model.embedding_matrix) if emb_norm is None else emb_norm
        lr_abs = lr_abs * jnp.asarray(e_bar, jnp.float32)
    k_init, k_loop = layers.split_keys(key, 2)

    def logprobs(delta_BxLxD, k):
        emb = emb0_BxLxD + delta_BxLxD * m_in_BxLx1
        return sequence_logprobs(
            model,
            emb,
            mask_BxL,
            ids_BxL,
            target_mask_BxL,
            valid_B,
            dropout_key=k if cfg.dropout else None,
            max_targets=cfg.max_targets,
        )

    def group_losses(row_sum_B, weight_BxT):
        """(objective, reported loss): token means per group, summed / averaged over groups."""
        if group_B is None:
            mean = jnp.sum(row_sum_B) / jnp.maximum(jnp.sum(weight_BxT.astype(jnp.float32)), 1.0)
            return mean, mean
        den_B = jnp.sum(weight_BxT.astype(jnp.float32), axis=-1)
        num_G = jax.ops.segment_sum(row_sum_B, group_B, num_groups)
        den_G = jax.ops.segment_sum(den_B, group_B, num_groups)
        per_G = num_G / jnp.maximum(den_G, 1.0)
        return jnp.sum(per_G), jnp.sum(per_G) / jnp.maximum(jnp.sum(den_G > 0), 1)

    def objective(delta_BxLxD, k):
        logp, weight, dropped = logprobs(delta_BxLxD, k)
        row_sum = _row_sums(logp, weight)
        total, reported = group_losses(row_sum, weight)
        return total, (row_sum, weight, dropped, reported)

    grad_fn = jax.value_and_grad(objective, has_aux=True)
    adam = optax.scale_by_adam()  # torch Adam defaults (b1 .9, b2 .999, eps 1e-8)

    def step(carry, i):
        delta, adam_state, best = carry
        (_, (row_sum, _, dropped, loss)), g = grad_fn(delta, _fold_in(k_loop, i))
        if cfg.best_iterate:
            best = _keep_better(best, delta, row_sum)
        if cfg.optimizer == "sign":
            direction = jnp.sign(g)
        elif cfg.optimizer == "grad":
            direction = g
        else:
            direction, adam_state = adam.update(g, adam_state)
        delta = project_l2(delta - lr_abs * direction, eps_abs) * m_in_BxLx1
        return (delta, adam_state, best), (loss, dropped)

    delta0 = _init_delta(k_init, emb0_BxLxD.shape, eps_abs, m_in_BxLx1, cfg.init)
    adam_state0 = adam.init(delta0) if cfg.optimizer == "adam" else ()
    best0 = (delta0, jnp.full((b,), jnp.inf, jnp.float32)) if cfg.best_iterate else ()
    (delta, _, best), (trace, dropped_t) = jax.lax.scan(
        step, (delta0, adam_state0, best0), jnp.arange(cfg.iters)
    )
    loss_after = jnp.full((), jnp.nan, jnp.float32)
    dropped = dropped_t[0] if cfg.iters else jnp.zeros((), jnp.int32)
    if eval_final or cfg.best_iterate:
        k_final = _fold_in(k_loop, cfg.iters)
        _, (row_sum, weight, dropped, loss_after) = objective(delta, k_final)
        if cfg.best_iterate and cfg.iters:
            delta, best_sum = _keep_better(best, delta, row_sum)
            best_sum = jnp.where(jnp.isfinite(best_sum), best_sum, 0.0)
            loss_after = group_losses(best_sum, weight)[1]
    loss_before = trace[0] if cfg.iters else loss_after
    delta = jax.lax.stop_gradient(delta)
    diagnostics = dict(
        loss_before=loss_before,
        loss_after=loss_after,
        loss_trace=trace,
        eps_abs=eps_abs,
        lr_abs=lr_abs,
        targets_dropped=jnp.asarray(dropped, jnp.int32),
        **delta_stats(delta, m_in_BxL, eps_abs),
    )
    return delta, diagnostics


def _fold_in(key: jax.Array, i) -> jax.Array:
    """``fold_in`` for one key or per-row keys."""
    if key.ndim == 0:
        return jax.random.fold_in(key, i)
    return jax.vmap(lambda k: jax.random.fold_in(k, i))(key)


def _keep_better(best, delta_BxLxD, row_sum_B):
    """Per row, keeps the iterate with the lower summed target CE."""
    best_delta, best_sum = best
    better_B = row_sum_B < best_sum
    return (
        jnp.where(better_B[:, None, None], delta_BxLxD, best_delta),
        jnp.where(better_B, row_sum_B, best_sum),
    )


def delta_sums(delta_BxLxD: jax.Array, m_in_BxL: jax.Array, eps_abs) -> dict[str, jax.Array]:
    """Token sums behind :func:`delta_stats` (so that sums over micro-batches and devices give
    the same token-weighted statistics): ``norm_sum`` = Σ_t ‖δ_t‖, ``at_boundary`` = #{t :
    ‖δ_t‖ >= (1 - BOUNDARY_RTOL) · eps_abs} (0 if eps_abs = 0), ``count`` = number of attacked
    tokens t (``m_in``), and ``norm_max`` = max_t ‖δ_t‖ (0 without attacked tokens)."""
    norm_BxL = jnp.linalg.norm(delta_BxLxD, axis=-1)
    w = m_in_BxL.astype(jnp.float32)
    at_boundary = (norm_BxL >= (1.0 - BOUNDARY_RTOL) * eps_abs) & (eps_abs > 0)
    return dict(
        norm_sum=jnp.sum(norm_BxL * w),
        at_boundary=jnp.sum(at_boundary * w),
        count=jnp.sum(w),
        norm_max=jnp.max(norm_BxL * w),
    )


def delta_stats(delta_BxLxD: jax.Array, m_in_BxL: jax.Array, eps_abs) -> dict[str, jax.Array]:
    """Per-token ‖δ‖ statistics over the attacked tokens ``m_in`` of ALL rows (token-weighted:
    a row with more prompt tokens weighs more): ``delta_norm_mean`` = Σ_t ‖δ_t‖ / N,
    ``delta_norm_max`` = max_t ‖δ_t‖, ``frac_at_boundary`` = the fraction of the N tokens on the
    ball's boundary (see :func:`delta_sums`); 0 when N = 0."""
    s = delta_sums(delta_BxLxD, m_in_BxL, eps_abs)
    count = jnp.maximum(s["count"], 1.0)
    return dict(
        delta_norm_mean=s["norm_sum"] / count,
        delta_norm_max=s["norm_max"],
        frac_at_boundary=s["at_boundary"] / count,
    )


def continuous_attack_model(
    model,
    rows: TokenRows,
    *,
    cfg: ContinuousAttackConfig,
    key: jax.Array | None = None,
    eps_abs: float | None = None,
    row_valid_B=None,
) -> tuple[jax.Array, dict[str, Any]]:
    """Convenience for the attack CLI: splits an NNX model, derives eps_abs, runs jitted.

    ``rows``: a ``TokenRows`` of (numpy or jax) arrays."""
    graphdef, lora, frozen = lora_lib.split(model)
    e_bar = mean_embedding_norm(model.embedding_matrix)
    eps = cfg.eps * e_bar if eps_abs is None else jnp.asarray(eps_abs, jnp.float32)
    key = jax.random.key(0) if key is None else key
    valid = None if row_valid_B is None else jnp.asarray(row_valid_B, bool)

    @jax.jit
    def run(lora, frozen, rows, key, eps, e_bar, valid):
        return continuous_attack(
            graphdef,
            lora,
            frozen,
            rows,
            key,
            cfg=cfg,
            eps_abs=eps,
            row_valid_B=valid,
            emb_norm=e_bar,
        )

    rows = TokenRows(*(None if x is None else jnp.asarray(x) for x in rows))
    return run(lora, frozen, rows, key, eps, e_bar, valid)
