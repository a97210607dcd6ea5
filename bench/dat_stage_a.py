"""Measured samples/s of the whole DAT Stage A pipeline on CPU (`mixat_jax.dat.stage_a.run`).

    PYTHONPATH=. JAX_PLATFORMS=cpu python bench/dat_stage_a.py [--out bench/results/dat_stage_a]

Two sizes of random tiny models (built by `mixat_jax.tiny_model` through `config.tiny`):
`tiny` = configs/dat/sample.py:tiny's models (vocab 384, hidden 32, 2 layers; P = 8, 16 new
tokens) and `bigger` (vocab 2048, hidden 256, 4 layers; P = 32, 32 sampler steps, 64 new
tokens). Each size runs Stage A twice in one process on fresh workdirs: the first run compiles,
the second reuses the compiled programs (the steady state of a long run). Reported per run:
wall seconds of `run()` (setup, all units, merge, plot), samples/s over that wall time, and the
summary's `samples_per_s_per_process` (candidate records / summed unit seconds: inpainting +
target loss + greedy generation + judge, no setup). Writes OUT.json and OUT.md with the CPU model
(`lscpu`) and the load average before each run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mixat_jax.dat import sample_config as sc
from mixat_jax.dat import stage_a
from mixat_jax.mesh import MeshConfig

SIZES = {
    "tiny": dict(tiny=sc.TinySpec(), prompt_length=8, sampler=sc.SamplerSpec(steps=8),
                 max_new_tokens=16),
    "bigger": dict(tiny=sc.TinySpec(vocab_size=2048, hidden_size=256, num_layers=4, num_heads=4,
                                    corpus_chars=200_000),
                   prompt_length=32, sampler=sc.SamplerSpec(steps=32), max_new_tokens=64),
}  # fmt: skip


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results/dat_stage_a")
    p.add_argument("--limit", type=int, default=2)
    p.add_argument("--num_samples", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=16)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, size in SIZES.items():
            size = {**size, "tiny": dataclasses.replace(size["tiny"], cache_dir=str(tmp / name))}
            cfg = sc.SampleConfig(
                diffusion_model="", target_model="", limit=args.limit,
                num_samples=args.num_samples, num_selected=4, judge="refusal",
                batch_size=args.batch_size, gen_batch_size=args.batch_size, dtype="float32",
                mesh=MeshConfig(data=1, fsdp=1, tensor=1), log_every=10**6, **size,
            )  # fmt: skip
            stage_a.tiny_inputs(cfg.tiny, tmp)  # build the checkpoints outside the timing
            for attempt in ("first (compiles)", "second (compiled)"):
                work = tmp / f"{name}_{len(rows)}"
                load = os.getloadavg()[0]
                t0 = time.perf_counter()
                summary = stage_a.run(cfg, work)
                wall = time.perf_counter() - t0
                n = summary["num_candidates"]
                rows.append({
                    "size": name, "run": attempt, "candidates": n, "wall_s": round(wall, 2),
                    "samples_per_s_wall": round(n / wall, 2),
                    "samples_per_s_units": summary["timing"]["samples_per_s_per_process"],
                    "load_avg_1m": round(load, 2),
                })  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
                shutil.rmtree(work, ignore_errors=True)
    cpu = cpu_model()
    cfg_line = (f"{args.limit} behaviours x N = {args.num_samples}, {args.batch_size} draws per "
                "unit, refusal judge, float32, one CPU device")  # fmt: skip
    table = [f"# DAT Stage A on CPU ({cpu}, {os.cpu_count()} cores)", "", cfg_line, "",
             "| size | run | candidates | wall s | samples/s (wall) | samples/s (units) | load |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    table += [f"| {r['size']} | {r['run']} | {r['candidates']} | {r['wall_s']} | "
              f"{r['samples_per_s_wall']} | {r['samples_per_s_units']} | {r['load_avg_1m']} |"
              for r in rows]  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps(
            {"args": vars(args), "cpu": cpu, "cores": os.cpu_count(), "rows": rows}, indent=2
        )
        + "\n"  # fmt: skip
    )
    out.with_suffix(".md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
