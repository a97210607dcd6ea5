"""Process-0 metric writer: ``workdir/metrics.jsonl`` + tensorboardX events (DESIGN.md rule 8).

Each :meth:`MetricWriter.write_scalars` call appends one JSON line ``{"step": s, **scalars}``
(jax/numpy scalars converted to Python numbers; spec §12 asks to log attack flags, ē, eps_abs and
the realised ‖δ‖ per step) and writes the same scalars to ``workdir/tb/``. Only process 0 writes
(``jax.process_index() == 0``) unless ``enabled`` says otherwise.

URL workdirs (``gs://``, issue #16) go through :mod:`mixat_jax.storage` (etils epath): an object
store cannot append, so the JSONL file is uploaded whole at every :meth:`MetricWriter.flush`
(the loop flushes at each checkpoint) and at close; TensorBoard events are written by
tensorboardX into a local staging directory (its own gs:// writer would need
google-cloud-storage) and the same flushes copy them to ``WORKDIR/tb/``, so
``tensorboard --logdir gs://.../tb`` sees them.
"""

from __future__ import annotations

import json
import numbers
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from mixat_jax import storage

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


def to_scalar(name: str, value: Any) -> float | int | bool | str:
    """Python scalar from a Python/numpy/jax scalar (or size-1 array); strings pass through."""
    if isinstance(value, bool | str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    arr = np.asarray(value)  # jax arrays convert (device -> host)
    if arr.size != 1:
        raise ValueError(
            f"metric {name!r} has shape {arr.shape}, expected a scalar; reduce it (mean/sum) first"
        )
    item = arr.reshape(()).item()
    if isinstance(item, bool | int | float):
        return item
    raise ValueError(f"metric {name!r} has unsupported dtype {arr.dtype}; log numbers or strings")


class MetricWriter:
    """Append-only scalar log for one run (JSONL + TensorBoard)."""

    def __init__(
        self, workdir: storage.PathLike, *, enabled: bool | None = None, tensorboard: bool = True
    ) -> None:
        if enabled is None:
            import jax  # lazy: only for this default; the writer itself needs no jax

            enabled = jax.process_index() == 0
        self.enabled = enabled
        self.workdir = str(workdir)
        self._remote = storage.is_url(self.workdir)
        self._lines: list[str] = []
        self._file = None
        self._tb = None
        self._tb_staging: str | None = None
        if not enabled:
            return
        root = storage.run_path(self.workdir)
        root.mkdir(parents=True, exist_ok=True)
        if self._remote:
            self._epath = root / METRICS_FILE
            if self._epath.exists():
                self._lines = self._epath.read_text().splitlines(keepends=True)
        else:
            self._file = open(root / METRICS_FILE, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter  # lazy: heavy, only when TensorBoard is on

            if self._remote:
                self._tb_staging = tempfile.mkdtemp(prefix="mixat_jax_tb_")
                self._tb = SummaryWriter(logdir=self._tb_staging)
            else:
                self._tb = SummaryWriter(logdir=str(root / TB_DIR))

    @property
    def path(self) -> str:
        return f"{self.workdir.rstrip('/')}/{METRICS_FILE}"

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Log ``scalars`` at ``step`` (one JSON line; numeric ones also to TensorBoard)."""
        if not self.enabled:
            return
        record: dict[str, Any] = {"step": int(step)}
        for k, v in scalars.items():
            if k == "step":
                raise ValueError("metric name 'step' is reserved; rename the scalar")
            record[k] = to_scalar(k, v)
        line = json.dumps(record) + "\n"
        if self._file is not None:
            self._file.write(line)
        else:
            self._lines.append(line)
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, global_step=int(step))

    def flush(self) -> None:
        if not self.enabled:
            return
        if self._file is not None:
            self._file.flush()
        elif self._remote:
            self._epath.write_text("".join(self._lines))
        if self._tb is not None:
            self._tb.flush()
            if self._tb_staging is not None:
                storage.copy_dir(self._tb_staging, storage.run_path(self.workdir) / TB_DIR)

    def close(self) -> None:
        if not self.enabled:
            return
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
            if self._tb_staging is not None:
                storage.copy_dir(self._tb_staging, storage.run_path(self.workdir) / TB_DIR)
                shutil.rmtree(self._tb_staging, ignore_errors=True)
                self._tb_staging = None
        self.enabled = False

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(workdir: storage.PathLike) -> list[dict[str, Any]]:
    """All records of ``workdir/metrics.jsonl`` (for tests, reports and resume checks)."""
    path = storage.run_path(workdir) / METRICS_FILE
    if not path.exists():
        raise ValueError(f"no {METRICS_FILE} in {str(workdir)!r}; was the run started there?")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
