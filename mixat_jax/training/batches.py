"""Static-shape micro-batches (MixAT spec §2.5, §11.7, §12 "Shapes").

Every micro-batch has the same array shapes so nothing recompiles during a run:

* ``adv_slots`` (A) adversarial slots. Slot i holds an *away* row (prompt + harmful target) and a
  *toward* row (the same prompt + refusal), both of length ``max_len_adv`` (La, e.g. 384 to fit
  PAP rewrites), and ``adv_valid_A[i]``.
* ``util_slots`` (U) utility slots of length ``max_len_util`` (Lu, 256) and ``util_valid_U``.

Rows are RIGHT-padded (``pad_id``); positions are therefore ``0..n-1`` for real tokens. Away and
toward rows are rendered from the same instruction, so their prompt tokens are identical and at
the same positions: a perturbation δ computed on the away prompt applies position by position to
the toward row (§12 "δ transfer"); :func:`pack_microbatch` checks this.

Device arrays (numpy; ids int32, masks/valid bool)::

    away_ids_AxL  away_mask_AxL  away_prompt_mask_AxL  away_target_mask_AxL
    toward_ids_AxL toward_mask_AxL toward_prompt_mask_AxL toward_target_mask_AxL   adv_valid_A
    util_ids_UxM  util_mask_UxM  util_target_mask_UxM  util_valid_U

``*_mask`` = attended (real) tokens; ``*_prompt_mask`` = the attack's ``M_in`` (whole rendered
prompt incl. BOS/system/template/assistant header); ``*_target_mask[b, t]`` = token ``ids[b, t]``
is a loss target (predicted by the logit at ``t - 1``). :func:`token_rows` reads one side
(away / toward / util) of a batch as an ``objectives.TokenRows`` record. Too long responses are truncated on the
right; a prompt that leaves no room for a target token is an error (or, with overflow "skip", an
invalid slot recorded in the metadata) — never a silent overflow.

Composition (§11.7, issue #17): "fixed" = exactly A adversarial + U utility rows per micro-batch
(a stated deviation: every micro-batch carries the adversarial terms, which gives them ~1.5x the
weight they have in the reference, where 35 % of micro-batches have no adversarial row); the
source that runs out first in an epoch is dealt again from the start of its epoch order, so no
slot is ever left empty. "reference" = the shuffled mixed stream chunked by ``micro_batch_size``
exactly as the reference trainer does: each micro-batch holds exactly its chunk's rows (a
varying number of adversarial rows, nothing carried over); the packing layout is sized to the
largest chunk of the run (:func:`packing_layout`).

Data parallelism (issue #16): ``BatchLayout`` is the composition of ONE batch shard; with
``shards`` = data × fsdp shards, a global micro-batch holds ``shards`` compositions (slot
counts × shards), so each shard gets a full micro-batch and the slot axis always divides.
``shards=1`` is the single-device layout unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from mixat_jax.objectives import TokenRows
from mixat_jax.training.data import AdvRow, Row, UtilityRow

COMPOSITIONS = ("fixed", "reference")
OVERFLOW_POLICIES = ("error", "skip")

ADV_KEYS = (
    "away_ids_AxL",
    "away_mask_AxL",
    "away_prompt_mask_AxL",
    "away_target_mask_AxL",
    "toward_ids_AxL",
    "toward_mask_AxL",
    "toward_prompt_mask_AxL",
    "toward_target_mask_AxL",
)
UTIL_KEYS = ("util_ids_UxM", "util_mask_UxM", "util_target_mask_UxM")
BATCH_KEYS = (*ADV_KEYS, "adv_valid_A", *UTIL_KEYS, "util_valid_U")
SIDES = {"away": "AxL", "toward": "AxL", "util": "UxM"}  # row kind -> shape suffix of its keys

Encoded = tuple[np.ndarray, np.ndarray, np.ndarray]  # ids, prompt_mask, response_mask
RenderFn = Callable[[str, str], Any]  # (instruction, response) -> Rendered | Encoded
RenderConversationFn = Callable[[list[dict[str, str]]], Any]  # messages -> Rendered | Encoded


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """Fixed micro-batch layout.

    ``micro_batch_size`` is the number of stream rows per micro-batch for the "reference"
    composition (default ``adv_slots + util_slots``); "fixed" ignores it.
    """

    adv_slots: int = 1
    util_slots: int = 7
    max_len_adv: int = 384
    max_len_util: int = 256
    pad_id: int = 0
    composition: str = "fixed"
    micro_batch_size: int | None = None
    adv_overflow: str = "error"
    util_overflow: str = "skip"

    def __post_init__(self) -> None:
        if self.adv_slots < 1 or self.util_slots < 0:
            raise ValueError(
                f"need adv_slots >= 1 and util_slots >= 0; got {self.adv_slots}/{self.util_slots}"
            )
        if self.max_len_adv < 2 or self.max_len_util < 2:
            raise ValueError(
                f"max lengths must be >= 2; got {self.max_len_adv}/{self.max_len_util}"
            )
        if self.composition not in COMPOSITIONS:
            raise ValueError(f"composition {self.composition!r} unknown; use one of {COMPOSITIONS}")
        for name in ("adv_overflow", "util_overflow"):
            if getattr(self, name) not in OVERFLOW_POLICIES:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} unknown; use one of {OVERFLOW_POLICIES}"
                )
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1; got {self.micro_batch_size}")

    @property
    def rows_per_microbatch(self) -> int:
        return self.micro_batch_size or (self.adv_slots + self.util_slots)


class AdvItem(NamedTuple):
    """An adversarial row with the instruction actually used (behaviour, PAP or GCG rewrite)."""

    row: AdvRow
    instruction: str


@dataclasses.dataclass
class MicroBatch:
    """Device arrays (:data:`BATCH_KEYS`) and host-only metadata (never sent to the device)."""

    arrays: dict[str, np.ndarray]
    behavior_ids: list[str | None]  # per adversarial slot, None for empty slots
    instructions: list[str | None]  # per adversarial slot
    skipped: list[str]  # "adv:<behavior_id>" / "util:<slot>" rows dropped by overflow "skip"


@dataclasses.dataclass
class ComposedMicroBatch:
    """Which rows go into one micro-batch (before any discrete rewrite and tokenisation)."""

    adv_rows: list[AdvRow]
    util_rows: list[UtilityRow]


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------


def batch_shapes(layout: BatchLayout) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{key: (shape, dtype)}`` of one micro-batch (for AOT compilation / abstract inputs)."""
    a, u, la, lu = layout.adv_slots, layout.util_slots, layout.max_len_adv, layout.max_len_util
    shapes: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    for k in ADV_KEYS:
        shapes[k] = ((a, la), np.dtype(np.int32 if "_ids_" in k else bool))
    shapes["adv_valid_A"] = ((a,), np.dtype(bool))
    for k in UTIL_KEYS:
        shapes[k] = ((u, lu), np.dtype(np.int32 if "_ids_" in k else bool))
    shapes["util_valid_U"] = ((u,), np.dtype(bool))
    return shapes


def empty_batch(layout: BatchLayout) -> dict[str, np.ndarray]:
    """An all-padding micro-batch (every slot invalid)."""
    out = {}
    for k, (shape, dtype) in batch_shapes(layout).items():
        fill = layout.pad_id if "_ids_" in k else 0
        out[k] = np.full(shape, fill, dtype=dtype)
    return out


def token_rows(batch: Mapping[str, Any], side: str) -> TokenRows:
    """The ``side`` rows ("away", "toward" or "util") of a packed batch as a ``TokenRows``
    (arrays as stored: ``[A, L]``, or ``[G, A, L]`` for stacked micro-batches). Utility rows have
    no prompt mask (``prompt_BxL`` is None): nothing attacks them."""
    if side not in SIDES:
        raise ValueError(f"batch side {side!r} unknown; use one of {tuple(SIDES)}")
    suffix = SIDES[side]
    return TokenRows(
        ids_BxL=batch[f"{side}_ids_{suffix}"],
        mask_BxL=batch[f"{side}_mask_{suffix}"],
        prompt_BxL=batch.get(f"{side}_prompt_mask_{suffix}"),
        target_BxL=batch[f"{side}_target_mask_{suffix}"],
    )


# --------------------------------------------------------------------------------------------
# Rendering helpers
# --------------------------------------------------------------------------------------------


def _encoded(rendered: Any) -> Encoded:
    """Accept a Rendered-like object (ids, prompt_mask, response_mask) or a 3-tuple."""
    if all(hasattr(rendered, f) for f in ("ids", "prompt_mask", "response_mask")):
        parts = (rendered.ids, rendered.prompt_mask, rendered.response_mask)
    elif isinstance(rendered, tuple | list) and len(rendered) >= 3:
        parts = tuple(rendered[:3])
    else:
        raise ValueError(
            "render functions must return (ids, prompt_mask, response_mask) or an object with "
            f"those fields; got {type(rendered).__name__}"
        )
    ids, pm, rm = (np.asarray(x).reshape(-1) for x in parts)
    if not len(ids) == len(pm) == len(rm):
        raise ValueError(
            f"rendered ids/prompt_mask/response_mask lengths differ ({len(ids)}/{len(pm)}/"
            f"{len(rm)}); fix the renderer"
        )
    return ids.astype(np.int32), pm.astype(bool), rm.astype(bool)


def _prompt_len(pm: np.ndarray, rm: np.ndarray) -> int:
    """Tokens before the first response token (the whole prompt for single-turn rows)."""
    hits = np.nonzero(rm)[0]
    return int(hits[0]) if len(hits) else len(rm)


def _write_row(
    arrays: dict[str, np.ndarray], prefix: str, suffix: str, slot: int, enc: Encoded
) -> None:
    ids, pm, rm = enc
    n = min(len(ids), arrays[f"{prefix}_ids_{suffix}"].shape[1])
    arrays[f"{prefix}_ids_{suffix}"][slot, :n] = ids[:n]
    arrays[f"{prefix}_mask_{suffix}"][slot, :n] = True
    if f"{prefix}_prompt_mask_{suffix}" in arrays:
        arrays[f"{prefix}_prompt_mask_{suffix}"][slot, :n] = pm[:n]
    arrays[f"{prefix}_target_mask_{suffix}"][slot, :n] = rm[:n]


def _fits(enc: Encoded, max_len: int) -> bool:
    """At least one target token survives right truncation to ``max_len``."""
    _, pm, rm = enc
    return bool(rm[:max_len].any())


# --------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------


def pack_microbatch(
    adv_items: Sequence[AdvItem | tuple[AdvRow, str]],
    util_rows: Sequence[UtilityRow],
    layout: BatchLayout,
    render: RenderFn,
    render_conversation: RenderConversationFn | None = None,
) -> MicroBatch:
    """Tokenise and right-pad one micro-batch into the fixed layout.

    Args:
      adv_items: up to ``adv_slots`` (row, instruction) pairs; the instruction is the behaviour
        or its discrete rewrite.
      util_rows: up to ``util_slots`` utility conversations.
      render: ``(instruction, response) -> (ids, prompt_mask, response_mask)`` (e.g.
        ``ChatRenderer.example``).
      render_conversation: ``messages -> (ids, prompt_mask, response_mask)``; needed when
        ``util_rows`` is non-empty.
    """
    if len(adv_items) > layout.adv_slots:
        raise ValueError(
            f"{len(adv_items)} adversarial rows for {layout.adv_slots} slots; compose micro-"
            "batches with compose_epoch or raise adv_slots"
        )
    if len(util_rows) > layout.util_slots:
        raise ValueError(
            f"{len(util_rows)} utility rows for {layout.util_slots} slots; compose micro-batches "
            "with compose_epoch or raise util_slots"
        )
    if util_rows and render_conversation is None:
        raise ValueError("utility rows given without render_conversation; pass a renderer")
    arrays = empty_batch(layout)
    behavior_ids: list[str | None] = [None] * layout.adv_slots
    instructions: list[str | None] = [None] * layout.adv_slots
    skipped: list[str] = []
    la, lu = layout.max_len_adv, layout.max_len_util

    for slot, item in enumerate(adv_items):
        row, instruction = item
        away = _encoded(render(instruction, row.target))
        toward = _encoded(render(instruction, row.refusal))
        _check_aligned(away, toward, row.behavior_id)
        if not (_fits(away, la) and _fits(toward, la)):
            plen = _prompt_len(away[1], away[2])
            if layout.adv_overflow == "error":
                raise ValueError(
                    f"prompt of adversarial row {row.behavior_id!r} has {plen} tokens, leaving no "
                    f"room for a target within max_len_adv={la}; raise max_len_adv, reject the "
                    "rewrite, or use adv_overflow='skip'"
                )
            skipped.append(f"adv:{row.behavior_id}")
            continue
        _write_row(arrays, "away", "AxL", slot, away)
        _write_row(arrays, "toward", "AxL", slot, toward)
        arrays["adv_valid_A"][slot] = True
        behavior_ids[slot] = row.behavior_id
        instructions[slot] = instruction

    for slot, urow in enumerate(util_rows):
        enc = _encoded(render_conversation(urow.messages))
        if not _fits(enc, lu):
            if layout.util_overflow == "error":
                raise ValueError(
                    f"utility row in slot {slot} has its first response beyond max_len_util={lu}; "
                    "raise max_len_util, filter long prompts, or use util_overflow='skip'"
                )
            skipped.append(f"util:{slot}")
            continue
        _write_row(arrays, "util", "UxM", slot, enc)
        arrays["util_valid_U"][slot] = True

    return MicroBatch(arrays, behavior_ids, instructions, skipped)


def _check_aligned(away: Encoded, toward: Encoded, behavior_id: str) -> None:
    """Away and toward prompts must be the same tokens at the same positions (δ transfer)."""
    pa, pt = _prompt_len(away[1], away[2]), _prompt_len(toward[1], toward[2])
    same = (
        pa == pt
        and np.array_equal(away[0][:pa], toward[0][:pt])
        and np.array_equal(away[1][:pa], toward[1][:pt])
    )
    if not same:
        raise ValueError(
            f"away and toward prompts of {behavior_id!r} differ ({pa} vs {pt} tokens); the "
            "renderer must tokenise the prompt independently of the response"
        )


# --------------------------------------------------------------------------------------------
# Gradient accumulation and hosts
# --------------------------------------------------------------------------------------------


def stack_microbatches(batches: Sequence[MicroBatch | Mapping[str, np.ndarray]]) -> dict:
    """Stack ``G`` micro-batches into one dict with a leading ``[G, ...]`` axis (for lax.scan)."""
    if not batches:
        raise ValueError("stack_microbatches needs at least one micro-batch")
    dicts = [b.arrays if isinstance(b, MicroBatch) else b for b in batches]
    keys = set(dicts[0])
    for d in dicts[1:]:
        if set(d) != keys:
            raise ValueError("micro-batches have different keys; pack them with the same layout")
    return {k: np.stack([d[k] for d in dicts], axis=0) for k in dicts[0]}


def host_local_batch(
    batch: Mapping[str, np.ndarray], process_index: int, process_count: int, *, axis: int = 0
) -> dict[str, np.ndarray]:
    """This process's slice of every array along the slot axis (``axis``; 1 for stacked [G,..]).

    Adversarial arrays are split along A, utility arrays along U, so each host keeps the same
    composition; both slot counts must be divisible by ``process_count``.
    """
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(
            f"need 0 <= process_index < process_count; got {process_index}/{process_count}"
        )
    out = {}
    for k, v in batch.items():
        n = v.shape[axis]
        if n % process_count:
            raise ValueError(
                f"{k} has {n} slots, not divisible by {process_count} processes; choose "
                "adv_slots and util_slots divisible by the process count"
            )
        per = n // process_count
        out[k] = np.take(v, np.arange(process_index * per, (process_index + 1) * per), axis=axis)
    return out


# --------------------------------------------------------------------------------------------
# Composition policies
# --------------------------------------------------------------------------------------------


def compose_epoch(
    stream: Sequence[Row], layout: BatchLayout, shards: int = 1
) -> list[ComposedMicroBatch]:
    """Split one (already shuffled) epoch stream into global micro-batches of ``shards`` shards.

    "fixed": the stream's adversarial rows and utility rows (each in stream order) are dealt
    ``adv_slots × shards`` and ``util_slots × shards`` per micro-batch (= ``shards`` consecutive
    one-shard micro-batches); the epoch has ``max(ceil(n_adv / A'), ceil(n_util / U'))``
    micro-batches and the source that runs out first is dealt again from its first row of the
    epoch, so every slot is filled (the longer source is used exactly once per epoch).

    "reference": the stream is chunked by ``micro_batch_size`` rows as in the reference trainer;
    ``shards`` consecutive chunks form one micro-batch, which holds exactly their rows (none
    carried over; the last micro-batch of an epoch may hold fewer chunks).
    """
    if shards < 1:
        raise ValueError(f"shards must be >= 1; got {shards}")
    if layout.composition == "fixed":
        return _compose_fixed(stream, layout.adv_slots * shards, layout.util_slots * shards)
    return _compose_reference(stream, layout.rows_per_microbatch * shards, layout.util_slots)


def _split(rows: Sequence[Row]) -> tuple[list[AdvRow], list[UtilityRow]]:
    adv = [r for r in rows if isinstance(r, AdvRow)]
    util = [r for r in rows if isinstance(r, UtilityRow)]
    if len(adv) + len(util) != len(rows):
        raise ValueError("stream rows must be AdvRow or UtilityRow; got another type")
    return adv, util


def _deal(rows: Sequence[Row], per: int, i: int) -> list:
    """Rows ``[i*per, (i+1)*per)`` of ``rows`` read cyclically (empty if ``rows`` is)."""
    if not rows:
        return []
    return [rows[j % len(rows)] for j in range(i * per, (i + 1) * per)]


def _compose_fixed(stream: Sequence[Row], a: int, u: int) -> list[ComposedMicroBatch]:
    adv, util = _split(stream)
    if util and u == 0:
        raise ValueError("the stream has utility rows but util_slots=0; raise util_slots")
    n = max(math.ceil(len(adv) / a), math.ceil(len(util) / u) if u else 0)
    return [ComposedMicroBatch(_deal(adv, a, i), _deal(util, u, i)) for i in range(n)]


def _compose_reference(stream: Sequence[Row], size: int, u: int) -> list[ComposedMicroBatch]:
    out: list[ComposedMicroBatch] = []
    for start in range(0, len(stream), size):
        adv, util = _split(stream[start : start + size])
        if util and u == 0:
            raise ValueError("the stream has utility rows but util_slots=0; raise util_slots")
        out.append(ComposedMicroBatch(adv, util))
    return out


def packing_layout(
    layout: BatchLayout, plan: Sequence[ComposedMicroBatch], shards: int = 1
) -> BatchLayout:
    """The layout global micro-batches are packed into: slot counts × ``shards`` ("fixed"); for
    "reference" at least that and large enough for every micro-batch of ``plan`` (the run's),
    rounded up to a multiple of ``shards`` so the slot axis always splits over the shards."""
    a, u = layout.adv_slots * shards, layout.util_slots * shards
    if layout.composition == "reference" and plan:
        a = max(a, max(len(mb.adv_rows) for mb in plan))
        u = max(u, max(len(mb.util_rows) for mb in plan))
        a, u = (shards * math.ceil(x / shards) for x in (a, u))
        layout = dataclasses.replace(layout, micro_batch_size=layout.rows_per_microbatch)
    return dataclasses.replace(layout, adv_slots=a, util_slots=u)


def count_adv_rows(plan: Sequence[ComposedMicroBatch]) -> int:
    """Number of adversarial rows in a composed epoch (length of a per-row schedule)."""
    return sum(len(mb.adv_rows) for mb in plan)
