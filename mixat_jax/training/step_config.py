"""Static configuration of the training step (MixAT spec §3.1, §4, §5, §6.1; DAT spec §2.3).

Frozen, hashable dataclasses: ``steps.train_step(..., cfg=StepConfig)`` treats them as static.
Field names follow the reference hyper-parameters (``away_weight``, ``toward_cutoff``, ...).

Variants (the continuous attack is what distinguishes them inside the step; discrete rewrites
happen on the host before the batch is built):

* ``"mixat"`` / ``"cat"``: continuous attack on the adversarial rows (MixAT = CAT on top of the
  discrete rewrites already in the batch; CAT = C-AdvUL of Xhonneux et al., spec §6.1 "embedding").
* ``"dat"``: the ``"cat"`` step exactly (DAT spec §2.3: CAT on the enlarged adversarial set);
  only the rows differ (Stage A's inpainted prompts, ``run_config.DatSpec``).
* ``"discrete_only"`` / ``"sft"``: δ ≡ 0 — the attack is not traced at all (not run-and-zeroed);
  ``"discrete_only"`` is the "mixed, not stacked" ablation (PAP/GCG rewrites, no δ);
  ``"sft"`` trains the same C-AdvUL loss on clean prompts (pair it with no discrete rewrites).
"""

from __future__ import annotations

import dataclasses

from mixat_jax.attacks.continuous import ContinuousAttackConfig
from mixat_jax.training import losses

VARIANTS = ("mixat", "cat", "dat", "discrete_only", "sft")
ATTACKED_VARIANTS = ("mixat", "cat", "dat")
ATTACK_BATCHING = ("step", "microbatch")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """C-AdvUL weights and soft cutoffs (spec §3.1, §4)."""

    away_weight: float = 0.5
    toward_weight: float = 0.5
    utility_weight: float = 1.0
    away_cutoff: float = losses.AWAY_CUTOFF
    toward_cutoff: float = losses.TOWARD_CUTOFF
    cutoff_slope: float = losses.CUTOFF_SLOPE
    away_loss_type: str = "negative_cross_entropy"

    def __post_init__(self) -> None:
        if self.away_loss_type not in losses.AWAY_LOSS_TYPES:
            raise ValueError(
                f"away_loss_type {self.away_loss_type!r} unknown; use one of "
                f"{losses.AWAY_LOSS_TYPES}"
            )


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Everything static about ``train_step`` / ``eval_loss_step``.

    ``train_dropout``: LoRA dropout in the training passes (reference: training mode, True).
    ``adv_max_targets``: logits only at the first N target tokens of away/toward rows (memory;
    None = all positions, exact). ``pmap_axis_name``: set when the step runs under ``jax.pmap``
    (gradients and metrics are averaged over that axis). ``attack_batching``: ``"step"``
    (default) attacks the adversarial rows of all G micro-batches in one batched call before the
    accumulation scan — the parameters do not change within an optimizer step, and per-row keys
    give each row the same δ as ``"microbatch"`` (one micro-batch at a time, the reference's
    order; less activation memory). Each micro-batch keeps its own token-mean attack objective.
    """

    variant: str = "mixat"
    attack: ContinuousAttackConfig = ContinuousAttackConfig()
    loss: LossConfig = LossConfig()
    train_dropout: bool = True
    adv_max_targets: int | None = None
    pmap_axis_name: str | None = None
    attack_batching: str = "step"

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"step variant {self.variant!r} unknown; use one of {VARIANTS}")
        if self.attack_batching not in ATTACK_BATCHING:
            raise ValueError(
                f"attack_batching {self.attack_batching!r} unknown; use one of {ATTACK_BATCHING}"
            )
        if self.adv_max_targets is not None and self.adv_max_targets < 1:
            raise ValueError(f"adv_max_targets must be >= 1 or None; got {self.adv_max_targets}")

    @property
    def runs_attack(self) -> bool:
        """True iff the continuous attack is traced (attacked variant and iters > 0)."""
        return self.variant in ATTACKED_VARIANTS and self.attack.iters > 0

    def replace(self, **kw) -> StepConfig:
        return dataclasses.replace(self, **kw)
