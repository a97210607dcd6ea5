"""The run's micro-batch stream: rows -> mixture -> seeded epochs -> composed micro-batches.

MixAT spec §2.3, §3: the adversarial/utility mixture is fixed once (``data.interleave``, seed
42), every epoch is a seeded permutation of it (``data.epoch_permutation(n, epoch, seed)``) split
into static-layout micro-batches (``batches.compose_epoch``). The stream is indexed by the GLOBAL
micro-batch index ``m`` (= optimizer step · grad_accum + g) and continues into further epochs
past the configured ones, so ``m`` alone — saved as the data position — determines every row a
resumed run sees (DESIGN.md rule 6).

:func:`load_rows` reads the configured sources (HarmBench files or dataset ids, UltraChat or a
chat file, or the synthetic world) — every host reads the same small tables; the step's global
arrays are built from each process's slot slice (``loop.global_batch``).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from mixat_jax.training import data as data_lib
from mixat_jax.training.batches import BatchLayout, ComposedMicroBatch, compose_epoch
from mixat_jax.training.data import AdvRow, Row, UtilityRow
from mixat_jax.training.run_config import DataSpec
from mixat_jax.training.synthetic import safety_world


def load_rows(spec: DataSpec) -> tuple[list[AdvRow], list[UtilityRow]]:
    """(adversarial rows, utility rows) of the configured sources; one-line ValueError if bad."""
    if spec.source == "synthetic":
        world = safety_world(spec.synthetic_seed)
        return list(world["train_adv"]), list(world["train_util"])
    adv = data_lib.load_adv_rows(
        spec.behaviors,
        spec.targets,
        spec.safe_responses or None,
        refusal=spec.refusal,
        split=spec.split,
    )
    util = data_lib.load_utility_rows(
        spec.utility,
        split=spec.utility_split,
        max_first_user_chars=spec.max_first_user_chars,
        limit=spec.utility_limit,
    )
    if not util:
        raise ValueError(f"no utility rows in {spec.utility!r} pass the filter; check the source")
    return adv, util


class EpochStream:
    """Composed micro-batch ``m`` of the endless sequence of seeded epochs of ``mixture``."""

    def __init__(self, mixture: Sequence[Row], layout: BatchLayout, seed: int):
        if not mixture:
            raise ValueError("the training mixture is empty; check the data sources")
        self.mixture, self.layout, self.seed = list(mixture), layout, seed
        self._starts: list[int] = [0]  # global index of the first micro-batch of each epoch
        self._cached: tuple[int, list[ComposedMicroBatch]] | None = None

    def plan(self, epoch: int) -> list[ComposedMicroBatch]:
        """The micro-batches of ``epoch`` (cached for the current epoch)."""
        if self._cached is None or self._cached[0] != epoch:
            rows = data_lib.shuffled_epoch(self.mixture, epoch, self.seed)
            self._cached = (epoch, compose_epoch(rows, self.layout))
        return self._cached[1]

    def _extend_to(self, epoch: int) -> None:
        while len(self._starts) <= epoch + 1:
            e = len(self._starts) - 1
            self._starts.append(self._starts[-1] + len(self.plan(e)))

    def micro_batches_in(self, epochs: int) -> int:
        """Number of micro-batches in the first ``epochs`` epochs."""
        self._extend_to(epochs - 1)
        return self._starts[epochs]

    def locate(self, m: int) -> tuple[int, int]:
        """(epoch, index in epoch) of global micro-batch ``m``."""
        if m < 0:
            raise ValueError(f"micro-batch index must be >= 0; got {m}")
        while self._starts[-1] <= m:
            self._extend_to(len(self._starts) - 1)
        epoch = bisect.bisect_right(self._starts, m) - 1
        return epoch, m - self._starts[epoch]

    def __getitem__(self, m: int) -> ComposedMicroBatch:
        epoch, i = self.locate(m)
        return self.plan(epoch)[i]


def total_steps(stream: EpochStream, epochs: int, grad_accum: int) -> int:
    """Optimizer steps covering ``epochs`` epochs (the last step may reach into the next one)."""
    return max(1, math.ceil(stream.micro_batches_in(epochs) / grad_accum))
