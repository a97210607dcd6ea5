"""Per-process shard files of Stage A and their merge (DAT spec §2.5: data-parallel over
processes; the issue's "each process writing its own shard that a final step merges").

`OUT/shards/process_<i>.jsonl` is written by process i only. One line = one finished work unit
(`{"behavior_id", "unit", "seconds", "records": [...]}`), appended with a single write, flushed
and fsync'ed: a unit is either complete or a torn last line. On start a process cuts a torn tail
off its own shard; readers skip torn (unparsable or unterminated) lines of any shard. A unit
is identified by (behavior_id, unit index), so shards written by a run with another process
count are read as well (a resumed run skips every unit any shard holds; the first copy of a
unit wins — copies are identical by construction). Whole-file outputs are written atomically
(a temporary file in the same directory, then `os.replace`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SHARD_DIR = "shards"


def shard_path(workdir: Path, process_index: int) -> Path:
    return workdir / SHARD_DIR / f"process_{process_index:05d}.jsonl"


def write_atomic(path: Path, text: str) -> None:
    """`path` holds `text` completely or keeps its previous content."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def dumps(record: Any) -> str:
    """One canonical JSON line (sorted keys off: field order is the schema's; no NaN)."""
    return json.dumps(record, ensure_ascii=False, allow_nan=False)


def parse_lines(data: bytes) -> tuple[list[dict], int]:
    """(unit blocks of complete lines, byte length of the valid prefix)."""
    blocks: list[dict] = []
    good = 0
    pos = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        if end < 0:
            break  # unterminated last line: torn
        try:
            block = json.loads(data[pos:end].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            break  # a torn line (only the last one can be)
        if isinstance(block, dict) and "records" in block:
            blocks.append(block)
        pos = end + 1
        good = pos
    return blocks, good


def repair(path: Path) -> None:
    """Cut a torn tail off this process's own shard before appending to it."""
    if not path.exists():
        return
    data = path.read_bytes()
    _, good = parse_lines(data)
    if good != len(data):
        with path.open("r+b") as f:
            f.truncate(good)


def read_all(workdir: Path) -> dict[tuple[str, int], dict]:
    """Every complete unit of every shard: (behavior_id, unit) -> block (first copy wins)."""
    out: dict[tuple[str, int], dict] = {}
    directory = workdir / SHARD_DIR
    if not directory.is_dir():
        return out
    for path in sorted(directory.glob("process_*.jsonl")):
        blocks, _ = parse_lines(path.read_bytes())
        for block in blocks:
            out.setdefault((str(block["behavior_id"]), int(block["unit"])), block)
    return out


class ShardWriter:
    """Appends finished units to this process's shard (one line per unit)."""

    def __init__(self, workdir: Path, process_index: int) -> None:
        self.path = shard_path(workdir, process_index)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair(self.path)

    def append(self, behavior_id: str, unit: int, seconds: float, records: Iterable[dict]) -> None:
        block = {"behavior_id": behavior_id, "unit": unit, "seconds": round(seconds, 6),
                 "records": list(records)}  # fmt: skip
        line = (dumps(block) + "\n").encode("utf-8")
        with self.path.open("ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
