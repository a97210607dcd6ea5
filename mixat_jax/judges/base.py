"""Common judge types: the `Judgement` record and the `Judge` protocol.

A judge maps (behaviour, completion) pairs to a label as in HarmBench's `evaluate_completions.py`
(1 = harmful / behaviour exhibited, 0 = safe, -1 = unparsable judge output, which ALO-ASR counts
as safe but reports; spec mixat.md §8.1 and §11.21). Every judgement records the judge's name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from mixat_jax.behaviors import Behavior

HARMFUL, SAFE, UNPARSABLE = 1, 0, -1


@dataclass(frozen=True)
class Judgement:
    """One judge decision. `raw` is the judge's raw output (model text or matched rule);
    `meta` holds judge-specific details (flags such as `empty`, scores, probabilities)."""

    label: int
    raw: str
    judge: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.label not in (HARMFUL, SAFE, UNPARSABLE):
            raise ValueError(f"Judgement label must be 1, 0 or -1, got {self.label!r}")


@runtime_checkable
class Judge(Protocol):
    name: str

    def judge(
        self, behaviors: Sequence[Behavior], completions: Sequence[str]
    ) -> list[Judgement]: ...


def check_pairs(behaviors: Sequence[Any], completions: Sequence[Any], judge: str) -> None:
    """Validate judge inputs: equal lengths and string completions."""
    if len(behaviors) != len(completions):
        raise ValueError(
            f"{judge}: got {len(behaviors)} behaviours but {len(completions)} completions; "
            "pass one behaviour per completion"
        )
    for i, c in enumerate(completions):
        if not isinstance(c, str):
            raise ValueError(
                f"{judge}: completion {i} is {type(c).__name__}, not str; decode completions first"
            )
