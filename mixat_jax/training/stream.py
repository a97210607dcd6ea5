"""The run's micro-batch stream: rows -> mixture -> seeded epochs -> composed micro-batches.

MixAT spec §2.3, §3: the adversarial/utility mixture is fixed once (``data.interleave``, seed
42), every epoch is a seeded permutation of it (``data.epoch_permutation(n, epoch, seed)``) split
into static-layout micro-batches (``batches.compose_epoch``). The stream is indexed by the GLOBAL
micro-batch index ``m`` (= optimizer step · grad_accum + g) and continues into further epochs
past the configured ones, so ``m`` alone — saved as the data position — determines every row a
resumed run sees (DESIGN.md rule 6). With ``shards`` batch shards (mesh data × fsdp, issue #16)
a micro-batch holds ``shards`` one-shard compositions (``batches.compose_epoch``) and is packed
into :meth:`EpochStream.packing_layout`; ``shards=1`` is the single-device stream unchanged.

:func:`load_rows` reads the configured sources (HarmBench files or dataset ids, UltraChat or a
chat file, or the synthetic world; for DAT, DAT spec §2.3, Stage A's selected prompts) — every
host reads the same small tables and builds the same full batch; ``loop.global_batch`` places
each device's rows from it.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence

from mixat_jax.training import data as data_lib
from mixat_jax.training.batches import (
    BatchLayout,
    ComposedMicroBatch,
    compose_epoch,
    packing_layout,
)
from mixat_jax.training.data import AdvRow, Row, UtilityRow
from mixat_jax.training.run_config import DataSpec, DatSpec
from mixat_jax.training.synthetic import safety_world


def adv_refusals(spec: DataSpec) -> dict[str, str]:
    """Original behaviour text -> refusal (HarmBench safe-response file / the synthetic world);
    DAT rows take the refusal of the behaviour their prompt was inpainted from."""
    if spec.source == "synthetic":
        return {r.behavior: r.refusal for r in safety_world(spec.synthetic_seed)["train_adv"]}
    if not spec.safe_responses:
        return {}
    return data_lib.read_refusals(spec.safe_responses, spec.split)


def original_adv_rows(spec: DataSpec) -> list[AdvRow]:
    """The configured adversarial rows: HarmBench behaviours x targets, or the synthetic world's."""
    if spec.source == "synthetic":
        return list(safety_world(spec.synthetic_seed)["train_adv"])
    return data_lib.load_adv_rows(
        spec.behaviors,
        spec.targets,
        spec.safe_responses or None,
        refusal=spec.refusal,
        split=spec.split,
    )


def utility_rows(spec: DataSpec) -> list[UtilityRow]:
    """The configured utility rows (UltraChat / a chat file, or the synthetic world's)."""
    if spec.source == "synthetic":
        return list(safety_world(spec.synthetic_seed)["train_util"])
    util = data_lib.load_utility_rows(
        spec.utility,
        split=spec.utility_split,
        max_first_user_chars=spec.max_first_user_chars,
        limit=spec.utility_limit,
    )
    if not util:
        raise ValueError(f"no utility rows in {spec.utility!r} pass the filter; check the source")
    return util


def load_rows(spec: DataSpec, dat: DatSpec | None = None) -> tuple[list[AdvRow], list[UtilityRow]]:
    """(adversarial rows, utility rows) of the configured sources; one-line ValueError if bad.

    With ``dat.selected`` (variant ``"dat"``, DAT spec §2.3) the adversarial rows are Stage A's
    selected prompts (:func:`data.load_dat_rows`, file order), followed by the configured rows
    when ``dat.include_original``; the utility rows are the configured ones either way.
    """
    if dat is None or not dat.selected:
        return original_adv_rows(spec), utility_rows(spec)
    adv = data_lib.dat_rows_from_records(
        data_lib.read_dat_records(dat.selected), adv_refusals(spec), refusal=spec.refusal
    )
    if dat.include_original:
        adv += original_adv_rows(spec)
    return adv, utility_rows(spec)


EpochAdvRows = Callable[[int], Sequence[AdvRow] | None]


class EpochStream:
    """Composed micro-batch ``m`` of the endless sequence of seeded epochs of ``mixture``.

    ``epoch_adv`` (optional; DAT's per-epoch re-selection, DAT spec §2.2 "Periodic refresh"):
    ``epoch_adv(e)`` returns the adversarial rows of epoch ``e`` (or None = the mixture's own);
    its j-th row takes the place of the mixture's j-th adversarial row. Only the rows change:
    the epoch's permutation and micro-batch plan are those of ``mixture`` (they depend on row
    kinds and counts alone), so step counts and data positions do not depend on it, and it is
    called only when a micro-batch of epoch ``e`` is first built.
    """

    def __init__(
        self,
        mixture: Sequence[Row],
        layout: BatchLayout,
        seed: int,
        epoch_adv: EpochAdvRows | None = None,
        shards: int = 1,
    ):
        if not mixture:
            raise ValueError("the training mixture is empty; check the data sources")
        if shards < 1:
            raise ValueError(f"batch shards must be >= 1; got {shards}")
        self.mixture, self.layout, self.seed = list(mixture), layout, seed
        self.shards = shards
        self.epoch_adv = epoch_adv
        self._adv_at = [i for i, r in enumerate(self.mixture) if isinstance(r, AdvRow)]
        self._starts: list[int] = [0]  # global index of the first micro-batch of each epoch
        self._cached: tuple[int, list[ComposedMicroBatch]] | None = None

    def set_epoch_adv(self, epoch_adv: EpochAdvRows | None) -> None:
        """Install (or remove) the per-epoch adversarial rows; drops the cached epoch."""
        self.epoch_adv, self._cached = epoch_adv, None

    def epoch_mixture(self, epoch: int) -> list[Row]:
        """The mixture of ``epoch`` (before its shuffle): ``mixture`` with ``epoch_adv(epoch)``."""
        rows = self.epoch_adv(epoch) if self.epoch_adv is not None else None
        if rows is None:
            return self.mixture
        if len(rows) < len(self._adv_at):
            raise ValueError(
                f"epoch {epoch} has {len(rows)} adversarial rows but the mixture holds "
                f"{len(self._adv_at)}; the per-epoch rows must keep the count"
            )
        out = list(self.mixture)
        for j, i in enumerate(self._adv_at):
            out[i] = rows[j]
        return out

    def plan(self, epoch: int) -> list[ComposedMicroBatch]:
        """The micro-batches of ``epoch`` (cached for the current epoch)."""
        if self._cached is None or self._cached[0] != epoch:
            rows = data_lib.shuffled_epoch(self.epoch_mixture(epoch), epoch, self.seed)
            self._cached = (epoch, compose_epoch(rows, self.layout, self.shards))
        return self._cached[1]

    def _epoch_length(self, epoch: int) -> int:
        return len(self._shape_plan(epoch))

    def _shape_plan(self, epoch: int) -> list[ComposedMicroBatch]:
        """The plan of ``epoch`` with the mixture's own rows (same row kinds and counts as the
        real plan; never calls ``epoch_adv``)."""
        if self.epoch_adv is None:
            return self.plan(epoch)
        rows = data_lib.shuffled_epoch(self.mixture, epoch, self.seed)
        return compose_epoch(rows, self.layout, self.shards)

    def packing_layout(self, micro_batches: int) -> BatchLayout:
        """The layout micro-batches ``0 .. micro_batches - 1`` are packed into
        (``batches.packing_layout`` over exactly those micro-batches)."""
        plan: list[ComposedMicroBatch] = []
        if self.layout.composition == "fixed":  # slot counts x shards, whatever the rows
            return packing_layout(self.layout, plan, self.shards)
        epoch = 0
        while len(plan) < micro_batches:
            plan += self._shape_plan(epoch)
            epoch += 1
        return packing_layout(self.layout, plan[:micro_batches], self.shards)

    def _extend_to(self, epoch: int) -> None:
        while len(self._starts) <= epoch + 1:
            e = len(self._starts) - 1
            self._starts.append(self._starts[-1] + self._epoch_length(e))

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
