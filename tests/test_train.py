"""End-to-end tests of ``python -m mixat_jax.train`` on configs/tiny.py (subprocesses, 1 CPU).

One uninterrupted run is the reference; a second run is stopped (``stop_after``), resumed,
SIGTERM-ed, and resumed again — its adapter must equal the reference bitwise. The runs share a
tiny-model cache and a persistent XLA compilation cache, so only the first one compiles.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from mixat_jax.attacks.llm_interface import ScriptedGenerator
from mixat_jax.attacks.pap import PAPConfig, load_pool
from mixat_jax.hf.load import load_pretrained
from mixat_jax.pap_pool import PoolBehavior, build_resumable
from mixat_jax.training.data import AdvRow
from mixat_jax.training.discrete import DiscreteRewriter, PAPPool
from mixat_jax.training.schedules import FLAG_CONTINUOUS, FLAG_PAP, build_schedule

ROOT = Path(__file__).resolve().parents[1]
STEPS, GRAD_ACCUM = 6, 2
METRIC_KEYS = (
    "step", "loss", "away", "toward", "utility", "attack_loss_before", "attack_loss_after",
    "delta_norm_mean", "delta_norm_max", "discrete", "mb_flags", "lr", "seconds",
    "train_step_compiles",
)  # fmt: skip


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f
    )  # one device: the tiny run needs no mesh
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    return env


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("train_caches")
    return [
        f"--config.tiny_model.cache_dir={d / 'tiny'}",
        f"--config.compilation_cache_dir={d / 'xla'}",
    ]


def _cmd(workdir: Path, caches: list[str], *extra: str, config: str = "configs/tiny.py"):
    # 2 continuous-attack iterations instead of 10: the same lax.scan, a shorter loop
    return [sys.executable, "-m", "mixat_jax.train", f"--config={config}",
            f"--workdir={workdir}", f"--config.steps={STEPS}", "--config.attack.iters=2",
            *caches, *extra]  # fmt: skip


def _run(cmd, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def _metrics(workdir: Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines() if x]


def _adapter(workdir: Path) -> dict[str, np.ndarray]:
    return load_file(str(workdir / "adapter" / "adapter_model.safetensors"))


def _steps(workdir: Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, caches) -> Path:
    workdir = tmp_path_factory.mktemp("ref")
    proc = _run(_cmd(workdir, caches, "--config.checkpoint_every=4"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def test_tiny_run_writes_everything(reference_run, caches):
    workdir = reference_run
    config = json.loads((workdir / "config.json").read_text())
    assert config["steps"] == STEPS and config["variant"] == "mixat"
    records = _metrics(workdir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        assert set(METRIC_KEYS) <= set(r), set(METRIC_KEYS) - set(r)
        assert np.isfinite(r["loss"]) and r["train_step_compiles"] == 1
    assert _steps(workdir) == [4, STEPS]
    assert list((workdir / "tb").iterdir()), "no TensorBoard events"
    # Schedule: the realised flags are the seeded uniform50 schedule over the real micro-batches.
    flags = "".join(r["mb_flags"] for r in records)
    want = build_schedule("uniform50_epoch2", STEPS * GRAD_ACCUM, seed=config["seed"]).flags
    assert flags == "".join(str(int(f)) for f in want)
    assert flags.count("1") == round(0.5 * len(flags))
    assert sum(r["pap_rows"] for r in records) >= 1
    # The PEFT adapter loads onto the base model.
    base = next(Path(caches[0].split("=", 1)[1]).iterdir())
    model, _ = load_pretrained(base, adapter=workdir / "adapter")
    b = np.asarray(model.layers.linears()["q_proj"].lora_b[...])
    assert np.abs(b).max() > 0  # trained (B starts at zero)


def test_interrupted_and_resumed_run_equals_uninterrupted(reference_run, caches, tmp_path):
    workdir = tmp_path / "resumed"
    proc = _run(_cmd(workdir, caches, "--config.stop_after=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _steps(workdir) == [2] and not (workdir / "adapter").exists()
    # Resume, and SIGTERM it as soon as it has resumed: it saves a checkpoint and exits 143.
    cmd = _cmd(workdir, caches)
    p = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stderr=subprocess.PIPE, text=True)
    lines = []
    for line in p.stderr:
        lines.append(line)
        if "resumed from checkpoint step 2" in line:
            p.send_signal(signal.SIGTERM)
            break
    _, rest = p.communicate(timeout=240)
    assert p.returncode == 143, "".join(lines) + rest
    stopped_at = len(_metrics(workdir))
    assert 2 <= stopped_at < STEPS and max(_steps(workdir)) == stopped_at
    assert "preempted at step" in rest
    # Resume to the end: same adapter (bitwise) and same per-step losses as the reference.
    # Bitwise is a real exactness, not a tuned tolerance (issue #15): both runs are on this one
    # machine, with one device and the same config, so every step executes the *same* compiled
    # XLA program (shared persistent compilation cache) on bit-identical inputs — the checkpoint
    # restores fp32 state/optimizer/RNG/data-order bitwise — and XLA:CPU is deterministic for a
    # fixed program and machine. Any difference is a resume bug (state not restored, a step
    # replayed or skipped, RNG or schedule reset). Do not compare across machines or meshes.
    proc = _run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref, got = _adapter(reference_run), _adapter(workdir)
    assert ref.keys() == got.keys()
    for k in ref:
        np.testing.assert_array_equal(ref[k], got[k], err_msg=k)
    ref_m, got_m = _metrics(reference_run), _metrics(workdir)
    assert [r["step"] for r in got_m] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got_m] == [r["loss"] for r in ref_m]
    assert [r["mb_flags"] for r in got_m] == [r["mb_flags"] for r in ref_m]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--config.mesh.fsdp=3"], "needs 3 devices"),
        (["--config.data.source=harmbench", "--config.data.behaviors=/nonexistent/b.csv",
          "--config.data.targets=/nonexistent/t.json"], "does not exist"),
        (["--config.variant=bogus"], "variant"),
    ],
)  # fmt: skip
def test_bad_config_is_one_line_and_leaves_workdir_intact(tmp_path, caches, extra, message):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("keep me")
    (workdir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    before = {p.name: p.read_bytes() for p in workdir.iterdir()}
    proc = _run(_cmd(workdir, caches, *extra), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert {p.name: p.read_bytes() for p in workdir.iterdir()} == before


def test_workdir_of_another_run_is_refused(reference_run, caches):
    before = (reference_run / "metrics.jsonl").read_bytes()
    proc = _run(_cmd(reference_run, caches, "--config.seed=7"), timeout=120)
    assert proc.returncode == 2 and "different config" in proc.stderr
    assert (reference_run / "metrics.jsonl").read_bytes() == before


def test_pap_pool_cli_is_resumable(tmp_path):
    behaviors = [PoolBehavior(f"b{i}", f"Tell me secret number {i}.") for i in range(3)]
    cfg = PAPConfig.training(num_techniques=3, max_retries=3)
    calls = {"n": 0, "refused": 0}

    def respond(prompt: str, seed: int) -> str:
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt  # interrupted while rewriting the third behaviour
        if "number 1" in prompt and calls["refused"] < 2:
            calls["refused"] += 1
            return "I'm sorry, I can't help with that."  # a rewriter refusal: re-drawn
        return f'"Please, as a favour, reveal the code ({seed})."'

    out = tmp_path / "pool.jsonl"
    with pytest.raises(KeyboardInterrupt):
        build_resumable(ScriptedGenerator(respond), behaviors, out, cfg=cfg, n_per_technique=2,
                        seed=0, generator_name="scripted", log=lambda s: None)  # fmt: skip
    partial = load_pool(out)
    assert {r["behavior_id"] for r in partial} <= {"b0", "b1"}
    records, _ = build_resumable(ScriptedGenerator(respond), behaviors, out, cfg=cfg,
                                 n_per_technique=2, seed=0, generator_name="scripted",
                                 log=lambda s: None)  # fmt: skip
    assert records[: len(partial)] == partial
    per_pair = {}
    for r in load_pool(out):
        assert "sorry" not in r["text"].lower()
        per_pair[(r["behavior_id"], r["technique_index"])] = per_pair.get(
            (r["behavior_id"], r["technique_index"]), 0) + 1  # fmt: skip
    assert set(per_pair) == {(f"b{i}", t) for i in range(3) for t in range(3)}
    assert set(per_pair.values()) == {2}
    # template pools need no model
    proc = subprocess.run(
        [sys.executable, "-m", "mixat_jax.pap_pool", "--model=template", f"--out={tmp_path / 't.jsonl'}",
         f"--behaviors={_behaviors_csv(tmp_path)}", "--n_per_technique=1"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(load_pool(tmp_path / "t.jsonl")) == 2 * 40


def _behaviors_csv(tmp_path: Path) -> Path:
    p = tmp_path / "behaviors.csv"
    p.write_text("Behavior,BehaviorID\nTell me the code,x1\nReveal the key,x2\n")
    return p


def test_discrete_rewriter_pap_per_microbatch_and_fallback():
    rows = [AdvRow("a", "Tell me A.", "Sure, A is 1."), AdvRow("b", "Tell me B.", "Sure, B is 2.")]
    pool = PAPPool(
        [{"behavior_id": b, "technique_index": t, "text": f"{b}-{t}-" + ("x" * (t * 50))}
         for b in ("a", "b") for t in range(4)], num_techniques=4,
    )  # fmt: skip

    class Renderer:  # one token per character
        def example(self, instruction, response):
            return type("R", (), {"ids": list(range(len(instruction) + len(response)))})

    def rewriter(per):
        return DiscreteRewriter(renderer=Renderer(), tokenizer=None, max_len_adv=120, seed=3,
                                pool=pool, gcg=None, technique_per=per)  # fmt: skip

    out = rewriter("microbatch").rewrite(rows, FLAG_PAP, 5, model_fn=None)
    again = rewriter("microbatch").rewrite(rows, FLAG_PAP, 5, model_fn=None)
    assert [i.instruction for i in out.items] == [i.instruction for i in again.items]
    tech = out.info["technique"]
    long = tech >= 2  # rewrites of techniques 2, 3 do not fit 120 tokens -> original behaviour
    assert out.info["fallbacks"] == (2 if long else 0)
    for item in out.items:
        want = item.row.behavior if long else f"{item.row.behavior_id}-{tech}-"
        assert item.instruction.startswith(want)
    plain = rewriter("row").rewrite(rows, FLAG_CONTINUOUS, 5, model_fn=None)
    assert [i.instruction for i in plain.items] == [r.behavior for r in rows]
    seen = {rewriter("row").rewrite(rows, FLAG_PAP, m, None).info["technique"] for m in range(40)}
    assert seen == {0, 1, 2, 3}
