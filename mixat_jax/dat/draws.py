"""The deterministic draw plan of Stage A (DAT spec §2.2 steps 1–3): which target each draw uses,
how draws are cut into work units, which process runs a unit, and each unit's sampler key.

* Draw j of behaviour b inpaints a prompt for target `targets_b[t_j]`, with the indices `t_j`
  drawn by `numpy.random.default_rng([seed, h(b)])` (h = a stable 32-bit hash of the behaviour
  id): a function of (seed, behaviour id) only, not of the order in which behaviours or units
  are processed.
* A work unit is `batch_size` consecutive draws of one behaviour (the last unit of a behaviour
  may hold fewer real draws; the sampler batch is filled with copies of its last row). The
  sampler's randomness of a row depends on its key, the batch shape and its position in the
  batch, all fixed by the unit: unit u of behaviour b uses the key
  `fold_in(fold_in(key(seed), h(b) mod 2^31), u)`. So the same seed gives the same prompts for
  any number of processes or devices, and for a resumed run.
* Units are assigned round-robin over processes by their global index in the plan
  (behaviour order, then unit index): unit i runs on process i mod process_count.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import jax
import numpy as np

from mixat_jax.behaviors import Behavior


@dataclasses.dataclass(frozen=True)
class WorkUnit:
    """Draws `first_draw .. first_draw + num_draws - 1` of behaviour `behavior_index`."""

    index: int  # global position in the plan
    behavior_index: int
    behavior_id: str
    unit: int  # index of the unit within its behaviour
    first_draw: int
    num_draws: int

    @property
    def key(self) -> tuple[str, int]:
        """Identity of a unit in the shard files (independent of the plan's order)."""
        return (self.behavior_id, self.unit)


def id_hash(behavior_id: str) -> int:
    """A stable (not PYTHONHASHSEED-salted) 32-bit hash of a behaviour id."""
    return int.from_bytes(hashlib.sha256(behavior_id.encode("utf-8")).digest()[:4], "little")


def target_indices(seed: int, behavior_id: str, num_targets: int, num_draws: int) -> np.ndarray:
    """Index of the target of every draw of a behaviour (uniform over its `num_targets`)."""
    if num_targets < 1:
        raise ValueError(f"behaviour {behavior_id!r} has no targets to draw from")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, id_hash(behavior_id)])
    return rng.integers(0, num_targets, size=num_draws)


def unit_key(seed: int, behavior_id: str, unit: int) -> jax.Array:
    """The sampler key of unit `unit` of a behaviour (see module doc)."""
    key = jax.random.fold_in(jax.random.key(seed), id_hash(behavior_id) % 2**31)
    return jax.random.fold_in(key, unit)


def plan_units(behaviors: Sequence[Behavior], num_samples: int, batch_size: int) -> list[WorkUnit]:
    """Every unit of the run in plan order (behaviour order, then unit index)."""
    units: list[WorkUnit] = []
    for b_idx, b in enumerate(behaviors):
        for u, first in enumerate(range(0, num_samples, batch_size)):
            n = min(batch_size, num_samples - first)
            units.append(WorkUnit(len(units), b_idx, b.id, u, first, n))
    return units


def assigned(units: Sequence[WorkUnit], process_index: int, process_count: int) -> list[WorkUnit]:
    """The units process `process_index` of `process_count` runs (round robin)."""
    return [u for u in units if u.index % process_count == process_index]
