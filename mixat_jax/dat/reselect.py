"""DAT Stage B's optional per-epoch re-selection (DAT spec §2.2 "Periodic refresh"; an ablation,
not in the paper; off unless ``config.dat.reselect_every_epoch``).

At the start of every epoch e >= 1 Stage A's candidates (``config.dat.candidates``, default the
``samples.jsonl`` beside ``selected.jsonl``) are re-scored by teacher-forced target loss
``CE(target | chat(prompt))`` under the CURRENT parameters (LoRA applied; the same scorer as
Stage A, ``mixat_jax.dat.scoring``), and per behaviour the K lowest-loss
candidates become that epoch's adversarial rows, K = that behaviour's count in
``selected.jsonl`` (so every epoch has the same rows count and micro-batch plan). Ties keep the
candidates' file order. This turns Stage A's offline selection into an online one.

:func:`epoch_rows` is ``training.loop.ReselectFn``; ``python -m mixat_jax.train`` passes it to
``loop.run`` (``training`` never imports ``dat``). The chosen set is written to
``WORKDIR/dat_reselect/epoch_{e}.jsonl`` (process 0, atomically) BEFORE it is used, and a
resumed run re-reads that file instead of re-scoring, so resumption is deterministic. Every
process scores the same candidates (the scoring call runs on the training mesh); process 0
decides whether the file exists.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from mixat_jax import mesh as mesh_lib
from mixat_jax.dat.scoring import TargetScorer, pack_loss_rows, row_target_ce
from mixat_jax.training import data as data_lib
from mixat_jax.training import loop as loop_lib
from mixat_jax.training.batches import host_local_batch
from mixat_jax.training.stream import adv_refusals


def reselect_path(workdir: str | Path, epoch: int) -> Path:
    return Path(workdir) / loop_lib.RESELECT_DIR / f"epoch_{epoch}.jsonl"


def choose(
    selected: Sequence[Mapping[str, Any]],
    candidates: Sequence[Mapping[str, Any]],
    losses: Sequence[float],
) -> list[dict[str, Any]]:
    """Per behaviour of ``selected`` (its order), the K lowest-``losses`` candidates (stable),
    K = its count in ``selected``; each record carries its new ``target_loss`` (and
    ``selected: True``: it is this epoch's selection)."""
    by_behavior: dict[str, list[int]] = {}
    for i, c in enumerate(candidates):
        by_behavior.setdefault(str(c["behavior_id"]), []).append(i)
    out = []
    for bid, k in data_lib.per_behavior_counts(selected).items():
        idx = by_behavior.get(bid, [])
        if len(idx) < k:
            raise ValueError(f"re-selection needs {k} candidates of behaviour {bid!r}; got "
                             f"{len(idx)}")  # fmt: skip
        order = sorted(idx, key=lambda i: (float(losses[i]), i))[:k]
        out += [{**candidates[i], "target_loss": float(losses[i]), "selected": True}
                for i in order]  # fmt: skip
    return out


def place_rows(batch: Mapping[str, np.ndarray], mesh: Any) -> dict[str, jax.Array]:
    """Global ``[B, L]`` arrays: rows over (data, fsdp) when B divides, else replicated; each
    process contributes its slice (every process holds the same host batch)."""
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    n_proc, idx = jax.process_count(), jax.process_index()
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    b = next(iter(batch.values())).shape[0]
    sharded = rows > 1 and b % rows == 0 and b % n_proc == 0
    sharding = mesh_lib.batch_sharding(mesh, 2) if sharded else mesh_lib.replicated(mesh)
    local = host_local_batch(batch, idx, n_proc, axis=0) if sharded and n_proc > 1 else batch
    return {k: jax.make_array_from_process_local_data(sharding, local[k], v.shape)
            for k, v in batch.items()}  # fmt: skip


def score(
    model: Any,
    tokenizer: Any,
    candidates: Sequence[Mapping[str, Any]],
    *,
    batch_rows: int,
    system_prompt: str | None,
    mesh: Any,
) -> np.ndarray:
    """Teacher-forced target loss of every candidate under ``model``: Stage A's per-row
    token-mean CE (``scoring.row_target_ce``, rows rendered by ``TargetScorer.loss_row``) in
    calls of ``batch_rows`` rows (the last one padded), lengths bucketed as Stage A does; on
    ``mesh`` (the training mesh, possibly multi-process) the rows are sharded over the batch
    axes and the parameters keep their training shardings."""
    scorer = TargetScorer(model, tokenizer, max_new_tokens=1, gen_batch_size=1,
                          system_prompt=system_prompt, mesh=None)  # fmt: skip
    encoded = [scorer.loss_row(str(c["prompt"]), str(c["target"])) for c in candidates]
    out = []
    for start in range(0, len(encoded), batch_rows):
        chunk = encoded[start : start + batch_rows]
        n = len(chunk)
        batch, max_targets = pack_loss_rows(chunk, batch_rows, scorer.pad_id)
        b = place_rows(batch, mesh)
        ce = row_target_ce(scorer.graphdef, scorer.state, b["ids"], b["mask"], b["target"],
                           max_targets=max_targets)  # fmt: skip
        if jax.process_count() > 1:
            ce = multihost_utils.process_allgather(ce, tiled=True)
        out.append(np.asarray(ce, np.float64)[:n])
    return np.concatenate(out) if out else np.zeros((0,))


def _exists_on_process_0(path: Path) -> bool:
    exists = path.is_file()
    if jax.process_count() > 1:
        exists = bool(multihost_utils.broadcast_one_to_all(np.int32(exists)))
    return exists


def _write_atomic(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    os.replace(tmp, path)


def epoch_rows(run: loop_lib.Run, epoch: int, model_fn: Callable[[], Any]) -> list[data_lib.AdvRow]:
    """The adversarial rows of ``epoch`` (``training.loop.ReselectFn``): the re-selected DAT rows
    followed by the run's other adversarial rows (``dat.include_original``)."""
    cfg = run.cfg
    selected = data_lib.read_dat_records(cfg.dat.selected)
    path = reselect_path(run.workdir, epoch)
    if _exists_on_process_0(path):
        records = data_lib.read_dat_records(path)
        loop_lib.log(f"DAT re-selection of epoch {epoch}: read {path}")
    else:
        candidates = data_lib.read_dat_records(cfg.dat.candidates_path)
        mesh = run.mesh if run.mesh.size > 1 else None
        losses = score(model_fn(), run.tokenizer, candidates,
                       batch_rows=cfg.dat.reselect_batch_size,
                       system_prompt=cfg.system_prompt, mesh=mesh)  # fmt: skip
        records = [{**r, "reselect_epoch": epoch} for r in choose(selected, candidates, losses)]
        if jax.process_index() == 0:
            _write_atomic(path, records)
        loop_lib.log(f"DAT re-selection of epoch {epoch}: {len(records)} of {len(candidates)} "
                     f"candidates, mean target loss {np.mean([r['target_loss'] for r in records]):.4f} "
                     f"(all {float(np.mean(losses)):.4f}); written to {path}")  # fmt: skip
    if len(records) != len(selected):
        raise ValueError(f"{path} holds {len(records)} rows, selected.jsonl {len(selected)}; "
                         "delete it to re-select")  # fmt: skip
    rows = data_lib.dat_rows_from_records(records, adv_refusals(cfg.data),
                                          refusal=cfg.data.refusal)  # fmt: skip
    return rows + list(run.adv_rows[len(rows) :])
