"""Body of the attack CLI (`python -m mixat_jax.attack`, see its docstring for the commands).

GCG (spec mixat.md §6.4) on one behaviour (``OUT/result.json``) or on every behaviour of a
HarmBench CSV + targets JSON (``OUT/results.jsonl``, resumable), or the continuous embedding
attack alone (§5, ``OUT/result.json``); ``OUT/config.json``; ``OUT/losses.png``; one progress
line per step on stderr. Kept apart from the absl entry point so it can be called in-process
(tests, notebooks) without defining flags.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from mixat_jax.attacks.continuous import ContinuousAttackConfig, continuous_attack_model
from mixat_jax.attacks.direct import behavior_with_context
from mixat_jax.attacks.gcg_driver import run_gcg_batch
from mixat_jax.attacks.gcg_presets import GCGConfig, preset
from mixat_jax.behaviors import load_behaviors
from mixat_jax.chat import ChatRenderer
from mixat_jax.hf.load import load_pretrained
from mixat_jax.mesh import MeshConfig, make_mesh
from mixat_jax.objectives import TokenRows


def run(config, workdir: str) -> None:
    """Validates the config, loads the model, runs the attack, writes the outputs."""
    if config.get("attack") not in ("gcg", "continuous"):
        raise ValueError(
            f"config.attack must be 'gcg' or 'continuous', got {config.get('attack')!r}"
        )
    if not config.model:
        raise ValueError("--config.model is required (a Hugging Face model directory)")
    file_mode = bool(config.get("behaviors"))
    if file_mode == bool(config.behavior):
        raise ValueError("give exactly one of --config.behavior=TEXT or --config.behaviors=FILE")
    if not file_mode and not config.target.strip():
        raise ValueError("the target string is empty; give --config.target=TEXT")
    gcg_cfg = _gcg_config(config) if config.attack == "gcg" else None
    jobs = _file_jobs(config, workdir) if file_mode else None
    out = Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    if jobs == []:
        print(f"all behaviours already in {out / 'results.jsonl'}", file=sys.stderr)
        _plot(out)
        return
    model, tokenizer, mesh = _load(config)
    if config.attack == "continuous":
        result = _continuous(config, model, tokenizer)
        (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    elif jobs is None:
        result = _gcg_jobs(
            config, gcg_cfg, model, tokenizer, mesh, [("", config.behavior, config.target)]
        )[0]
        (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    else:
        per = max(1, int(config.behaviors_per_batch))
        for i in range(0, len(jobs), per):
            rows = _gcg_jobs(config, gcg_cfg, model, tokenizer, mesh, jobs[i : i + per])
            with open(out / "results.jsonl", "a", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
    _plot(out)


def _gcg_config(config):
    fields = {f for f in GCGConfig.__dataclass_fields__ if f in config}
    return preset(config.preset, **{f: config[f] for f in fields})


def _file_jobs(config, workdir: str) -> list[tuple[str, str, str]]:
    """(id, behaviour text with context, target) for behaviours not yet in results.jsonl."""
    if config.attack != "gcg":
        raise ValueError("behaviour files are supported for the GCG attack only")
    if not config.targets:
        raise ValueError("--config.behaviors needs --config.targets=FILE.json (HarmBench targets)")
    behaviors = load_behaviors(config.behaviors, targets=config.targets, limit=config.limit or None)
    missing = [b.id for b in behaviors if not b.target]
    if missing:
        raise ValueError(f"no target for behaviour(s) {missing[:3]} in {config.targets}")
    done = set()
    path = Path(workdir) / "results.jsonl"
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                done.add(json.loads(line)["id"])
    return [(b.id, behavior_with_context(b), b.target) for b in behaviors if b.id not in done]


def _load(config):
    m = config.mesh
    mesh = make_mesh(MeshConfig(data=m.data, fsdp=m.fsdp, tensor=m.tensor))
    if jax.device_count() == 1:
        mesh = None
    model, tokenizer = load_pretrained(
        config.model, dtype=config.dtype or None, adapter=config.adapter or None, mesh=mesh,
        kind="causal",
    )  # fmt: skip
    return model, tokenizer, mesh


def _gcg_jobs(config, gcg_cfg, model, tokenizer, mesh, jobs) -> list[dict]:
    def report(r):
        tag = f"[{jobs[r.behavior_index][0] or 'behavior'}] " if len(jobs) > 1 or jobs[0][0] else ""
        print(
            f"{tag}gcg step {r.step}/{r.num_steps} | loss {r.loss:.4f} best {r.best_loss:.4f} | "
            f"{r.seconds:.3f} s | suffix {r.suffix!r}",
            file=sys.stderr,
            flush=True,
        )

    results = run_gcg_batch(
        model, tokenizer, [j[1] for j in jobs], [j[2] for j in jobs], gcg_cfg,
        seed=[config.seed + i for i in range(len(jobs))], mesh=mesh, progress=report,
    )  # fmt: skip
    rows = []
    for (bid, _, _), r in zip(jobs, results, strict=True):
        row = {"id": bid} if bid else {}
        rows.append(row | {"attack": "gcg", "preset": config.preset} | r.to_json())
    return rows


def _continuous(config, model, tokenizer) -> dict:
    cfg = ContinuousAttackConfig(
        eps=config.eps, iters=config.iters, lr=config.lr, optimizer=config.optimizer,
        relative_lr=config.relative_lr, init=config.init, best_iterate=config.best_iterate,
        dropout=config.dropout,
    )  # fmt: skip
    ex = ChatRenderer(tokenizer).example(config.behavior, config.target)
    rows = TokenRows(*(np.asarray([x]) for x in (ex.ids, [True] * len(ex.ids), ex.prompt_mask,
                                                   ex.response_mask)))  # fmt: skip
    key = jax.random.key(config.seed)
    t0 = time.perf_counter()
    _, diag = continuous_attack_model(model, rows, cfg=cfg, key=key)
    diag = jax.device_get(diag)
    t1 = time.perf_counter()  # first call = compile + run; the second (same shapes) only runs
    jax.block_until_ready(continuous_attack_model(model, rows, cfg=cfg, key=key))
    run_seconds = time.perf_counter() - t1
    seconds = t1 - t0
    losses = [float(x) for x in np.asarray(diag["loss_trace"]).reshape(-1)]
    for i, loss in enumerate(losses):
        print(f"continuous iter {i + 1}/{len(losses)} | loss {loss:.4f}", file=sys.stderr)
    final = float(diag["loss_after"])
    print(f"continuous final loss {final:.4f}", file=sys.stderr)
    scalars = {k: float(np.asarray(v)) for k, v in diag.items() if np.asarray(v).size == 1}
    return {
        "attack": "continuous", "behavior": config.behavior, "target": config.target,
        "best_loss": final, "losses": losses, "num_steps": len(losses),
        "seconds_total": seconds, "seconds_per_step": run_seconds / max(1, cfg.iters),
        "compile_seconds": max(0.0, seconds - run_seconds), "diagnostics": scalars,
    }  # fmt: skip


def _plot(out: Path) -> None:
    """OUT/losses.png: the loss curve of result.json or every line of results.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    if (out / "result.json").exists():
        runs.append(json.loads((out / "result.json").read_text()))
    if (out / "results.jsonl").exists():
        lines = (out / "results.jsonl").read_text(encoding="utf-8").splitlines()
        runs += [json.loads(x) for x in lines if x.strip()]
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=r.get("id") or r.get("attack"))
    ax.set_xlabel("step")
    ax.set_ylabel("target loss")
    if 0 < len(runs) <= 10:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "losses.png", dpi=100)
    plt.close(fig)
