"""Training records, loaders and the adversarial/utility mixture (MixAT spec §2.1–2.3; DAT §2.2).

* :class:`AdvRow` — one (behaviour, harmful target, refusal) triple (§2.1). The HarmBench
  adversarial-training split gives 100 behaviours × their target lists = 1,188 rows, in behaviour
  order then target order (the reference merges the behaviour CSV with the target JSON).
* :func:`load_dat_rows` — DAT Stage B (DAT spec §2.2 step 6): Stage A's ``selected.jsonl`` as
  adversarial rows whose instruction is the inpainted prompt.
* :class:`UtilityRow` — one chat conversation (§2.2), UltraChat ``train_sft`` filtered to rows
  whose first user message has fewer than 768 characters, or a local JSONL/JSON/parquet file.
* :func:`interleave` — ``datasets.interleave_datasets`` semantics (§2.3): source indices drawn
  i.i.d. from ``numpy.random.default_rng(seed).choice`` in blocks of 1,000, each source consumed
  in order, stop right after the first source is exhausted ("first_exhausted").
* :func:`epoch_permutation` — the per-epoch shuffle (seeded, §11.9 fix: explicit seed).
* :func:`host_shard` — this process's slice of a global micro-batch (multi-host data loading).

Sources are local paths, or Hugging Face dataset ids (``datasets`` is imported only then).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from mixat_jax.behaviors import is_local_table, read_jsonl, read_table

SAFE_RESPONSE = "Sorry, I can't do that."
ULTRACHAT_ID = "HuggingFaceH4/ultrachat_200k"
MAX_FIRST_USER_CHARS = 768
ADV_PROBABILITY = 0.125
INTERLEAVE_SEED = 42
_CHOICE_BLOCK = 1000

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class AdvRow:
    """One adversarial training example: away = behaviour+target, toward = behaviour+refusal."""

    behavior_id: str
    behavior: str
    target: str
    refusal: str = SAFE_RESPONSE


@dataclasses.dataclass(frozen=True)
class UtilityRow:
    """One utility conversation: ``messages`` = [{"role": "user"|"assistant"|..., "content"}]."""

    messages: list[dict[str, str]]

    @property
    def first_user_message(self) -> str:
        for m in self.messages:
            if m["role"] == "user":
                return m["content"]
        return ""


Row = AdvRow | UtilityRow


# --------------------------------------------------------------------------------------------
# Adversarial rows (§2.1)
# --------------------------------------------------------------------------------------------


def _read_targets(source: str | Path, split: str) -> dict[str, list[str]]:
    """BehaviorID -> list of targets, from the HarmBench JSON mapping or a table."""
    if is_local_table(source) and Path(source).suffix.lower() == ".json":
        path = Path(source)
        if not path.exists():
            raise ValueError(f"targets file {str(path)!r} does not exist; pass an existing path")
        with path.open(encoding="utf-8") as f:
            obj = json.load(f)
        if isinstance(obj, dict):
            return {k: [v] if isinstance(v, str) else list(v) for k, v in obj.items()}
        records = obj
    else:
        records = read_table(source, split)
    out: dict[str, list[str]] = {}
    for r in records:
        if "BehaviorID" not in r or not ({"Target", "target"} & set(r)):
            raise ValueError(
                f"targets table {str(source)!r} needs columns BehaviorID and Target; got {sorted(r)}"
            )
        value = r.get("Target", r.get("target"))
        out.setdefault(r["BehaviorID"], []).extend([value] if isinstance(value, str) else value)
    return out


def read_refusals(source: str | Path, split: str) -> dict[str, str]:
    """Behaviour text -> refusal, from the (Behavior, Safe_Response) CSV."""
    refusals = {}
    for r in read_table(source, split):
        if "Behavior" not in r or "Safe_Response" not in r:
            raise ValueError(
                f"safe-response table {str(source)!r} needs columns Behavior and Safe_Response; "
                f"got {sorted(r)}"
            )
        refusals[r["Behavior"]] = r["Safe_Response"]
    return refusals


def load_adv_rows(
    behaviors: str | Path,
    targets: str | Path,
    safe_responses: str | Path | None = None,
    *,
    refusal: str = SAFE_RESPONSE,
    split: str = "train",
) -> list[AdvRow]:
    """HarmBench behaviours × their target lists (1,188 rows for the adv-training split).

    Args:
      behaviors: CSV (columns Behavior, BehaviorID) path or dataset id.
      targets: JSON mapping BehaviorID -> list of targets, or a table (BehaviorID, Target).
      safe_responses: CSV (Behavior, Safe_Response); None -> ``refusal`` for every behaviour.
      refusal: the constant refusal used when ``safe_responses`` is None.
      split: split name used for dataset ids.
    """
    behavior_rows = read_table(behaviors, split)
    target_map = _read_targets(targets, split)
    refusal_map = read_refusals(safe_responses, split) if safe_responses is not None else None
    rows: list[AdvRow] = []
    for r in behavior_rows:
        if "Behavior" not in r or "BehaviorID" not in r:
            raise ValueError(
                f"behaviours table {str(behaviors)!r} needs columns Behavior and BehaviorID; "
                f"got {sorted(r)}"
            )
        bid, behavior = r["BehaviorID"], r["Behavior"]
        if bid not in target_map:
            raise ValueError(
                f"behaviour {bid!r} has no targets in {str(targets)!r}; add its targets or drop "
                "it from the behaviours file"
            )
        if refusal_map is None:
            safe = refusal
        elif behavior in refusal_map:
            safe = refusal_map[behavior]
        else:
            raise ValueError(
                f"behaviour {bid!r} has no safe response in {str(safe_responses)!r}; add a row "
                "for it or pass safe_responses=None to use the constant refusal"
            )
        rows.extend(AdvRow(bid, behavior, t, safe) for t in target_map[bid])
    if not rows:
        raise ValueError(f"no adversarial rows built from {str(behaviors)!r}; check the files")
    return rows


DAT_FIELDS = ("behavior_id", "behavior", "prompt", "target")
DAT_SAMPLE_COMMAND = "python -m mixat_jax.dat_sample"


def read_dat_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a Stage A JSONL file (``selected.jsonl`` / ``samples.jsonl``), checked:
    every record is a JSON object with the string fields :data:`DAT_FIELDS`. One-line
    ``ValueError`` for a missing file, an unreadable line, a missing field or no record."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"DAT prompts file {str(path)!r} does not exist; run {DAT_SAMPLE_COMMAND} "
            "--workdir OUT first and pass OUT/selected.jsonl (candidates: OUT/samples.jsonl)"
        )
    records: list[dict[str, Any]] = []
    for n, rec in read_jsonl(path, f"rewrite the file with {DAT_SAMPLE_COMMAND}"):
        for name in DAT_FIELDS:
            if not isinstance(rec.get(name), str):
                what = "has no field" if name not in rec else "has a non-string field"
                raise ValueError(
                    f"line {n} of {str(path)!r} {what} {name!r}; DAT records need "
                    f"{list(DAT_FIELDS)} (rewrite the file with {DAT_SAMPLE_COMMAND})"
                )
        records.append(rec)
    if not records:
        raise ValueError(
            f"no selected prompts in {str(path)!r}; run {DAT_SAMPLE_COMMAND} first / check "
            "its summary.json"
        )
    return records


def dat_rows_from_records(
    records: Sequence[Mapping[str, Any]],
    refusals: Mapping[str, str] | None = None,
    *,
    refusal: str = SAFE_RESPONSE,
) -> list[AdvRow]:
    """``AdvRow(behavior_id, behavior=prompt, target, refusal)``: the inpainted prompt is the
    instruction; the refusal is ``refusals[record["behavior"]]`` (the ORIGINAL behaviour's safe
    response, as CAT) if present, else ``refusal``."""
    refusals = refusals or {}
    return [
        AdvRow(str(r["behavior_id"]), str(r["prompt"]), str(r["target"]),
               refusals.get(str(r["behavior"]), refusal))
        for r in records
    ]  # fmt: skip


def per_behavior_counts(records: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """BehaviorID -> number of records, in order of first appearance."""
    counts: dict[str, int] = {}
    for r in records:
        counts[str(r["behavior_id"])] = counts.get(str(r["behavior_id"]), 0) + 1
    return counts


def check_reselect_candidates(
    selected: Sequence[Mapping[str, Any]],
    candidates: Sequence[Mapping[str, Any]],
    source: str | Path,
) -> None:
    """DAT re-selection keeps, per behaviour, as many candidates as ``selected`` holds: every
    behaviour of ``selected`` needs at least that many candidates (one-line ValueError)."""
    have = per_behavior_counts(candidates)
    for bid, k in per_behavior_counts(selected).items():
        if have.get(bid, 0) < k:
            raise ValueError(
                f"re-selection needs {k} candidates of behaviour {bid!r} but {str(source)!r} "
                f"has {have.get(bid, 0)}; pass Stage A's samples.jsonl as "
                "--config.dat.candidates"
            )


def load_dat_rows(
    path: str | Path,
    safe_responses: str | Path | None = None,
    *,
    refusal: str = SAFE_RESPONSE,
    split: str = "train",
) -> list[AdvRow]:
    """Stage A's ``selected.jsonl`` as adversarial rows (file order; DAT spec §2.2 step 6).

    Args:
      path: ``OUT/selected.jsonl`` of ``python -m mixat_jax.dat_sample``.
      safe_responses: CSV (Behavior, Safe_Response) keyed by the ORIGINAL behaviour text (the
        record's ``behavior``); None, or a behaviour it lacks -> ``refusal``.
      refusal: the constant refusal.
      split: split name used when ``safe_responses`` is a dataset id.
    """
    refusals = read_refusals(safe_responses, split) if safe_responses else None
    return dat_rows_from_records(read_dat_records(path), refusals, refusal=refusal)


# --------------------------------------------------------------------------------------------
# Utility rows (§2.2)
# --------------------------------------------------------------------------------------------


def _messages_of(record: Mapping[str, Any], source: str) -> list[dict[str, str]]:
    if "messages" in record:
        msgs = record["messages"]
        if isinstance(msgs, str):
            msgs = json.loads(msgs)
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in msgs]
    if "prompt" in record and "response" in record:
        return [
            {"role": "user", "content": str(record["prompt"])},
            {"role": "assistant", "content": str(record["response"])},
        ]
    raise ValueError(
        f"utility source {source!r} rows need a `messages` column or `prompt`/`response` columns; "
        f"got {sorted(record)}"
    )


def utility_rows_from_records(
    records: Sequence[Mapping[str, Any]],
    *,
    max_first_user_chars: int | None = MAX_FIRST_USER_CHARS,
    limit: int | None = None,
    source: str = "<records>",
) -> list[UtilityRow]:
    """Convert records to :class:`UtilityRow`, keeping first user message < max chars."""
    rows: list[UtilityRow] = []
    for rec in records:
        row = UtilityRow(_messages_of(rec, source))
        if max_first_user_chars is not None and len(row.first_user_message) >= max_first_user_chars:
            continue
        rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    return rows


def load_utility_rows(
    source: str | Path = ULTRACHAT_ID,
    *,
    split: str = "train_sft",
    max_first_user_chars: int | None = MAX_FIRST_USER_CHARS,
    limit: int | None = None,
) -> list[UtilityRow]:
    """UltraChat ``train_sft`` (filtered, in dataset order) or a local chat file.

    ``limit`` keeps only the first ``limit`` rows that pass the filter (the mixture uses a prefix
    of ~8.5k rows; a limit that is too small ends the mixture early, see :func:`interleave`).
    """
    return utility_rows_from_records(
        read_table(source, split),
        max_first_user_chars=max_first_user_chars,
        limit=limit,
        source=str(source),
    )


# --------------------------------------------------------------------------------------------
# Mixing (§2.3), shuffling, host sharding
# --------------------------------------------------------------------------------------------


def interleave_indices(
    lengths: Sequence[int], probabilities: Sequence[float], seed: int = INTERLEAVE_SEED
) -> np.ndarray:
    """``[N, 2]`` int array of (source, index-in-source), datasets "first_exhausted" semantics.

    Source ids are drawn with ``default_rng(seed).choice(n_sources, size=1000, p=probabilities)``
    block by block; each draw takes the next unused row of that source; the stream stops right
    after the draw that uses a source's last row.
    """
    lengths = [int(n) for n in lengths]
    p = np.asarray(probabilities, dtype=np.float64)
    if len(lengths) != len(p):
        raise ValueError(
            f"got {len(lengths)} sources but {len(p)} probabilities; pass one per source"
        )
    if any(n <= 0 for n in lengths):
        raise ValueError(f"every source must be non-empty to interleave; got lengths {lengths}")
    if np.any(p < 0) or not np.isclose(p.sum(), 1.0):
        raise ValueError(f"probabilities must be >= 0 and sum to 1; got {list(p)}")
    rng = np.random.default_rng(seed)
    used = np.zeros(len(lengths), dtype=np.int64)
    out: list[np.ndarray] = []
    while True:
        block = rng.choice(len(lengths), size=_CHOICE_BLOCK, p=p)
        counts = np.zeros((len(block), len(lengths)), dtype=np.int64)
        counts[np.arange(len(block)), block] = 1
        cum = used + np.cumsum(counts, axis=0)  # rows used after each draw
        index = cum[np.arange(len(block)), block] - 1
        done = np.nonzero((cum >= np.asarray(lengths)).any(axis=1))[0]
        stop = int(done[0]) + 1 if len(done) else len(block)
        out.append(np.stack([block[:stop], index[:stop]], axis=1))
        used = cum[stop - 1]
        if len(done):
            return np.concatenate(out, axis=0)


def interleave(
    adv_rows: Sequence[AdvRow],
    util_rows: Sequence[UtilityRow],
    *,
    adv_probability: float = ADV_PROBABILITY,
    seed: int = INTERLEAVE_SEED,
) -> list[Row]:
    """The MixAT mixture: adv/utility drawn with p = (0.125, 0.875), stop when one is used up.

    With enough utility rows this contains every adversarial row exactly once (the last row of
    the stream is the last adversarial row) and a fixed prefix of the utility rows.
    """
    if not 0.0 < adv_probability < 1.0:
        raise ValueError(f"adv_probability must be in (0, 1); got {adv_probability}")
    sources: tuple[Sequence[Row], ...] = (adv_rows, util_rows)
    idx = interleave_indices(
        [len(adv_rows), len(util_rows)], [adv_probability, 1.0 - adv_probability], seed
    )
    return [sources[s][i] for s, i in idx]


def epoch_permutation(n: int, epoch: int, seed: int = INTERLEAVE_SEED) -> np.ndarray:
    """Seeded permutation of ``range(n)`` for one epoch (a different one per epoch)."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0; got {epoch}")
    return np.random.default_rng([seed, epoch]).permutation(n)


def shuffled_epoch(rows: Sequence[T], epoch: int, seed: int = INTERLEAVE_SEED) -> list[T]:
    """``rows`` in this epoch's seeded order."""
    return [rows[i] for i in epoch_permutation(len(rows), epoch, seed)]


def host_shard(global_items: Sequence[T], process_index: int, process_count: int) -> list[T]:
    """This process's contiguous slice of a global micro-batch (equal slices on every host).

    Every host builds the same global stream deterministically and keeps slice
    ``[process_index * n / process_count, (process_index + 1) * n / process_count)``.
    """
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(
            f"need 0 <= process_index < process_count; got {process_index}/{process_count}"
        )
    n = len(global_items)
    if n % process_count:
        raise ValueError(
            f"global micro-batch of {n} items does not split over {process_count} processes; "
            "use a micro-batch size divisible by the process count"
        )
    per = n // process_count
    return list(global_items[process_index * per : (process_index + 1) * per])
