"""Train-step time: mixat_jax (jitted MixAT/CAT step) vs the PyTorch reference step, same CPU.

    python bench/train_step_vs_torch.py --torch_script /work/shared/bench/torch_cat_step.py \
        [--model DIR] [--adv 1] [--util 7] [--len 128] [--prompt_len 64] [--iters 10] \
        [--steps 3] [--rounds 3] [--threads 2] [--lora_r 64] [--out bench/results/train_step_vs_torch]
    python bench/train_step_vs_torch.py --torch_script bench/torch_mixat_accum_step.py \
        --micro_batches 8 --out bench/results/train_step_vs_torch_g8     # a full optimizer step

Both sides run one micro-batch step on the same tiny HF checkpoint (built here with
``mixat_jax.tiny_model`` unless ``--model`` is given) and batch shape: 10 signed-gradient
attack steps on the adversarial row's prompt embeddings, 0.5 away + 0.5 toward + 1.0 utility
with soft cutoffs, LoRA dropout 0.1, clip 0.3, AdamW. The torch script (HF model + peft, the
reference algorithm) runs as a subprocess in this environment; its path is an argument (nothing
from it is imported).

Fairness: one run, interleaved. The jitted step is compiled first; then ``--rounds`` rounds each
time ``--steps`` torch steps (a fresh subprocess, its warm-up step excluded, as in the torch
script) and right after ``--steps`` jax steps (new batch and key each step). Reported: the
median over rounds of each side's per-round median step time, their ratio torch / jax, the per-round
ratios, and the 1-minute load average before every measurement (torch's OpenMP threads slow down
by an order of magnitude on an oversubscribed CPU; the per-round ratios show how much the load
moved the result). Writes ``--out`` ``.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def torch_step_seconds(script: Path, model_dir: Path, a) -> dict:
    cmd = [sys.executable, str(script), "--model", str(model_dir), "--adv", str(a.adv),
           "--util", str(a.util), "--len", str(a.len), "--prompt_len", str(a.prompt_len),
           "--iters", str(a.iters), "--steps", str(a.steps), "--threads", str(a.threads),
           "--lora_r", str(a.lora_r)]  # fmt: skip
    if a.micro_batches > 1:
        cmd += ["--micro_batches", str(a.micro_batches)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"torch step failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def random_batch(vocab: int, a, seed: int):
    """One optimizer step's batch: ``micro_batches`` micro-batches stacked on a leading G axis
    (none for G = 1) in the training layout; prompt = the first ``prompt_len`` tokens."""
    import numpy as np

    g = getattr(a, "micro_batches", 1)
    if g > 1:
        parts = [random_micro_batch(vocab, a, seed * 1000 + i) for i in range(g)]
        return {k: np.stack([p[k] for p in parts]) for k in parts[0]}
    return random_micro_batch(vocab, a, seed)


def random_micro_batch(vocab: int, a, seed: int):
    """One micro-batch in the training layout: prompt = first ``prompt_len`` tokens."""
    import numpy as np

    rng = np.random.default_rng(seed)
    full = np.ones((1, a.len), bool)
    prompt = np.zeros((1, a.len), bool)
    prompt[:, : a.prompt_len] = True
    target = ~prompt
    away = rng.integers(3, vocab, (a.adv, a.len), dtype=np.int32)
    toward = away.copy()
    toward[:, a.prompt_len :] = rng.integers(3, vocab, (a.adv, a.len - a.prompt_len))
    util = rng.integers(3, vocab, (a.util, a.len), dtype=np.int32)
    rep = lambda m, n: np.repeat(m, n, axis=0)  # noqa: E731
    return {
        "away_ids_AxL": away, "away_mask_AxL": rep(full, a.adv),
        "away_prompt_mask_AxL": rep(prompt, a.adv), "away_target_mask_AxL": rep(target, a.adv),
        "toward_ids_AxL": toward, "toward_mask_AxL": rep(full, a.adv),
        "toward_prompt_mask_AxL": rep(prompt, a.adv),
        "toward_target_mask_AxL": rep(target, a.adv), "adv_valid_A": np.ones((a.adv,), bool),
        "util_ids_UxM": util, "util_mask_UxM": rep(full, a.util),
        "util_target_mask_UxM": rep(target, a.util), "util_valid_U": np.ones((a.util,), bool),
    }  # fmt: skip


class JaxStep:
    """The jitted MixAT/CAT step on the bench model; ``time_steps(n)`` times n fresh steps."""

    def __init__(self, model_dir: Path, a):
        import jax

        from mixat_jax import mesh as mesh_lib
        from mixat_jax import steps as steps_lib
        from mixat_jax.hf.load import load_pretrained
        from mixat_jax.models.config import LoraConfig
        from mixat_jax.training.optim import OptimConfig, make_optimizer
        from mixat_jax.training.state import init_train_state, place_train_state
        from mixat_jax.training.step_config import StepConfig

        self.jax, self.a = jax, a
        model, _ = load_pretrained(model_dir, dtype="float32", with_tokenizer=False)
        model.add_lora(LoraConfig.make(r=a.lora_r, alpha=16, dropout=0.1), 0)
        self.mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(1, 1, 1), jax.devices()[:1])
        tx = make_optimizer(OptimConfig(schedule="constant"), 1000)
        cfg = StepConfig(variant="cat")
        cfg = cfg.replace(attack=cfg.attack.__class__(iters=a.iters))
        self.vocab = model.cfg.vocab_size
        with jax.set_mesh(self.mesh):
            self.state = place_train_state(init_train_state(model, tx), self.mesh)
            self.step = steps_lib.make_jitted_train_step(cfg, self.mesh)
            t0 = time.perf_counter()
            self.state, m = self.step(self.state, random_batch(self.vocab, a, 0), jax.random.key(0))
            jax.block_until_ready(m)
        self.first_step_seconds = time.perf_counter() - t0
        self.calls, self.loss = 0, float(m["loss"])

    def time_steps(self, n: int) -> list[float]:
        jax, times = self.jax, []
        with jax.set_mesh(self.mesh):
            for _ in range(n):
                self.calls += 1
                batch = random_batch(self.vocab, self.a, self.calls)
                t0 = time.perf_counter()
                self.state, m = self.step(self.state, batch, jax.random.key(self.calls))
                jax.block_until_ready(m)
                times.append(time.perf_counter() - t0)
        self.loss = float(m["loss"])
        return times


def write_markdown(path: Path, r: dict) -> None:
    t, j = r["torch"], r["jax"]
    rows = [
        ("seconds / step (median of rounds)", f"{t['seconds_per_step']:.3f}", f"{j['seconds_per_step']:.3f}"),
        ("per-round medians", ", ".join(f"{x:.3f}" for x in t["round_medians"]),
         ", ".join(f"{x:.3f}" for x in j["round_medians"])),
        ("first step (compile)", "–", f"{j['first_step_seconds']:.1f} s"),
        ("speed-up (torch / jax)", "1×", f"**{r['speedup_torch_over_jax']:.2f}×**"),
    ]  # fmt: skip
    a = r["args"]
    lines = [
        "# Train step: mixat_jax vs PyTorch reference (CPU, same run, interleaved)",
        "",
        f"{a.get('micro_batches', 1)} micro-batch(es) per optimizer step, each "
        f"{a['adv']} away/toward row(s) + {a['util']} utility rows of {a['len']} tokens "
        f"(prompt {a['prompt_len']}), {a['iters']} attack iterations, LoRA r={a['lora_r']} "
        f"all-linear, dropout 0.1; tiny llama (hidden {a['hidden']}, {a['layers']} layers, "
        f"vocab {a['vocab']}); {r['cpus']} CPUs, torch threads {a['threads']}; "
        f"{a['rounds']} rounds × {a['steps']} steps per side.",
        "",
        "| | torch + peft | mixat_jax |",
        "|---|---|---|",
        *[f"| {k} | {x} | {y} |" for k, x, y in rows],
        "",
        f"Per-round ratios: {', '.join(f'{x:.2f}' for x in r['round_ratios'])}. "
        f"1-min load average before each measurement: "
        f"{', '.join(f'{x:.2f}' for x in r['load_average_1m'])}.",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--torch_script", required=True, help="path to torch_cat_step.py")
    p.add_argument("--model", default="", help="HF model dir (default: build a tiny one)")
    p.add_argument("--adv", type=int, default=1)
    p.add_argument("--util", type=int, default=7)
    p.add_argument("--len", type=int, default=128)
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved torch/jax rounds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lora_r", type=int, default=64)
    p.add_argument(
        "--micro_batches", type=int, default=1,
        help="G > 1: one optimizer step over G accumulated micro-batches on both sides (torch: "
        "bench/torch_mixat_accum_step.py, which attacks micro-batch by micro-batch as the "
        "reference trainer does; ours: the default attack_batching='step')",
    )  # fmt: skip
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--out", default="bench/results/train_step_vs_torch")
    a = p.parse_args(argv)
    script = Path(a.torch_script)
    if not script.is_file():
        print(f"error: --torch_script {script} does not exist", file=sys.stderr)
        return 2
    if not 0 < a.prompt_len < a.len:
        print("error: need 0 < --prompt_len < --len", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(a.model) if a.model else Path(tmp) / "tiny"
        if not a.model:
            from mixat_jax.tiny_model import build_tiny_checkpoint

            build_tiny_checkpoint(model_dir, vocab_size=a.vocab, hidden_size=a.hidden,
                                  num_layers=a.layers, num_heads=8, num_kv_heads=4)  # fmt: skip
        jax_step = JaxStep(model_dir, a)
        load, j_times, t_rounds, j_rounds = [], [], [], []
        for _ in range(a.rounds):
            load.append(os.getloadavg()[0])
            try:
                torch_res = torch_step_seconds(script, model_dir, a)
            except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            t_rounds.append(torch_res["seconds_per_step"])
            load.append(os.getloadavg()[0])
            times = jax_step.time_steps(a.steps)
            j_rounds.append(statistics.median(times))
            j_times.extend(times)
    torch_res = dict(
        torch_res, seconds_per_step=statistics.median(t_rounds), round_medians=t_rounds
    )
    jax_res = {"impl": "mixat_jax", "seconds_per_step": statistics.median(j_rounds),
               "round_medians": j_rounds, "step_times": j_times,
               "first_step_seconds": jax_step.first_step_seconds, "loss": jax_step.loss}  # fmt: skip
    ratio = torch_res["seconds_per_step"] / jax_res["seconds_per_step"]
    result = {"torch": torch_res, "jax": jax_res, "speedup_torch_over_jax": ratio,
              "round_ratios": [t / j for t, j in zip(t_rounds, j_rounds, strict=True)],
              "load_average_1m": load, "cpus": os.cpu_count(),
              "args": {k: v for k, v in vars(a).items() if k != "out"}}  # fmt: skip
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    write_markdown(out.with_suffix(".md"), result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
