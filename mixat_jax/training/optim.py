"""Optimizer of the LoRA parameters (MixAT spec §3.1, §11.14, §12 "Jit boundaries").

``chain(clip_by_global_norm(0.3), adamw(cosine(2e-4), b1 .9, b2 .999, eps 1e-8, wd 1e-3))``:
the HF Trainer's AdamW (decoupled weight decay on every LoRA matrix; ``paged_adamw_32bit`` =
fp32 moments) with ``max_grad_norm=0.3`` and the ``get_cosine_schedule_with_warmup`` schedule.

Warm-up (§11.14): the reference *intends* ``warmup_ratio=0.03`` but the field never reaches the
Trainer, so the effective warm-up is 0. Default here: ``warmup_ratio=0.0`` (reproduce what ran);
set 0.03 for the intended schedule. The learning rate is injected as a hyper-parameter so the
step can log the value it used (``optax.tree_utils.tree_get(opt_state, "learning_rate")``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Reference values (spec App. A)."""

    learning_rate: float = 2e-4
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-3
    max_grad_norm: float = 0.3
    warmup_ratio: float = 0.0
    schedule: str = "cosine"  # "cosine" (HF cosine with linear warm-up) | "constant"

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"optimizer schedule {self.schedule!r} unknown; use cosine|constant")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1); got {self.warmup_ratio}")
        if self.learning_rate < 0 or self.max_grad_norm <= 0:
            raise ValueError(
                f"need learning_rate >= 0 and max_grad_norm > 0; got "
                f"{self.learning_rate}, {self.max_grad_norm}"
            )


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    """HF ``get_warmup_steps``: ceil(warmup_ratio · total)."""
    return int(math.ceil(cfg.warmup_ratio * total_steps))


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """HF cosine with warm-up, evaluated at the 0-based optimizer step (lr(0) = peak if no warm-up).

    ``lr(t) = peak · t / w`` for ``t < w``; then ``peak · ½(1 + cos(π (t - w) / max(1, T - w)))``,
    floored at 0.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1; got {total_steps}")
    peak = cfg.learning_rate
    if cfg.schedule == "constant":
        return optax.constant_schedule(peak)
    w = warmup_steps(cfg, total_steps)
    decay = max(1, total_steps - w)

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        warm = peak * t / max(1, w)
        progress = (t - w) / decay
        cos = peak * jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
        return jnp.where(t < w, warm, cos)

    return schedule


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """Clip (global norm) then AdamW with the injected scheduled learning rate."""
    adamw = optax.inject_hyperparams(optax.adamw)(
        learning_rate=lr_schedule(cfg, total_steps),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)


def injected_learning_rate(opt_state) -> jax.Array:
    """The learning rate ``inject_hyperparams`` recorded for the last update (NaN if the
    optimizer injects none, e.g. plain ``optax.sgd``)."""
    found = [
        x.hyperparams["learning_rate"]
        for x in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "hyperparams"))
        if hasattr(x, "hyperparams") and "learning_rate" in x.hyperparams
    ]
    return jnp.asarray(found[0] if found else jnp.nan, jnp.float32)
