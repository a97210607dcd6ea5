"""Behaviour records and the readers of behaviour / target / prompt files (layer 0: no model).

Implements the behaviour sets of HarmBench (Mazeika et al. 2024, `harmbench_behaviors_text_*.csv`,
`adv_training_behaviors.csv`, `*_targets*.json`) and the MixAT evaluation protocol (MixAT paper
§5 / spec mixat.md §8.1): the fixed 40-behaviour subset of the HarmBench test split and the
240-behaviour "all" set (standard + contextual, copyright excluded). Also reads
JailbreakBench / AdvBench (`goal`), StrongREJECT (`forbidden_prompt`) and plain `prompt` CSVs
(schema detected from the header), a Hugging Face `datasets` id (imported lazily), and the
XSTest v2 prompt file (Röttger et al. 2024) used for the over-refusal utility check.
`read_table` is the generic row reader (local .csv/.json/.jsonl/.parquet or a `datasets` id)
shared by the training data (spec mixat.md §2) and the offline PAP pool (§6.3).

Attacks, judges, training and evaluation all read these records; nothing here imports the rest
of the package.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# Row indices (0-based, file order) of the 40 behaviours MixAT evaluates by default, taken from
# `harmbench_behaviors_text_test.csv` (28 standard + 12 contextual; spec mixat.md §8.1).
MIXAT_40_ROW_INDICES: tuple[int, ...] = (
    0, 1, 2, 3, 5, 6, 7, 8, 10, 12, 13, 14, 16, 18, 19, 21, 22, 23, 24, 25,
    28, 29, 30, 31, 33, 34, 35, 37, 39, 40, 41, 42, 43, 44, 45, 46, 47, 49, 50, 51,
)  # fmt: skip

SUBSET_PRESETS: tuple[str, ...] = ("mixat40", "no_copyright")


@dataclass(frozen=True)
class Behavior:
    """One harmful behaviour (the request a red-teamer wants the model to fulfil).

    `target` is the (first) affirmative target string used by GCG-style attacks; `targets` holds
    all of them (adversarial-training behaviours have ~12 each). Either may be given; the other is
    filled in.
    """

    id: str
    behavior: str
    category: str = ""
    context: str | None = None
    target: str | None = None
    tags: tuple[str, ...] = ()
    functional_category: str = ""
    targets: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"Behavior id must be a non-empty string, got {self.id!r}")
        if not isinstance(self.behavior, str) or not self.behavior.strip():
            raise ValueError(
                f"Behavior {self.id!r} has empty behaviour text; give the request text"
            )
        if self.context is not None and not self.context.strip():
            object.__setattr__(self, "context", None)
        object.__setattr__(self, "tags", tuple(self.tags))
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.target is not None and not self.targets:
            object.__setattr__(self, "targets", (self.target,))
        elif self.target is None and self.targets:
            object.__setattr__(self, "target", self.targets[0])

    @property
    def is_contextual(self) -> bool:
        return self.context is not None


# ----------------------------------------------------------------------------------- schemas


def _norm(name: str) -> str:
    return name.strip().lower().lstrip("\ufeff")


def _row_get(row: Mapping[str, Any], key: str) -> Any:
    for k, v in row.items():
        if k is not None and _norm(k) == key:
            return v
    return None


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value != value:  # NaN from pandas-like sources
        return ""
    return str(value)


def _split_tags(value: Any) -> tuple[str, ...]:
    if isinstance(value, list | tuple):
        return tuple(str(t).strip() for t in value if str(t).strip())
    return tuple(t.strip() for t in _text(value).split(",") if t.strip())


def _detect_schema(header: Iterable[str], source: str) -> str:
    cols = {_norm(c) for c in header if c is not None}
    if "behaviorid" in cols or ("behavior" in cols and "goal" not in cols):
        missing = [c for c in ("Behavior", "BehaviorID") if _norm(c) not in cols]
        if missing:
            raise ValueError(
                f"{source}: missing required column {missing[0]!r} (HarmBench behaviour files "
                "need Behavior and BehaviorID)"
            )
        return "harmbench"
    if "goal" in cols:
        return "goal"
    if "forbidden_prompt" in cols:
        return "strongreject"
    if "prompt" in cols:
        return "prompt"
    raise ValueError(
        f"{source}: no recognised behaviour column in header {sorted(cols)}; expected one of "
        "'Behavior'+'BehaviorID' (HarmBench), 'goal' (JailbreakBench/AdvBench), "
        "'forbidden_prompt' (StrongREJECT) or 'prompt'"
    )


def _rows_to_behaviors(
    rows: Sequence[Mapping[str, Any]], header: Iterable[str], source: str, id_prefix: str
) -> list[Behavior]:
    schema = _detect_schema(header, source)
    out: list[Behavior] = []
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        if schema == "harmbench":
            bid = _text(_row_get(row, "behaviorid")).strip()
            text = _text(_row_get(row, "behavior"))
            category = _text(_row_get(row, "semanticcategory")) or _text(_row_get(row, "category"))
            context = _text(_row_get(row, "contextstring")) or None
            tags = _split_tags(_row_get(row, "tags"))
            functional = _text(_row_get(row, "functionalcategory"))
            target = None
        else:
            key = {"goal": "goal", "strongreject": "forbidden_prompt", "prompt": "prompt"}[schema]
            text = _text(_row_get(row, key))
            explicit_id = next(
                (
                    _text(_row_get(row, k)).strip()
                    for k in ("behaviorid", "id", "index")
                    if _text(_row_get(row, k)).strip()
                ),
                "",
            )
            bid = explicit_id or f"{id_prefix}_{i}"
            category = _text(_row_get(row, "category"))
            context, tags, functional = None, (), ""
            target = _text(_row_get(row, "target")) or None
        if not bid:
            raise ValueError(f"{where}: empty BehaviorID; every behaviour needs a unique id")
        if not text.strip():
            raise ValueError(f"{where}: empty behaviour text for id {bid!r}")
        out.append(
            Behavior(
                id=bid,
                behavior=text,
                category=category,
                context=context,
                target=target,
                tags=tags,
                functional_category=functional,
            )
        )
    seen: set[str] = set()
    for b in out:
        if b.id in seen:
            raise ValueError(f"{source}: duplicate behaviour id {b.id!r}; ids must be unique")
        seen.add(b.id)
    return out


# ----------------------------------------------------------------------------------- loaders


def _rows_and_header(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            rows = list(reader)
            return rows, list(reader.fieldnames or [])
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    elif suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ValueError(
                f"{path}: expected a JSON list of behaviour records (for a targets file use "
                "load_targets)"
            )
        rows = data
    else:
        raise ValueError(
            f"{path}: unsupported behaviour file type {suffix!r}; use .csv/.json/.jsonl"
        )
    header: list[str] = []
    for r in rows:
        for k in r:
            if k not in header:
                header.append(k)
    return rows, header


def _looks_like_dataset_id(source: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source)) and not re.search(
        r"\.(csv|tsv|json|jsonl|parquet)$", source
    )


def load_targets(path: str | Path) -> dict[str, tuple[str, ...]]:
    """Read a targets JSON (BehaviorID -> str or list of str) into id -> tuple of targets."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"targets file not found: {p}; pass the path of a *_targets*.json file")
    data = json.loads(p.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a JSON object mapping BehaviorID to target string(s)")
    out: dict[str, tuple[str, ...]] = {}
    for key, value in data.items():
        vals = (value,) if isinstance(value, str) else value
        if not isinstance(vals, list | tuple) or not all(isinstance(v, str) for v in vals):
            raise ValueError(f"{p}: target for {key!r} must be a string or a list of strings")
        out[str(key)] = tuple(vals)
    return out


def attach_targets(
    behaviors: Sequence[Behavior],
    targets: Mapping[str, str | Sequence[str]],
    *,
    required: bool = False,
) -> list[Behavior]:
    """Return behaviours with `target`/`targets` filled from an id -> target(s) mapping."""
    out = []
    for b in behaviors:
        if b.id in targets:
            t = targets[b.id]
            ts = (t,) if isinstance(t, str) else tuple(t)
            out.append(replace(b, target=ts[0] if ts else None, targets=ts))
        elif required:
            raise ValueError(
                f"no target for behaviour {b.id!r}; use the targets file matching the behaviours"
            )
        else:
            out.append(b)
    return out


def select_subset(behaviors: Sequence[Behavior], subset: str) -> list[Behavior]:
    """Apply a preset selector: 'mixat40' (row indices of the HarmBench test CSV) or
    'no_copyright' (drop copyright behaviours: the 240-behaviour MixAT `RUN_ALL` set)."""
    if subset == "mixat40":
        if len(behaviors) <= max(MIXAT_40_ROW_INDICES):
            raise ValueError(
                f"subset 'mixat40' needs the full HarmBench test CSV (>= 52 rows), got "
                f"{len(behaviors)} behaviours; load harmbench_behaviors_text_test.csv without limit"
            )
        return [behaviors[i] for i in MIXAT_40_ROW_INDICES]
    if subset == "no_copyright":
        return [b for b in behaviors if b.functional_category != "copyright"]
    raise ValueError(f"unknown subset {subset!r}; valid presets: {', '.join(SUBSET_PRESETS)}")


def load_behaviors(
    source: str | Path,
    *,
    targets: str | Path | Mapping[str, str | Sequence[str]] | None = None,
    subset: str | None = None,
    limit: int | None = None,
    split: str = "train",
    dataset_config: str | None = None,
) -> list[Behavior]:
    """Load behaviours from a CSV/JSON/JSONL file or a Hugging Face `datasets` id.

    The schema is detected from the header (HarmBench, HarmBench adv-training, `goal`,
    `forbidden_prompt`, `prompt`). `subset` applies a preset (see `select_subset`) before
    `limit` keeps the first `limit` behaviours.
    """
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be a positive integer or None, got {limit}")
    path = Path(source)
    if path.is_file():
        rows, header = _rows_and_header(path)
        behaviors = _rows_to_behaviors(rows, header, str(path), path.stem)
    elif isinstance(source, str) and _looks_like_dataset_id(source):
        behaviors = _load_from_hub(source, split=split, dataset_config=dataset_config)
    else:
        raise ValueError(
            f"behaviour source not found: {source}; pass an existing CSV/JSON path or a "
            "Hugging Face dataset id like 'owner/name'"
        )
    if targets is not None:
        mapping = targets if isinstance(targets, Mapping) else load_targets(targets)
        behaviors = attach_targets(behaviors, mapping)
    if subset is not None:
        behaviors = select_subset(behaviors, subset)
    if limit is not None:
        behaviors = behaviors[:limit]
    return behaviors


def _load_from_hub(dataset_id: str, *, split: str, dataset_config: str | None) -> list[Behavior]:
    try:
        import datasets  # lazy: only when the user passes a dataset id
    except ImportError as e:  # pragma: no cover - datasets is a declared dependency
        raise ValueError(
            f"loading {dataset_id!r} needs the 'datasets' package; pip install it"
        ) from e
    try:
        ds = datasets.load_dataset(dataset_id, dataset_config, split=split)
    except Exception as e:  # offline / unknown id: one clear line instead of a hub traceback
        raise ValueError(
            f"{dataset_id!r} is not a local file and could not be loaded as a datasets id "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check the path"
        ) from e
    rows = [dict(r) for r in ds]
    return _rows_to_behaviors(rows, list(ds.column_names), dataset_id, dataset_id.split("/")[-1])


# ----------------------------------------------------------------------------------- XSTest


@dataclass(frozen=True)
class XSTestPrompt:
    id: str
    prompt: str
    type: str
    focus: str = ""
    note: str = ""


@dataclass(frozen=True)
class XSTestPrompts:
    """XSTest v2: `safe` prompts should be answered, `unsafe` (contrast) prompts refused."""

    safe: tuple[XSTestPrompt, ...]
    unsafe: tuple[XSTestPrompt, ...]


def load_xstest(path: str | Path) -> XSTestPrompts:
    """Read `xstest_v2_prompts.csv` (id_v2, type, prompt, focus, note; unsafe = `contrast_*`
    types) or the hub export with a `label` column ('safe'/'unsafe')."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"XSTest file not found: {p}; pass the path of xstest_v2_prompts.csv")
    rows, header = _rows_and_header(p)
    cols = {_norm(c) for c in header}
    for required in ("prompt", "type"):
        if required not in cols:
            raise ValueError(f"{p}: missing required column {required!r} for XSTest prompts")
    safe: list[XSTestPrompt] = []
    unsafe: list[XSTestPrompt] = []
    for i, row in enumerate(rows):
        pid = _text(_row_get(row, "id_v2")) or _text(_row_get(row, "id")) or f"xstest_{i}"
        item = XSTestPrompt(
            id=pid,
            prompt=_text(_row_get(row, "prompt")),
            type=_text(_row_get(row, "type")),
            focus=_text(_row_get(row, "focus")),
            note=_text(_row_get(row, "note")),
        )
        label = _text(_row_get(row, "label")).strip().lower()
        is_unsafe = label == "unsafe" if label else item.type.startswith("contrast")
        (unsafe if is_unsafe else safe).append(item)
    return XSTestPrompts(safe=tuple(safe), unsafe=tuple(unsafe))


# ------------------------------------------------------------------------------ generic tables

TABLE_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet")


def read_jsonl(path: str | Path, fix: str) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` for every non-blank line of a JSONL file of JSON objects. A line
    that is not valid JSON or not an object is a one-line ``ValueError`` naming the file and the
    line and ending in ``fix`` (what the user should do, e.g. "rewrite it with ...")."""
    out: list[tuple[int, dict[str, Any]]] = []
    with Path(path).open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"line {n} of {str(path)!r} is not valid JSON ({e.msg}); {fix}"
                ) from None
            if not isinstance(rec, dict):
                raise ValueError(f"line {n} of {str(path)!r} is not a JSON object; {fix}")
            out.append((n, rec))
    return out


def is_local_table(source: str | Path) -> bool:
    """True if `source` names a local file (existing, or with a table suffix), not a dataset id."""
    p = Path(source)
    return p.exists() or p.suffix.lower() in TABLE_SUFFIXES


def _read_local_table(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise ValueError(f"data file {str(path)!r} does not exist; pass an existing path")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(encoding="utf-8", errors="replace", newline="") as f:
            return list(csv.DictReader(f))
    if suffix == ".jsonl":
        return [rec for _, rec in read_jsonl(path, "fix or replace the file")]
    if suffix == ".json":
        with path.open(encoding="utf-8") as f:
            obj = json.load(f)
        if isinstance(obj, list):
            return obj
        raise ValueError(
            f"{str(path)!r} holds a JSON {type(obj).__name__}, expected a list of records; "
            "use a JSON list or JSONL file"
        )
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # lazy: optional, only for .parquet files

        return pq.read_table(path).to_pylist()
    raise ValueError(
        f"unsupported data file type {suffix!r} for {str(path)!r}; use .csv, .json, .jsonl "
        "or .parquet"
    )


def _read_hub_table(dataset_id: str, split: str) -> list[dict[str, Any]]:
    try:
        import datasets  # lazy: only when the source is a dataset id
    except ImportError as e:  # pragma: no cover - datasets is a declared dependency
        raise ValueError(
            f"loading dataset id {dataset_id!r} needs the `datasets` package; install it or pass "
            "a local file"
        ) from e
    return list(datasets.load_dataset(dataset_id, split=split))


def read_table(source: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """Rows (dicts) of a local .csv/.json/.jsonl/.parquet file or of a HF dataset id's split."""
    if is_local_table(source):
        return _read_local_table(Path(source))
    return _read_hub_table(str(source), split)
