"""DAT Stage A end to end (DAT spec §2.2, §2.5): `run(cfg, workdir) -> summary dict`.

1. Setup, all bad input first (one-line ValueErrors, nothing written into the workdir): a
   workdir holding another config; missing behaviour / target files; a behaviour without
   targets; a diffusion model that is not a masked-diffusion LM or whose tokenizer cannot encode
   the answer prefix; a target model that is not causal; a judge model that cannot be loaded.
2. The draw plan (`draws`): N draws per behaviour, cut into units of `batch_size` draws. Every
   process runs its round-robin share of the units on its own devices (a process-local mesh; the
   batch is sharded over its data axes); one sampler canvas length for the whole run (from the
   longest target), so the sampler compiles once.
3. Per unit: inpaint (`diffusion.inpaint.inpaint_rows`, one call), target loss (one call),
   greedy completions and judge scores (`scoring`); the unit's records are appended to the
   process's shard (`shards`). Units already in any shard are skipped (resume).
4. When every unit is done (after a barrier across processes when distributed), process 0
   merges: `samples.jsonl` (behaviour order, then draw), the selection (`selection`),
   `selected.jsonl` (behaviour order, then selection rank), `summary.png`, and `summary.json`
   last (it marks a finished run: re-running returns it and writes nothing).

SIGTERM / Ctrl-C stop after the unit in progress is written (its line is complete; with several
processes the decision is agreed once per round of units, so all stop after the same round) and raise
`cli.Stopped` (exit 143 / 130); `stop_after_units` (debug) stops likewise with status 0.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from mixat_jax import cli as cli_lib
from mixat_jax import mesh as mesh_lib
from mixat_jax.behaviors import Behavior, load_behaviors, load_targets
from mixat_jax.dat import draws as draws_lib
from mixat_jax.dat import sample_config as sc
from mixat_jax.dat import selection as selection_lib
from mixat_jax.dat import shards as shards_lib
from mixat_jax.dat import summary as summary_lib
from mixat_jax.dat.scoring import TargetScorer, judge_scores
from mixat_jax.diffusion import inpaint as inpaint_lib
from mixat_jax.hf.load import load_pretrained
from mixat_jax.judges.registry import make_judge
from mixat_jax.tiny_model import build_tiny_checkpoint, build_tiny_diffusion_checkpoint
from mixat_jax.tokenizer_build import default_corpus
from mixat_jax.training.checkpoint import install_sigterm_handler
from mixat_jax.training.synthetic import safety_world

CONFIG_FILE = "config.json"
INPUTS_FILE = "inputs.json"  # fingerprint of the behaviours and targets the run started with
SAMPLES_FILE = "samples.jsonl"
SELECTED_FILE = "selected.jsonl"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "summary.png"
RECORD_FIELDS = ("behavior_id", "behavior", "draw", "prompt", "target", "log_likelihood",
                 "target_loss", "judge_score", "completion", "selected")  # fmt: skip


def log(msg: str) -> None:
    prefix = "[mixat_jax.dat_sample]"
    if jax.process_count() > 1:
        prefix = f"[mixat_jax.dat_sample p{jax.process_index()}]"
    print(f"{prefix} {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ workdir
def config_json(cfg: sc.SampleConfig) -> dict[str, Any]:
    return json.loads(json.dumps(sc.to_config_dict(cfg).to_dict(), default=str))


def check_workdir(workdir: Path, cfg_json: dict[str, Any]) -> None:
    """Refuse a workdir that holds a Stage A run of another config (its config.json differs)."""
    cli_lib.check_workdir_config(
        workdir, cfg_json, free_keys=sc.RESUME_FREE_KEYS, config_file=CONFIG_FILE,
        what="a Stage A run",
    )  # fmt: skip


# ------------------------------------------------------------------------------ tiny inputs
@dataclass(frozen=True)
class Inputs:
    diffusion_model: str
    target_model: str
    behaviors: str
    targets: str


def tiny_inputs(spec: sc.TinySpec, workdir: Path) -> Inputs:
    """Tiny random LLaDA-layout + causal checkpoints and the synthetic world's training
    behaviours (CSV) and targets (JSON), built once into the cache directory."""
    root = Path(spec.cache_dir) if spec.cache_dir else workdir / "tiny"
    name = (f"dat_v{spec.vocab_size}_h{spec.hidden_size}_l{spec.num_layers}_a{spec.num_heads}"
            f"_c{spec.corpus_chars}_s{spec.seed}_w{spec.world_seed}")  # fmt: skip
    path = root / name
    if not (path / "targets.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        corpus = default_corpus(spec.corpus_chars, seed=spec.seed)
        shape = dict(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                     num_layers=spec.num_layers, num_heads=spec.num_heads, seed=spec.seed,
                     corpus=corpus)  # fmt: skip
        build_tiny_diffusion_checkpoint(tmp / "llada", layout="llada", **shape)
        build_tiny_checkpoint(tmp / "target", num_kv_heads=spec.num_heads // 2, **shape)
        by_id: dict[str, dict[str, Any]] = {}
        for row in safety_world(spec.world_seed)["train_adv"]:
            entry = by_id.setdefault(row.behavior_id, {"behavior": row.behavior, "targets": []})
            entry["targets"].append(row.target)
        with (tmp / "behaviors.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["Behavior", "BehaviorID"])
            w.writerows([e["behavior"], bid] for bid, e in by_id.items())
        (tmp / "targets.json").write_text(
            json.dumps({bid: e["targets"] for bid, e in by_id.items()}, indent=1) + "\n"
        )
        try:
            os.replace(tmp, path)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return Inputs(str(path / "llada"), str(path / "target"), str(path / "behaviors.csv"),
                  str(path / "targets.json"))  # fmt: skip


def inputs_fingerprint(behaviors: list[Behavior]) -> str:
    """sha256 of what Stage A reads from the behaviour and target files: each behaviour's id,
    text, context and targets, in order."""
    rows = [[b.id, b.behavior, b.context, list(b.targets)] for b in behaviors]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()


def check_inputs(workdir: Path, fingerprint: str) -> None:
    """Refuse to resume a workdir whose run started from other behaviours or targets (the config
    can be unchanged while the files it names were edited)."""
    path = workdir / INPUTS_FILE
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text()).get("behaviors_sha256")
    except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"{path} is not valid JSON; use a new --workdir") from None
    if old != fingerprint:
        raise ValueError(
            f"the behaviours/targets changed since the run in {str(workdir)!r} started (sha256 "
            f"{str(old)[:12]} -> {fingerprint[:12]}); use a new --workdir or restore the files"
        )


# ------------------------------------------------------------------------------ setup
def read_behaviors(cfg: sc.SampleConfig, inputs: Inputs) -> list[Behavior]:
    """The first `limit` behaviours, each with its targets (one-line errors otherwise)."""
    if not Path(inputs.behaviors).is_file():
        raise ValueError(
            f"behaviours file not found: {inputs.behaviors}; set --config.behaviors to a "
            "HarmBench-style CSV"
        )
    targets = load_targets(inputs.targets)
    behaviors = load_behaviors(inputs.behaviors, targets=targets, limit=cfg.limit)
    if not behaviors:
        raise ValueError(f"{inputs.behaviors} holds no behaviours")
    ids = [b.id for b in behaviors]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"behaviour id {dup!r} occurs twice in {inputs.behaviors}")
    for b in behaviors:
        if not b.targets or not all(t.strip() for t in b.targets):
            raise ValueError(
                f"behaviour {b.id!r} has no (non-empty) targets in {inputs.targets}; add its "
                "targets or drop it from the behaviours file"
            )
    return behaviors


@dataclass
class Setup:
    cfg: sc.SampleConfig
    behaviors: list[Behavior]
    units: list[draws_lib.WorkUnit]
    target_idx: dict[str, np.ndarray]
    answers: dict[str, list[list[int]]]  # behaviour id -> encoded answer of each target
    diffusion: Any  # (graphdef, state)
    diffusion_tokenizer: Any
    sampler: Any
    pad_id: int
    lead: list[int]
    length: int
    scorer: TargetScorer
    judge: Any
    mesh: Any


def make_mesh(cfg: sc.SampleConfig):
    """A process-local mesh (each process samples and scores its own units)."""
    devices = jax.local_devices()
    dims = (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    if -1 not in dims:  # a fixed mesh may use fewer devices than the process has
        devices = devices[: int(np.prod(dims))]
    mesh = mesh_lib.make_mesh(cfg.mesh, devices=devices)
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    for name in ("batch_size", "gen_batch_size"):
        if getattr(cfg, name) % rows:
            raise ValueError(
                f"{name}={getattr(cfg, name)} is not divisible by the mesh's data x fsdp = {rows} "
                f"devices; use a multiple of {rows} or set --config.mesh.data"
            )
    return mesh


def setup(cfg: sc.SampleConfig, workdir: Path) -> Setup:
    inputs = (
        tiny_inputs(cfg.tiny, workdir)
        if cfg.tiny is not None
        else Inputs(cfg.diffusion_model, cfg.target_model, cfg.behaviors, cfg.targets)
    )
    behaviors = read_behaviors(cfg, inputs)
    mesh = make_mesh(cfg)
    dtype = "float32" if cfg.tiny is not None else cfg.dtype
    d_model, d_tok = load_pretrained(inputs.diffusion_model, dtype=dtype, mesh=mesh,
                                     kind="diffusion")  # fmt: skip
    s = cfg.sampler
    sampler = inpaint_lib.default_sampler(
        d_model.cfg, cfg.prompt_length, steps=s.steps, temperature=s.temperature,
        remasking=s.remasking, cond_dropout=s.cond_dropout,
        global_remask_every=s.global_remask_every, global_remask_count=s.global_remask_count,
    )  # fmt: skip
    sampler, pad_id, lead = inpaint_lib.prepare_sampler(
        d_model.cfg, d_tok, prompt_length=cfg.prompt_length, sampler=sampler,
        answer_prefix=cfg.answer_prefix,
    )  # fmt: skip
    answers = {
        b.id: inpaint_lib.encode_answers(d_tok, b.targets, cfg.answer_prefix) for b in behaviors
    }
    length = inpaint_lib.canvas_length(
        [a for rows in answers.values() for a in rows], prompt_length=cfg.prompt_length,
        lead=lead, max_canvas=d_model.cfg.max_position_embeddings,
    )  # fmt: skip
    t_model, t_tok = load_pretrained(inputs.target_model, dtype=dtype, mesh=mesh,
                                     adapter=cfg.target_adapter, kind="causal")  # fmt: skip
    scorer = TargetScorer(t_model, t_tok, max_new_tokens=cfg.max_new_tokens,
                          gen_batch_size=cfg.gen_batch_size, system_prompt=cfg.system_prompt,
                          mesh=mesh)  # fmt: skip
    judge = build_judge(cfg)
    return Setup(
        cfg=cfg, behaviors=behaviors,
        units=draws_lib.plan_units(behaviors, cfg.num_samples, cfg.batch_size),
        target_idx={b.id: draws_lib.target_indices(cfg.seed, b.id, len(b.targets),
                                                     cfg.num_samples) for b in behaviors},
        answers=answers, diffusion=nnx.split(d_model), diffusion_tokenizer=d_tok,
        sampler=sampler, pad_id=pad_id, lead=lead, length=length, scorer=scorer, judge=judge,
        mesh=mesh,
    )  # fmt: skip


def build_judge(cfg: sc.SampleConfig):
    if cfg.judge == "refusal":
        return make_judge("refusal")
    if cfg.judge == "keyword":
        return make_judge("keyword", harmful_markers=list(cfg.judge_markers))
    kwargs: dict[str, Any] = {"path": cfg.judge_model}
    if cfg.judge == "strongreject":
        kwargs["threshold"] = cfg.judge_threshold
    return make_judge(cfg.judge, **kwargs)


# ------------------------------------------------------------------------------ one unit
def run_unit(s: Setup, unit: draws_lib.WorkUnit) -> list[dict[str, Any]]:
    """The candidate records of one unit (every field but `selected`)."""
    cfg = s.cfg
    b = s.behaviors[unit.behavior_index]
    t_idx = s.target_idx[b.id][unit.first_draw : unit.first_draw + unit.num_draws]
    targets = [b.targets[int(i)] for i in t_idx]
    rows = [s.answers[b.id][int(i)] for i in t_idx]
    rows += [rows[-1]] * (cfg.batch_size - len(rows))  # fixed batch: one compile, fixed keys
    graphdef, state = s.diffusion
    inpainted = inpaint_lib.inpaint_rows(
        graphdef, state, s.diffusion_tokenizer, rows,
        draws_lib.unit_key(cfg.seed, b.id, unit.unit), prompt_length=cfg.prompt_length,
        sampler=s.sampler, pad_id=s.pad_id, lead=s.lead, length=s.length, mesh=s.mesh,
    )[: unit.num_draws]  # fmt: skip
    prompts = [p.prompt for p in inpainted]
    losses = s.scorer.target_losses(prompts, targets, batch_rows=cfg.batch_size)
    completions = s.scorer.completions(prompts)
    scores = judge_scores(s.judge, [b] * len(prompts), completions)
    return [
        {"behavior_id": b.id, "behavior": b.behavior, "draw": unit.first_draw + j,
         "prompt": prompts[j], "target": targets[j],
         "log_likelihood": min(0.0, float(inpainted[j].log_likelihood)),
         "target_loss": float(losses[j]), "judge_score": float(scores[j]),
         "completion": completions[j]}
        for j in range(len(prompts))
    ]  # fmt: skip


# ------------------------------------------------------------------------------ merge
def merge(
    cfg: sc.SampleConfig,
    behaviors: list[Behavior],
    units: list[draws_lib.WorkUnit],
    workdir: Path,
    cfg_json: dict[str, Any],
    timing: dict[str, Any],
) -> dict[str, Any]:
    """samples.jsonl, selected.jsonl, summary.png and (last) summary.json from the shards."""
    done = shards_lib.read_all(workdir)
    missing = [u.key for u in units if u.key not in done]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(units)} work units are missing from {workdir / 'shards'} "
            f"(first: {missing[0]}); re-run the same command to finish them"
        )
    by_behavior: dict[str, list[dict]] = defaultdict(list)
    seconds = 0.0
    for u in units:
        block = done[u.key]
        seconds += float(block.get("seconds", 0.0))
        by_behavior[u.behavior_id] += block["records"]
    records_by_behavior, selected_lines = [], []
    for b in behaviors:
        recs = sorted(by_behavior[b.id], key=lambda r: r["draw"])
        if [r["draw"] for r in recs] != list(range(cfg.num_samples)):
            raise ValueError(f"shards hold a wrong set of draws for behaviour {b.id!r}; "
                             "use a new --workdir")  # fmt: skip
        chosen = selection_lib.select(
            [r["judge_score"] for r in recs], [r["target_loss"] for r in recs],
            [r["draw"] for r in recs], [r["prompt"] for r in recs], rule=cfg.selection,
            k=cfg.num_selected, threshold=cfg.judge_threshold,
            diversity_threshold=cfg.diversity_threshold,
        )  # fmt: skip
        keep = set(chosen)
        recs = [{**{f: r[f] for f in RECORD_FIELDS[:-1]}, "selected": i in keep}
                for i, r in enumerate(recs)]  # fmt: skip
        records_by_behavior.append(recs)
        selected_lines += [recs[i] for i in chosen]
    all_recs = [r for recs in records_by_behavior for r in recs]
    n = len(all_recs)
    timing = {**timing, "unit_seconds_total": round(seconds, 3),
              "samples_per_s_per_process": round(n / seconds, 3) if seconds > 0 else None}  # fmt: skip
    summary = summary_lib.build(records_by_behavior, threshold=cfg.judge_threshold,
                                config=cfg_json, timing=timing)  # fmt: skip
    shards_lib.write_atomic(workdir / SAMPLES_FILE,
                            "".join(shards_lib.dumps(r) + "\n" for r in all_recs))  # fmt: skip
    shards_lib.write_atomic(workdir / SELECTED_FILE,
                            "".join(shards_lib.dumps(r) + "\n" for r in selected_lines))  # fmt: skip
    summary_lib.plot(all_recs, workdir / PLOT_FILE)
    shards_lib.write_atomic(workdir / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")
    return summary


# ------------------------------------------------------------------------------ the run
def finished_summary(workdir: Path) -> dict[str, Any] | None:
    path = workdir / SUMMARY_FILE
    if path.exists() and (workdir / SAMPLES_FILE).exists() and (workdir / SELECTED_FILE).exists():
        return json.loads(path.read_text())
    return None


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # lazy: only distributed runs

        multihost_utils.sync_global_devices(name)


def agreed_rounds(n_todo: int) -> int:
    """Rounds of the unit loop: the largest number of units left on any process (COLLECTIVE when
    distributed), so every process takes part in every round's stop decision."""
    if jax.process_count() == 1:
        return n_todo
    from jax.experimental import multihost_utils  # lazy: only distributed runs

    return int(np.max(multihost_utils.process_allgather(np.asarray([n_todo], np.int32))))


def run(cfg: sc.SampleConfig, workdir: str | Path) -> dict[str, Any]:
    """Stage A (see module doc). Returns the summary; resumable; a finished workdir is a no-op."""
    workdir = Path(workdir)
    cfg.check_runnable()
    cfg_json = config_json(cfg)
    check_workdir(workdir, cfg_json)
    done = finished_summary(workdir)
    if done is not None:
        log(f"{workdir / SUMMARY_FILE} exists: the run is finished; nothing to do")
        return done
    t_setup = time.perf_counter()
    s = setup(cfg, workdir)
    fingerprint = inputs_fingerprint(s.behaviors)
    check_inputs(workdir, fingerprint)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        shards_lib.write_atomic(workdir / CONFIG_FILE, json.dumps(cfg_json, indent=2) + "\n")
        inputs = {"behaviors_sha256": fingerprint, "num_behaviors": len(s.behaviors)}
        shards_lib.write_atomic(workdir / INPUTS_FILE, json.dumps(inputs, indent=2) + "\n")
    writer = shards_lib.ShardWriter(workdir, jax.process_index())
    mine = draws_lib.assigned(s.units, jax.process_index(), jax.process_count())
    have = shards_lib.read_all(workdir)
    todo = [u for u in mine if u.key not in have]
    log(f"{len(s.behaviors)} behaviours x {cfg.num_samples} draws = {len(s.units)} units of "
        f"<= {cfg.batch_size}; this process: {len(mine)} units, {len(mine) - len(todo)} already "
        f"done; mesh {dict(s.mesh.shape)}; canvas length {s.length}; setup "
        f"{time.perf_counter() - t_setup:.1f} s")  # fmt: skip
    flag = install_sigterm_handler()
    rounds = agreed_rounds(len(todo))
    t0 = time.perf_counter()
    samples = n_done = 0
    try:
        for r in range(rounds):
            if r < len(todo):
                unit = todo[r]
                t_unit = time.perf_counter()
                records = run_unit(s, unit)
                writer.append(unit.behavior_id, unit.unit, time.perf_counter() - t_unit, records)
                samples += len(records)
                n_done += 1
                elapsed = time.perf_counter() - t0
                if n_done % cfg.log_every == 0 or n_done == len(todo):
                    rate = samples / elapsed
                    eta = (elapsed / n_done) * (len(todo) - n_done)
                    log(f"units {len(mine) - len(todo) + n_done}/{len(mine)} (this process), "
                        f"{rate:.2f} samples/s, ETA {eta:.0f} s")  # fmt: skip
            # One agreed decision per round (issue #16): every process stops after the same
            # round, so none is left waiting at the merge barrier for a peer that has exited.
            if flag.agree() and r + 1 < rounds:  # after the last round: merge instead
                code = cli_lib.EXIT_INTERRUPTED if flag.status == "interrupted" else (
                    cli_lib.EXIT_PREEMPTED)  # fmt: skip
                raise cli_lib.Stopped(
                    f"{flag.status} after {n_done} units; finished units are in "
                    f"{writer.path}; re-run the same command to continue", code)  # fmt: skip
            if cfg.stop_after_units and r + 1 >= cfg.stop_after_units and r + 1 < rounds:
                raise cli_lib.Stopped(
                    f"stopped after {n_done} units (stop_after_units); re-run without it to "
                    "continue", 0)  # fmt: skip
    finally:
        flag.restore()
    wall = time.perf_counter() - t0
    barrier("dat_stage_a_units")
    timing = {"processes": jax.process_count(), "wall_seconds_last_run": round(wall, 3),
              "samples_last_run_this_process": samples}  # fmt: skip
    summary = None
    if jax.process_index() == 0:
        summary = merge(cfg, s.behaviors, s.units, workdir, cfg_json, timing)
        log(f"wrote {workdir / SAMPLES_FILE} ({summary['num_candidates']} candidates), "
            f"{workdir / SELECTED_FILE} ({summary['num_selected']}), {workdir / SUMMARY_FILE}")  # fmt: skip
    barrier("dat_stage_a_merged")
    return summary if summary is not None else json.loads((workdir / SUMMARY_FILE).read_text())
