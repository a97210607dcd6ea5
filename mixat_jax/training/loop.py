"""The training run behind ``python -m mixat_jax.train`` (MixAT spec §3, §10; DESIGN.md rule 8).

``run(config, workdir)``:

1. setup — frozen config (``run_config``), mesh, data stream, model (+ LoRA), schedule, PAP pool,
   optimizer, train state; every user error is a one-line ``ValueError`` raised before anything
   is written to the workdir;
2. resume — the newest orbax checkpoint (LoRA, optimizer, step, RNG key; meta: data position)
   if the workdir has one and its ``config.json`` matches (``run_config.RESUME_FREE_KEYS`` may
   differ);
3. loop — per optimizer step, for each of the ``grad_accum`` micro-batches ``m``: the schedule
   flag, the discrete rewrite (``training.discrete``), packing into the static layout; then the
   jitted ``steps.train_step`` on global arrays; metrics (JSONL + TensorBoard), progress/ETA,
   checkpoints every ``checkpoint_every`` steps;
4. stop — on SIGTERM (also polled inside GCG) or ``stop_after``: save a checkpoint and return;
   at the end: final checkpoint and ``workdir/adapter`` (PEFT). With several processes the stop
   decision is agreed (``PreemptionFlag.agree``, a one-int all-gather per step and per GCG step):
   a signal reaching one host stops all of them at the same step, with the same checkpoint.

Workdir (issue #16): ``workdir`` may be a URL (``gs://bucket/run``); it is held as an
``etils.epath`` path (``mixat_jax.storage``), never ``pathlib``, and every writer (config.json,
metrics.jsonl, tb/, pap_pool.jsonl, orbax checkpoints, adapter/) goes through it.

DAT (DAT spec §2.3): ``variant="dat"`` reads Stage A's prompts as the adversarial rows
(``stream.load_rows``); its optional per-epoch re-selection (§2.2 "Periodic refresh") is a
:data:`ReselectFn` passed to :func:`run` by the entry point (``mixat_jax.dat.reselect`` —
``training`` never imports ``dat``) and installed as the stream's per-epoch adversarial rows.

Determinism: the data order is a function of (seed, epoch), the schedule of (seed, number of
micro-batches), PAP/GCG draws of (seed, m), the step key is ``fold_in(key(seed), step)``, so an
interrupted and resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from mixat_jax import cli as cli_lib
from mixat_jax import lora as lora_lib
from mixat_jax import mesh as mesh_lib
from mixat_jax import storage
from mixat_jax.attacks.pap import POOL_FIELDS, load_pool
from mixat_jax.chat import ChatRenderer
from mixat_jax.hf.export import save_adapter
from mixat_jax.hf.load import load_pretrained
from mixat_jax.pap_pool import PoolBehavior, template_records
from mixat_jax.tiny_model import build_tiny_checkpoint
from mixat_jax.training import checkpoint as ckpt_lib
from mixat_jax.training import data as data_lib
from mixat_jax.training import discrete as discrete_lib
from mixat_jax.training import run_config as rc
from mixat_jax.training import schedules, step_metrics
from mixat_jax.training.batches import pack_microbatch, stack_microbatches
from mixat_jax.training.compiled_step import make_jitted_train_step, step_batch_shardings
from mixat_jax.training.metrics import METRICS_FILE, MetricWriter
from mixat_jax.training.optim import lr_schedule, make_optimizer
from mixat_jax.training.progress import Progress
from mixat_jax.training.state import init_train_state, place_train_state
from mixat_jax.training.stream import EpochStream, load_rows, total_steps

CONFIG_FILE = "config.json"
CKPT_DIR = "checkpoints"
ADAPTER_DIR = "adapter"
PAP_POOL_FILE = "pap_pool.jsonl"
PROGRESS_KEYS = ("loss", "away", "toward", "utility", "discrete")
RESELECT_DIR = "dat_reselect"  # WORKDIR/dat_reselect/epoch_{e}.jsonl (DAT re-selection)
_LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"  # every compile (cache hit too)


class CompileCounter:
    """Counts jit lowerings: all of them, and those inside train-step calls (must stay 1)."""

    def __init__(self) -> None:
        self.total = 0
        self.train_step = 0
        self.in_step = False
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kw: Any) -> None:
        del duration, kw
        if event == _LOWER_EVENT:
            self.total += 1
            self.train_step += self.in_step


def log(msg: str) -> None:
    if jax.process_index() == 0:
        print(f"[mixat_jax.train] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ workdir
def _json_config(config) -> dict[str, Any]:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(d, default=str))


def check_workdir(workdir: storage.PathLike, config_json: dict[str, Any]) -> None:
    """Refuse a workdir that holds a different run (its config.json differs)."""
    cli_lib.check_workdir_config(
        storage.run_path(workdir), config_json, free_keys=rc.RESUME_FREE_KEYS,
        config_file=CONFIG_FILE,
    )  # fmt: skip


def _truncate_metrics(workdir: storage.PathLike, last_step: int) -> None:
    """Drop metric records of steps after the restored checkpoint (they are recomputed)."""
    path = storage.run_path(workdir) / METRICS_FILE
    if jax.process_index() != 0 or not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= last_step]
    if len(keep) != len(lines):
        storage.write_text_atomic(path, "".join(keep))


# ------------------------------------------------------------------------------ setup pieces
def tiny_checkpoint(spec: rc.TinyModelSpec, workdir: storage.PathLike) -> Path:
    """The tiny random checkpoint for ``spec`` (built once into the cache directory; a URL
    workdir caches it in the local temp directory: weights are read from local files)."""
    if spec.cache_dir:
        root = storage.local_path(spec.cache_dir)
    elif storage.is_url(workdir):
        root = Path(tempfile.gettempdir()) / "mixat_jax_tiny_model"
    else:
        root = storage.local_path(workdir) / "tiny_model"
    root.mkdir(parents=True, exist_ok=True)
    name = (f"tiny_v{spec.vocab_size}_h{spec.hidden_size}_l{spec.num_layers}_a{spec.num_heads}"
            f"_k{spec.num_kv_heads}_s{spec.seed}")  # fmt: skip
    path = root / name
    if (path / "config.json").exists():
        return path
    tmp = root / f".{name}.{os.getpid()}.tmp"
    build_tiny_checkpoint(
        tmp,
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        num_heads=spec.num_heads,
        num_kv_heads=spec.num_kv_heads,
        seed=spec.seed,
    )
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_model(cfg: rc.RunConfig, workdir: storage.PathLike, mesh):
    """(model with LoRA attached, tokenizer, model directory)."""
    path = tiny_checkpoint(cfg.tiny_model, workdir) if cfg.tiny_model is not None else cfg.model
    model, tok = load_pretrained(path, dtype=cfg.dtype, mesh=mesh, remat=cfg.remat, kind="causal")
    with jax.set_mesh(mesh):
        lora_lib.ensure_lora(model, cfg.lora.build(), seed=cfg.seed)
    return model, tok, str(path)


def load_pap_pool(cfg: rc.RunConfig, rows, workdir: storage.PathLike) -> discrete_lib.PAPPool:
    d = cfg.discrete
    if d.pap_pool == rc.PAP_TEMPLATE:
        behaviors = {r.behavior_id: PoolBehavior(r.behavior_id, r.behavior) for r in rows}
        records = template_records(list(behaviors.values()), seed=cfg.seed,
                                   n_per_technique=d.template_n_per_technique,
                                   num_techniques=d.num_techniques)  # fmt: skip
        path = storage.run_path(workdir) / PAP_POOL_FILE
        if jax.process_index() == 0 and not path.exists():
            storage.write_text_atomic(path, "".join(
                json.dumps({k: r[k] for k in POOL_FIELDS}, ensure_ascii=False) + "\n"
                for r in records))  # fmt: skip
    elif not d.pap_pool:
        raise ValueError("the schedule has PAP micro-batches but config.discrete.pap_pool is "
                         "empty; build one with python -m mixat_jax.pap_pool")  # fmt: skip
    else:
        records = load_pool(d.pap_pool)
    pool = discrete_lib.PAPPool(records, d.num_techniques)
    if len(pool) == 0:
        raise ValueError(f"PAP pool {d.pap_pool!r} has no rewrites for the first "
                         f"{d.num_techniques} techniques; rebuild it")  # fmt: skip
    missing = pool.missing_behaviors([r.behavior_id for r in rows])
    if missing:
        log(f"warning: PAP pool lacks {len(missing)} behaviours (e.g. {missing[:3]}); their "
            "PAP micro-batches keep the original instruction (counted as pap_absent)")  # fmt: skip
    return pool


def global_batch(batch_np: Mapping[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Global [G, slots, ...] arrays, the slot axis split over the mesh's data × fsdp shards.

    Every process builds the same full batch (the stream, schedule and rewrites are functions of
    the seed and the step), so each addressable device takes its own rows from it
    (``jax.make_array_from_callback``): the placement follows the sharding's device order (which
    ``mesh.make_mesh`` lays out physically, hybrid across slices) on any number of hosts, with
    no per-host slicing convention to keep in step (issue #16)."""
    shards = mesh_lib.batch_shards(mesh)
    for k, v in batch_np.items():
        if shards > 1 and np.ndim(v) >= 2 and np.shape(v)[1] % shards:
            raise ValueError(
                f"batch array {k} has {np.shape(v)[1]} slots, not divisible by the {shards} "
                "batch shards (mesh data x fsdp); pack it with the stream's packing_layout"
            )
    shardings = step_batch_shardings(batch_np, mesh)
    return {
        k: jax.make_array_from_callback(np.shape(v), shardings[k], lambda idx, v=v: v[idx])
        for k, v in batch_np.items()
    }


@dataclasses.dataclass
class Run:
    """Everything set up for the loop."""

    cfg: rc.RunConfig
    workdir: Any  # storage.run_path: an etils epath.Path (a URL stays a URL)
    config_json: dict[str, Any]
    mesh: Any
    stream: EpochStream
    schedule: schedules.Schedule
    steps: int
    renderer: Any
    tokenizer: Any
    model_dir: str
    state: Any  # the optimizer is state.tx
    rewriter: discrete_lib.DiscreteRewriter
    layout: Any
    adv_rows: list[data_lib.AdvRow] = dataclasses.field(default_factory=list)


ReselectFn = Callable[[Run, int, Callable[[], Any]], list[data_lib.AdvRow]]
"""DAT re-selection hook ``(run, epoch, model_fn) -> adversarial rows of epoch`` (epoch >= 1;
``model_fn()`` = the model with the current LoRA): as many rows as ``run.adv_rows``, the j-th
replacing the j-th (``stream.EpochStream``); it must be deterministic given the workdir
(``mixat_jax.dat.reselect.epoch_rows`` writes ``RESELECT_DIR/epoch_{e}.jsonl`` before use and
re-reads it on resume)."""


def setup(
    config,
    workdir: storage.PathLike,
    should_abort: Callable[[], bool],
    reselect: ReselectFn | None = None,
) -> Run:
    """Validate, load and build everything; writes nothing to ``workdir`` except caches."""
    if not str(workdir):
        raise ValueError("--workdir is required")
    workdir = storage.run_path(workdir)  # never pathlib: gs://b/r would become gs:/b/r
    cfg = rc.from_config_dict(config)
    if cfg.dat.reselect_every_epoch and reselect is None:
        raise ValueError("config.dat.reselect_every_epoch needs the re-selection hook of "
                         "mixat_jax.dat.reselect; run through python -m mixat_jax.train")  # fmt: skip
    if cfg.dat.reselect_every_epoch and storage.is_url(workdir):
        raise ValueError(f"config.dat.reselect_every_epoch keeps its files on a shared file "
                         f"system; pass a directory as --workdir, not the URL {str(workdir)!r}")  # fmt: skip
    config_json = _json_config(config)
    check_workdir(workdir, config_json)
    if cfg.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", cfg.compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    adv, util = load_rows(cfg.data, cfg.dat)
    if cfg.dat.reselect_every_epoch:
        data_lib.check_reselect_candidates(
            data_lib.read_dat_records(cfg.dat.selected),
            data_lib.read_dat_records(cfg.dat.candidates_path),
            cfg.dat.candidates_path,
        )
    mixture = data_lib.interleave(
        adv, util, adv_probability=cfg.data.adv_probability, seed=cfg.data.interleave_seed
    )
    stream = EpochStream(mixture, cfg.batch, cfg.seed, shards=mesh_lib.batch_shards(mesh))
    n_steps = cfg.steps or total_steps(stream, cfg.epochs, cfg.grad_accum)
    schedule = schedules.build_schedule(
        cfg.discrete.schedule, n_steps * cfg.grad_accum, seed=cfg.seed
    )
    flags = set(np.unique(schedule.flags).tolist())
    pool = load_pap_pool(cfg, adv, workdir) if schedules.FLAG_PAP in flags else None
    workdir.mkdir(parents=True, exist_ok=True)
    model, tok, model_dir = load_model(cfg, workdir, mesh)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    layout = dataclasses.replace(stream.packing_layout(n_steps * cfg.grad_accum), pad_id=int(pad))
    renderer = ChatRenderer(tok, system_prompt=cfg.system_prompt)
    rewriter = discrete_lib.DiscreteRewriter(
        renderer=renderer,
        tokenizer=tok,
        max_len_adv=layout.max_len_adv,
        seed=cfg.seed,
        pool=pool,
        gcg=cfg.discrete.gcg_config,
        technique_per=cfg.discrete.technique_per,
        mesh=mesh if mesh.size > 1 else None,
        should_abort=should_abort,
    )
    tx = make_optimizer(cfg.optim, n_steps)
    with jax.set_mesh(mesh):
        state = place_train_state(init_train_state(model, tx), mesh, cfg.mesh.rules)
    log(f"model {model_dir}; mesh {dict(mesh.shape)}; {len(adv)} adversarial + {len(util)} "
        f"utility rows, mixture {len(mixture)}; {stream.micro_batches_in(1)} micro-batches/epoch; "
        f"{n_steps} steps x {cfg.grad_accum} micro-batches of {layout.adv_slots} adversarial + "
        f"{layout.util_slots} utility slots ({stream.shards} batch shards, "
        f"{cfg.grad_accum * (layout.adv_slots + layout.util_slots)} row slots per step); schedule {schedule.name} "
        f"{schedule.fractions()}; mean |E_v| {float(state.emb_norm):.4f}, eps_abs "
        f"{cfg.step.attack.eps * float(state.emb_norm):.4g}")  # fmt: skip
    return Run(cfg, workdir, config_json, mesh, stream, schedule, n_steps, renderer, tok,
               model_dir, state, rewriter, layout, adv)  # fmt: skip


# ------------------------------------------------------------------------------ checkpoints
def _ckpt_tree(state, root_key) -> dict[str, Any]:
    return {
        "lora": state.lora,
        "opt_state": state.opt_state,
        "step": state.step,
        "rng": np.asarray(jax.random.key_data(root_key)),
    }  # host numpy: multi-host safe


def _meta(run: Run, step: int) -> dict[str, Any]:
    m = step * run.cfg.grad_accum
    epoch, index = run.stream.locate(m)
    return {
        "step": step,
        "data_position": {"micro_batch": m, "epoch": epoch, "index_in_epoch": index},
        "seed": run.cfg.seed,
        "schedule": run.schedule.name,
        "config_hash": ckpt_lib.config_hash(rc.resume_view(run.config_json)),
    }


def restore(run: Run, ckpt: ckpt_lib.Checkpointer, root_key) -> tuple[Any, int]:
    latest = ckpt.latest_step()
    if latest is None:
        return run.state, 0
    tree, meta = ckpt.restore(latest, _ckpt_tree(run.state, root_key))
    if meta.get("config_hash") != ckpt_lib.config_hash(rc.resume_view(run.config_json)):
        raise ValueError(f"checkpoint {latest} in {ckpt.directory} belongs to another config; "
                         "use a new --workdir")  # fmt: skip
    if not np.array_equal(np.asarray(tree["rng"]), np.asarray(jax.random.key_data(root_key))):
        raise ValueError(f"checkpoint {latest} was written with another RNG key; new --workdir")
    state = run.state.replace(lora=tree["lora"], opt_state=tree["opt_state"], step=tree["step"])
    log(f"resumed from checkpoint step {latest} (data position {meta['data_position']})")
    return state, int(latest)


# ------------------------------------------------------------------------------ one step
def build_batch(run: Run, step: int, model_fn) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Rewritten + packed ``[G, ...]`` host batch of optimizer step ``step`` and its host info."""
    g_count = run.cfg.grad_accum
    mbs, infos, skipped, epoch = [], [], 0, 0
    conv = lambda msgs: run.renderer.conversation(msgs, train_on=run.cfg.data.utility_train_on)
    for g in range(g_count):
        m = step * g_count + g
        epoch, _ = run.stream.locate(m)
        composed = run.stream[m]
        flag = run.schedule.flag_for(m)
        rewritten = run.rewriter.rewrite(composed.adv_rows, flag, m, model_fn)
        mb = pack_microbatch(rewritten.items, composed.util_rows, run.layout,
                             run.renderer.example, conv)  # fmt: skip
        skipped += len(mb.skipped)
        mbs.append(mb)
        infos.append(rewritten.info)
    flags = [i["flag"] for i in infos]
    ran = sorted({discrete_lib.FLAG_NAMES[i["flag"]] for i in infos
                  if i["pap_rows"] or i["gcg_rows"]})  # fmt: skip
    host = {
        "epoch": epoch,
        "mb_flags": "".join(str(f) for f in flags),
        "mb_pap": flags.count(schedules.FLAG_PAP),
        "mb_gcg": flags.count(schedules.FLAG_GCG),
        "mb_continuous": flags.count(schedules.FLAG_CONTINUOUS),
        "discrete": "+".join(ran) or "none",
        "pap_rows": sum(i["pap_rows"] for i in infos),
        "gcg_rows": sum(i["gcg_rows"] for i in infos),
        "rewrite_fallbacks": sum(i["fallbacks"] for i in infos),
        "pap_missing": sum(i["pap_missing"] for i in infos),
        "pap_absent": sum(i["pap_absent"] for i in infos),
        "techniques": ",".join(str(i["technique"]) for i in infos if i["pap_rows"]),
        "skipped_rows": skipped,
        "discrete_seconds": sum(i["seconds"] for i in infos),
    }
    gcg = [i["gcg_loss"] for i in infos if "gcg_loss" in i]
    if gcg:
        host["gcg_loss"] = float(np.mean(gcg))
    return stack_microbatches(mbs), host


def write_adapter(run: Run, state):
    """``workdir/adapter`` (PEFT) from the LoRA state: staged in a local directory, then moved
    into place (a rename locally; an upload for a URL workdir, ``storage.replace_dir``)."""
    lora = state.lora
    if jax.process_count() > 1:
        lora = jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True), lora)
    out = run.workdir / ADAPTER_DIR
    if jax.process_index() != 0:
        return out
    if storage.is_url(out):
        tmp = Path(tempfile.mkdtemp(prefix="mixat_jax_adapter_"))
    else:
        tmp = storage.local_path(run.workdir) / f".{ADAPTER_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(lora_lib.merge(state.graphdef, lora, state.frozen), tmp, base_model=run.model_dir)
    storage.replace_dir(tmp, out)
    return out


# ------------------------------------------------------------------------------ the run
def run(config, workdir: storage.PathLike, *, reselect: ReselectFn | None = None) -> str:
    """Train; returns "finished", "stopped" (stop_after), "preempted" (SIGTERM) or "interrupted"
    (Ctrl-C). A stop on a signal saves a checkpoint first. ``reselect``: DAT's per-epoch
    re-selection hook (required iff ``config.dat.reselect_every_epoch``)."""
    preempt = ckpt_lib.install_sigterm_handler()
    try:
        return _run(config, workdir, preempt, reselect)
    finally:
        preempt.restore()


def _run(
    config,
    workdir: storage.PathLike,
    preempt: ckpt_lib.PreemptionFlag,
    reselect: ReselectFn | None,
) -> str:
    compiles = CompileCounter()
    # preempt.agree is collective: every process polls it at the same points (before each step,
    # after each GCG step of a rewrite), so all stop at the same step (issue #16)
    r = setup(config, workdir, should_abort=preempt.agree, reselect=reselect)
    cfg = r.cfg
    if jax.process_index() == 0:
        storage.write_text_atomic(r.workdir / CONFIG_FILE,
                                  json.dumps(r.config_json, indent=2) + "\n")  # fmt: skip
    root_key = jax.random.key(cfg.seed)
    ckpt = ckpt_lib.Checkpointer(storage.absolute(r.workdir / CKPT_DIR),
                                 max_to_keep=cfg.keep_checkpoints)  # fmt: skip
    state, start = restore(r, ckpt, root_key)
    _truncate_metrics(r.workdir, start)
    jitted = make_jitted_train_step(cfg.step, r.mesh, rules=cfg.mesh.rules)
    lr_at = lr_schedule(cfg.optim, r.steps)
    writer = MetricWriter(r.workdir)
    progress = Progress(r.steps, every=cfg.log_every, enabled=jax.process_index() == 0)
    status, step = "finished", start
    holder = {"state": state}
    model_fn = lambda: lora_lib.merge(holder["state"].graphdef, holder["state"].lora,
                                      holder["state"].frozen)  # fmt: skip
    if cfg.dat.reselect_every_epoch and reselect is not None:
        r.stream.set_epoch_adv(lambda e: reselect(r, e, model_fn) if e >= 1 else None)

    def save(at: int, state) -> None:
        ckpt.save(at, _ckpt_tree(state, root_key), _meta(r, at), force=True)

    try:
        with jax.set_mesh(r.mesh):
            while step < r.steps:
                if preempt.agree():
                    status = preempt.status
                    break
                t0 = time.perf_counter()
                try:
                    batch_np, host = build_batch(r, step, model_fn)
                except discrete_lib.RewriteAborted:
                    status = preempt.status
                    break
                t1 = time.perf_counter()
                batch, key = global_batch(batch_np, r.mesh), jax.random.fold_in(root_key, step)
                compiles.in_step = True
                state, metrics = jitted(state, batch, key)
                compiles.in_step = False
                holder["state"] = state
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                metrics = step_metrics.drop_absent(metrics)  # an absent term is never NaN
                step += 1
                if not np.isfinite(metrics.get("lr", np.nan)):
                    metrics["lr"] = float(lr_at(step - 1))
                scalars = {**metrics, **host, "step_seconds": time.perf_counter() - t1,
                           "seconds": time.perf_counter() - t0,
                           "train_step_compiles": compiles.train_step,
                           "jit_compiles": compiles.total}  # fmt: skip
                writer.write_scalars(step, scalars)
                progress.update(step, {k: scalars[k] for k in PROGRESS_KEYS if k in scalars})
                if step % cfg.checkpoint_every == 0 or step == r.steps:
                    writer.flush()
                    save(step, state)
                if cfg.stop_after is not None and step >= cfg.stop_after and step < r.steps:
                    status = "stopped"
                    break
        writer.flush()
        if status != "finished":
            save(step, state)
            ckpt.wait_until_finished()
            log(f"{status} at step {step}/{r.steps}; checkpoint saved in {ckpt.directory}; "
                "re-run the same command to resume")  # fmt: skip
            return status
        if start == r.steps:
            log(f"workdir already holds all {r.steps} steps; rewriting the adapter")
        ckpt.wait_until_finished()
        out = write_adapter(r, state)
        log(f"finished {r.steps} steps; adapter in {out}; train-step compiles "
            f"{compiles.train_step}")  # fmt: skip
        return status
    finally:
        writer.close()
        ckpt.close()
