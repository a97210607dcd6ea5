"""Masked-diffusion sampler throughput: mixat_jax `sample` (one jitted lax.scan) vs a PyTorch
LLaDA-`generate`-style loop, same CPU, same tiny random LLaDA-layout checkpoint, same inputs.

    PYTHONPATH=. python bench/diffusion_sampler_vs_torch.py [--batch 16] [--prompt_len 32] \
        [--answer_len 32] [--steps 32] [--rounds 3] [--repeats 1] [--threads 1,2] \
        [--hidden 256] [--layers 4] [--heads 8] [--ffn 768] [--vocab 4096] [--init_std 0.1] \
        [--model DIR] [--no_aapl] [--out bench/results/diffusion_sampler_vs_torch]

Builds (once per run, or takes `--model`) a tiny random LLaDA-layout checkpoint with
`mixat_jax.tiny_model.build_tiny_diffusion_checkpoint` (full MHA as LLaDA, FFN 3×hidden as
LLaDA-8B) and a batch of DAT Stage-A inpainting canvases: `[MASK] × prompt_len` followed by a BOS
and a random answer of 3/4..1 × (answer_len − 1) tokens, right-padded to prompt_len + answer_len
(`inpaint.build_canvas`; random ids, the specials excluded). Both sides fill the mask block with
T = 0, low-confidence remasking, one block, `steps` steps, BOS/EOS/PAD and [MASK] suppressed:

* ours: `mixat_jax.diffusion.sampler.sample` on the fp32 model, compiled by a warm-up call, each
  call timed to `block_until_ready`;
* torch: `bench/torch_llada_generate.py` (written here from the spec, model forward =
  `tests/diffusion_torch_reference.py`, fp32, told to suppress [MASK] too, as ours always
  does), a fresh subprocess per round and thread count (`--threads`, default 1 and 2: on a
  loaded 2-core machine torch's 2 OpenMP threads can be several times slower than 1, so the
  peer is credited with its fastest count each round), never sharing a process with XLA; its
  warm-up forward is excluded.

Fairness: one run, interleaved: each round runs torch (`--repeats` calls per thread count, the
order of the counts alternating between rounds) and right after ours (`--repeats` calls, plus
one call of the AAPL inpainting sampler of spec §5.4 — conditioning dropout, global remasking —
for the samples/s of Stage A, no peer), recording the 1-minute load average before each side.
Reported: median over rounds of each side's per-round median, the per-round ratios (fastest
torch) / ours and the ratio against each thread count, throughput = steps × canvas tokens / s
(B × L per step) and samples/s, achieved GFLOP/s (dense matmuls incl. the LM head + attention
scores/values, per step over the whole canvas; plus a jnp matmul peak measured at the end), and
the T = 0 agreement of the two canvases (same inputs: the fraction of filled positions with the
same token, rows identical, max |Δ logp| over identical rows). Writes `OUT.json` and
`OUT.md` and prints a markdown table row.
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

TORCH_SCRIPT = Path(__file__).resolve().parent / "torch_llada_generate.py"


def build_model(path: Path, a) -> Path:
    from mixat_jax.tiny_model import build_tiny_diffusion_checkpoint

    return build_tiny_diffusion_checkpoint(
        path, layout="llada", vocab_size=a.vocab, hidden_size=a.hidden, num_layers=a.layers,
        num_heads=a.heads, num_kv_heads=a.heads, intermediate_size=a.ffn, init_std=a.init_std,
    )  # fmt: skip


def make_canvases(model_cfg, a):
    """(canvas_BxL, attn_BxL, editable_BxL): [MASK]×P | BOS + random answer | pad."""
    import numpy as np

    from mixat_jax.diffusion.inpaint import build_canvas

    rng = np.random.default_rng(a.seed)
    special = {model_cfg.bos_token_id, model_cfg.pad_token_id, model_cfg.mask_token_id,
               *model_cfg.eos_token_ids}  # fmt: skip
    pool = np.asarray([i for i in range(model_cfg.vocab_size) if i not in special])
    n_max = a.answer_len - 1
    answers = []
    for _ in range(a.batch):
        n = int(rng.integers(max(1, 3 * n_max // 4), n_max + 1))
        answers.append([model_cfg.bos_token_id, *rng.choice(pool, n).tolist()])
    return build_canvas(
        answers, prompt_length=a.prompt_len, mask_id=model_cfg.mask_token_id,
        pad_id=model_cfg.pad_token_id, lead=[], length=a.prompt_len + a.answer_len,
    )  # fmt: skip


def flops_per_call(c, batch: int, length: int, steps: int) -> float:
    """Forward FLOPs of `steps` full-canvas passes: dense layers + LM head (2 per MAC) and
    attention scores + weighted values (4 · L · q_size per token and layer)."""
    dense = 2 * (c.hidden_size * c.q_size + 2 * c.hidden_size * c.kv_size
                 + c.q_size * c.hidden_size + 3 * c.hidden_size * c.intermediate_size)  # fmt: skip
    attn = 4 * length * c.q_size
    head = 2 * c.hidden_size * c.vocab_size
    return steps * batch * length * (c.num_layers * (dense + attn) + head)


class Ours:
    """`sample` on the bench model; `time_calls(n)` times n calls (compiled in __init__)."""

    def __init__(self, model_dir: Path, inputs: dict, suppress: tuple[int, ...], a):
        import jax
        from flax import nnx

        from mixat_jax.diffusion.inpaint import default_sampler
        from mixat_jax.diffusion.sampler import SamplerConfig
        from mixat_jax.hf.load import load_pretrained

        self.jax = jax
        model, _ = load_pretrained(model_dir, dtype="float32", with_tokenizer=False)
        self.model_cfg = model.cfg
        self.graphdef, self.state = nnx.split(model)
        self.inputs = inputs
        self.cfg = SamplerConfig.for_model(model.cfg, steps=a.steps, suppress_ids=suppress)
        self.aapl = default_sampler(model.cfg, a.prompt_len, steps=a.steps, suppress_ids=suppress)
        self.calls = 0
        t0 = time.perf_counter()
        self.out = self._call(self.cfg)
        self.first_call_seconds = time.perf_counter() - t0
        self.first_aapl_seconds = None
        if not a.no_aapl:
            t0 = time.perf_counter()
            self._call(self.aapl)
            self.first_aapl_seconds = time.perf_counter() - t0

    def _call(self, cfg):
        from mixat_jax.diffusion.sampler import sample

        self.calls += 1
        x = self.inputs
        out = sample(self.graphdef, self.state, x["canvas_BxL"], x["attn_BxL"],
                     x["editable_BxL"], self.jax.random.key(self.calls), cfg=cfg)  # fmt: skip
        return self.jax.block_until_ready(out)

    def time_calls(self, n: int, aapl: bool = False) -> list[float]:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            out = self._call(self.aapl if aapl else self.cfg)
            times.append(time.perf_counter() - t0)
            if not aapl:
                self.out = out
        return times


def run_torch(model_dir: Path, inputs_path: Path, out_path: Path, suppress, threads: int,
              a) -> dict:  # fmt: skip
    cmd = [sys.executable, str(TORCH_SCRIPT), "--model", str(model_dir), "--inputs",
           str(inputs_path), "--out", str(out_path), "--steps", str(a.steps), "--repeats",
           str(a.repeats), "--threads", str(threads),
           "--suppress_ids", ",".join(str(i) for i in suppress)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"torch sampler failed: {proc.stderr.strip().splitlines()[-3:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def agreement(ours, torch_npz, fill_BxL) -> dict:
    import numpy as np

    ours_BxL = np.asarray(ours.canvas_BxL)
    theirs_BxL = torch_npz["canvas_BxL"]
    same_BxL = (ours_BxL == theirs_BxL) | ~fill_BxL
    rows = same_BxL.all(-1)
    dlogp = np.abs(np.asarray(ours.logp_B) - torch_npz["logp_B"])
    return {
        "filled_token_agreement": float((ours_BxL == theirs_BxL)[fill_BxL].mean()),
        "rows_identical": int(rows.sum()),
        "rows": int(len(rows)),
        "max_abs_logp_diff_identical_rows": float(dlogp[rows].max()) if rows.any() else None,
        "canvas_outside_fill_unchanged": bool(((ours_BxL == theirs_BxL) | fill_BxL).all()),
    }


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of a jitted fp32 n×n matmul in this process (the machine's state right now)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda m: m @ m)
    f(x).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(reps):
        f(x).block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if "Model name" in ln)
    except (OSError, StopIteration):
        return "unknown"


def table_row(r: dict) -> str:
    a, t, o = r["args"], r["torch"], r["ours"]
    by = ", ".join(f"{n} thread(s) {v['seconds_per_call']:.2f} s ({r['speedup_by_threads'][n]:.2f}×)"
                   for n, v in r["torch_by_threads"].items())  # fmt: skip
    return (
        f"| masked-diffusion sampler (inpainting), tiny LLaDA layout (hidden {a['hidden']}, "
        f"{a['layers']} layers, vocab {a['vocab']}, {r['model_params'] / 1e6:.1f} M), B {a['batch']}"
        f" × L {r['canvas_len']} ({a['prompt_len']} masks), {a['steps']} steps, T 0 low-confidence "
        f"| {o['seconds_per_call']:.2f} s/call = {o['tokens_per_second']:.0f} step·tok/s, "
        f"{o['samples_per_second']:.2f} samples/s | torch LLaDA-generate loop "
        f"(`bench/torch_llada_generate.py`), fastest thread count per round: "
        f"{t['seconds_per_call']:.2f} s = {t['tokens_per_second']:.0f} step·tok/s "
        f"| **{r['speedup_torch_over_ours']:.2f}×** | ≥ 3× | per round "
        f"{', '.join(f'{x:.2f}' for x in r['round_ratios'])}; {by}; load "
        f"{min(r['load_average_1m']):.1f}–{max(r['load_average_1m']):.1f}; "
        f"{o['gflops_per_second']:.0f} GFLOP/s (jnp matmul peak in-run "
        f"{r['jnp_matmul_peak_gflops']:.0f}); T=0 token agreement "
        f"{r['agreement']['filled_token_agreement']:.4f} |"
    )


def write_markdown(path: Path, r: dict) -> None:
    a, t, o, ag = r["args"], r["torch"], r["ours"], r["agreement"]
    rows = [
        ("seconds / call (median of rounds)", f"{t['seconds_per_call']:.3f}",
         f"{o['seconds_per_call']:.3f}"),
        ("per-round medians", ", ".join(f"{x:.3f}" for x in t["round_medians"]),
         ", ".join(f"{x:.3f}" for x in o["round_medians"])),
        ("steps × canvas tokens / s", f"{t['tokens_per_second']:.0f}",
         f"{o['tokens_per_second']:.0f}"),
        ("samples / s", f"{t['samples_per_second']:.2f}", f"{o['samples_per_second']:.2f}"),
        ("GFLOP/s achieved", f"{t['gflops_per_second']:.1f}", f"{o['gflops_per_second']:.1f}"),
        ("first call (compile)", "–", f"{o['first_call_seconds']:.1f} s"),
        ("speed-up (torch / ours)", "1×", f"**{r['speedup_torch_over_ours']:.2f}×**"),
    ]  # fmt: skip
    for n, v in r["torch_by_threads"].items():
        rows.append((f"torch with {n} thread(s): s/call (per round)",
                     f"{v['seconds_per_call']:.3f} "
                     f"({', '.join(f'{x:.3f}' for x in v['round_medians'])})",
                     f"{r['speedup_by_threads'][n]:.2f}× vs it"))  # fmt: skip
    aapl = r.get("ours_aapl")
    lines = [
        "# Masked-diffusion sampler: mixat_jax vs a PyTorch LLaDA-generate loop (CPU, same run, "
        "interleaved)",
        "",
        f"Tiny random LLaDA-layout model (hidden {a['hidden']}, {a['layers']} layers, "
        f"{a['heads']} heads = KV heads, FFN {a['ffn']}, vocab {a['vocab']}, "
        f"{r['model_params'] / 1e6:.1f} M params, fp32); batch {a['batch']} canvases of "
        f"{r['canvas_len']} tokens ({a['prompt_len']} [MASK] + BOS + answer, right-padded); "
        f"{a['steps']} steps, one block, T = 0, low-confidence; {r['cpu']}, {r['cpus']} CPUs; "
        f"{a['rounds']} rounds × {a['repeats']} call(s) per side; {r['gflop_per_call']:.1f} "
        f"GFLOP per call; jnp fp32 matmul peak measured at the end of the run "
        f"{r['jnp_matmul_peak_gflops']:.0f} GFLOP/s. The torch column is, per round, the "
        f"fastest of the thread counts {a['threads']} (fastest: {t['fastest_threads']}).",
        "",
        "| | torch loop | mixat_jax `sample` |",
        "|---|---|---|",
        *[f"| {k} | {x} | {y} |" for k, x, y in rows],
        "",
        f"Per-round ratios: {', '.join(f'{x:.2f}' for x in r['round_ratios'])}. 1-min load "
        f"average before each measurement: {', '.join(f'{x:.2f}' for x in r['load_average_1m'])}.",
        "",
        f"T = 0 agreement on the same inputs: {ag['filled_token_agreement']:.4f} of the filled "
        f"tokens equal, {ag['rows_identical']}/{ag['rows']} rows identical, max |Δ path logp| "
        f"over identical rows {ag['max_abs_logp_diff_identical_rows']}.",
    ]
    if aapl:
        lines += [
            "",
            f"Ours with the AAPL inpainting sampler (conditioning dropout, global remasking every "
            f"8; spec §5.4): {aapl['seconds_per_call']:.3f} s/call = "
            f"{aapl['samples_per_second']:.2f} samples/s (per round "
            f"{', '.join(f'{x:.3f}' for x in aapl['round_medians'])}).",
        ]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="LLaDA-layout dir (default: build a tiny one)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--answer_len", type=int, default=32, help="BOS + answer budget (padded)")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1, help="timed calls per side per round")
    p.add_argument(
        "--threads", default="1,2",
        help="torch intra-op thread counts, each run every round; the ratio is against the "
        "fastest (on a loaded 2-core machine 2 OpenMP threads can be far slower than 1)",
    )  # fmt: skip
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--init_std", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_aapl", action="store_true", help="skip timing the AAPL sampler")
    p.add_argument("--out", default="bench/results/diffusion_sampler_vs_torch")
    a = p.parse_args(argv)
    if a.answer_len < 2 or a.prompt_len < 1 or a.steps < 1:
        print("error: need --answer_len >= 2, --prompt_len >= 1, --steps >= 1", file=sys.stderr)
        return 2
    try:
        threads = [int(n) for n in a.threads.split(",")]
        if not threads or min(threads) < 1:
            raise ValueError
    except ValueError:
        print(f"error: --threads {a.threads!r}: use N[,N...] with N >= 1", file=sys.stderr)
        return 2
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = Path(a.model) if a.model else build_model(tmp / "tiny_llada", a)
        from mixat_jax.hf.load import read_config

        model_cfg = read_config(model_dir)
        canvas, attn, editable = make_canvases(model_cfg, a)
        inputs = {"canvas_BxL": canvas, "attn_BxL": attn, "editable_BxL": editable}
        inputs_path, torch_out = tmp / "inputs.npz", tmp / "torch_out.npz"
        np.savez(inputs_path, **inputs)
        suppress = tuple(sorted({model_cfg.bos_token_id, model_cfg.pad_token_id,
                                 *model_cfg.eos_token_ids}))  # fmt: skip
        # our sampler always bans [MASK] itself; the torch loop is told to do the same
        torch_suppress = (*suppress, model_cfg.mask_token_id)
        ours = Ours(model_dir, inputs, suppress, a)
        load, o_rounds, aapl_rounds, o_all = [], [], [], []
        t_by_threads: dict[int, list[float]] = {n: [] for n in threads}
        for r in range(a.rounds):
            for n in threads if r % 2 == 0 else threads[::-1]:
                load.append(os.getloadavg()[0])
                try:
                    t = run_torch(model_dir, inputs_path, torch_out, torch_suppress, n, a)
                except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
                    print(f"error: {e}", file=sys.stderr)
                    return 1
                t_by_threads[n].append(t["seconds_per_call"])
            load.append(os.getloadavg()[0])
            times = ours.time_calls(a.repeats)
            o_rounds.append(statistics.median(times))
            o_all.extend(times)
            if not a.no_aapl:
                aapl_rounds.append(ours.time_calls(1, aapl=True)[0])
        ag = agreement(ours.out, np.load(torch_out), canvas == model_cfg.mask_token_id)
    b, length = canvas.shape
    gflop = flops_per_call(model_cfg, b, length, a.steps) / 1e9

    def side(rounds: list[float], **extra) -> dict:
        s = statistics.median(rounds)
        return {"seconds_per_call": s, "round_medians": rounds,
                "tokens_per_second": a.steps * b * length / s, "samples_per_second": b / s,
                "gflops_per_second": gflop / s, **extra}  # fmt: skip

    t_rounds = [min(ts) for ts in zip(*t_by_threads.values(), strict=True)]  # fastest peer
    fastest = [threads[ts.index(min(ts))] for ts in zip(*t_by_threads.values(), strict=True)]
    o_med = statistics.median(o_rounds)
    result = {
        "torch": side(t_rounds, impl="bench/torch_llada_generate.py", torch=t.get("torch"),
                      note="per round the fastest of the thread counts", fastest_threads=fastest),
        "torch_by_threads": {str(n): side(ts) for n, ts in t_by_threads.items()},
        "speedup_by_threads": {str(n): statistics.median(ts) / o_med
                               for n, ts in t_by_threads.items()},
        "ours": side(o_rounds, impl="mixat_jax.diffusion.sampler.sample", call_times=o_all,
                     first_call_seconds=ours.first_call_seconds),
        "ours_aapl": side(aapl_rounds, first_call_seconds=ours.first_aapl_seconds)
        if aapl_rounds else None,
        "speedup_torch_over_ours": statistics.median(t_rounds) / o_med,
        "round_ratios": [x / y for x, y in zip(t_rounds, o_rounds, strict=True)],
        "agreement": ag,
        "canvas_len": length,
        "gflop_per_call": gflop,
        "model_params": int(model_cfg.num_params()),
        "load_average_1m": load,
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "jnp_matmul_peak_gflops": matmul_peak() / 1e9,
        "args": {k: v for k, v in vars(a).items() if k != "out"},
    }  # fmt: skip
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    write_markdown(out.with_suffix(".md"), result)
    print(json.dumps({k: v for k, v in result.items() if k != "args"}))
    print(table_row(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
