"""Progress lines (`[evaluate] <stage> ...: k/n | elapsed | ETA`) and the simulated-interrupt
test hook (`MIXAT_EVAL_INTERRUPT_AFTER=stage:k`) of the evaluation stages (spec mixat.md §8.1:
a long run shows where it is and resumes after a kill).
"""

from __future__ import annotations

import time
from typing import TextIO

from mixat_jax.training.progress import format_duration

ENV_INTERRUPT = "MIXAT_EVAL_INTERRUPT_AFTER"


class SimulatedInterrupt(RuntimeError):
    """Raised by the test hook (`MIXAT_EVAL_INTERRUPT_AFTER=stage:k`) after k finished units."""


class Progress:
    """`[evaluate] <stage> <attack>: behaviour k/n (p%) | elapsed | ETA` lines on `stream`."""

    def __init__(
        self, stage: str, what: str, unit: str, total: int, stream: TextIO, done0: int = 0
    ) -> None:
        self.stage, self.what, self.unit, self.total, self.stream = stage, what, unit, total, stream
        self.done0 = done0  # cached units: excluded from the rate
        self.t0 = time.monotonic()

    def update(self, done: int) -> None:
        elapsed = time.monotonic() - self.t0
        new = done - self.done0
        eta = elapsed / new * (self.total - done) if new > 0 else float("nan")
        pct = 100.0 * done / self.total if self.total else 100.0
        print(
            f"[evaluate] {self.stage} {self.what}: {self.unit} {done}/{self.total} ({pct:.0f}%) | "
            f"elapsed {format_duration(elapsed)} | ETA {format_duration(eta)}",
            file=self.stream,
            flush=True,
        )


def parse_interrupt(spec: str | None) -> tuple[str, int] | None:
    """`"<stage>:<k>"` → (stage, k) (stage defaults to `completions`); None/'' → None."""
    if not spec:
        return None
    stage, _, k = spec.rpartition(":")
    try:
        return (stage or "completions", int(k))
    except ValueError:
        raise ValueError(f"{ENV_INTERRUPT}={spec!r}: use '<stage>:<k>'") from None


class InterruptHook:
    """Counts finished units per stage; raises `SimulatedInterrupt` once the configured stage
    (`parse_interrupt`) has finished k units. No spec: never raises."""

    def __init__(self, spec: str | None) -> None:
        self.at = parse_interrupt(spec)
        self.ticks: dict[str, int] = {}

    def tick(self, stage: str, n: int) -> None:
        self.ticks[stage] = self.ticks.get(stage, 0) + n
        if self.at and self.at[0] == stage and self.ticks[stage] >= self.at[1]:
            raise SimulatedInterrupt(f"simulated interrupt after {self.ticks[stage]} {stage}")
