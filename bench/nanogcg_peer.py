"""Runs nanoGCG 0.3.0 (the peer; plain or with probe sampling) on a local HF model directory and
prints one JSON line. Runs inside the peer venv (``../shared/bench/setup_peer_venv.sh``), not
ours; ``bench/gcg_probe_vs_nanogcg.py`` drives it (issue #14).

    python bench/nanogcg_peer.py --model DIR --prompt TEXT --target TEXT [--draft DIR --r 8
        --sampling_factor 16] [--steps N --search_width W --topk K --seed S --threads T]
        [--no_prefix_cache]

Output: steps, seconds_total (from the start of ``nanogcg.run``), per-step wall stamps
``step_end`` (seconds since that start, when each step's candidate loss returns), losses (the
accepted loss per step), best_loss, seconds_per_step_after_first (mean over steps 2..N).
"""

import argparse
import functools
import json
import time

import nanogcg
import torch
from nanogcg import GCGConfig, ProbeSamplingConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--prompt", required=True)
p.add_argument("--target", required=True)
p.add_argument("--draft", default="")
p.add_argument("--r", type=int, default=8)
p.add_argument("--sampling_factor", type=int, default=16)
p.add_argument("--steps", type=int, default=20)
p.add_argument("--search_width", type=int, default=256)
p.add_argument("--topk", type=int, default=256)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--optim_str_init", default="x x x x x x x x x x x x x x x x x x x x")
p.add_argument("--no_prefix_cache", action="store_true")
a = p.parse_args()

torch.set_num_threads(a.threads)
tok = AutoTokenizer.from_pretrained(a.model)
model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32)
probe = None
if a.draft:
    draft = AutoModelForCausalLM.from_pretrained(a.draft, torch_dtype=torch.float32)
    draft_tok = AutoTokenizer.from_pretrained(a.draft)
    probe = ProbeSamplingConfig(draft, draft_tok, r=a.r, sampling_factor=a.sampling_factor)
cfg = GCGConfig(
    num_steps=a.steps, search_width=a.search_width, topk=a.topk, seed=a.seed,
    optim_str_init=a.optim_str_init, use_prefix_cache=not a.no_prefix_cache,
    verbosity="ERROR", probe_sampling_config=probe,
)  # fmt: skip
stamps = []
name = "_compute_candidates_loss_probe_sampling" if probe else "_compute_candidates_loss_original"
orig = getattr(nanogcg.gcg.GCG, name)


@functools.wraps(orig)  # find_executable_batch_size reads the signature
def timed(self, *args, **kw):  # the end of each step's candidate evaluation
    out = orig(self, *args, **kw)
    stamps.append(time.perf_counter())
    return out


setattr(nanogcg.gcg.GCG, name, timed)
t0 = time.perf_counter()
r = nanogcg.run(model, tok, a.prompt, a.target, cfg)
dt = time.perf_counter() - t0
if not probe:  # plain: the loss runs once per step (also once for the buffer init: skip it)
    stamps = stamps[-len(r.losses) :]
after = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None
print(json.dumps({
    "impl": "nanogcg", "probe": bool(probe), "steps": a.steps, "search_width": a.search_width,
    "topk": a.topk, "seed": a.seed, "seconds_total": dt, "step_end": [s - t0 for s in stamps],
    "seconds_per_step_after_first": after, "losses": r.losses, "best_loss": r.best_loss,
    "best_string": r.best_string,
}))  # fmt: skip
