"""DAT Stage A (`python -m mixat_jax.dat_sample`, DAT spec §2.2): end to end on tiny random models
(`configs/dat/sample.py:tiny`), resume, two processes, bad input, and the pure pieces (draw plan,
selection rule, similarity, shards).

The CLI runs share one tiny-model cache and one JAX persistent compilation cache, so only the
first run compiles. Equality promises: every work unit is computed from the same inputs with the
same batch shape on one CPU device in every run, so an interrupted-and-resumed run and a
two-process run must give byte-identical samples.jsonl / selected.jsonl and the same summary.json
apart from its `timing` block (wall-clock measurements).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mixat_jax.behaviors import Behavior
from mixat_jax.dat import draws, selection, shards, stage_a
from mixat_jax.dat import sample_config as sc
from tests.fast_compile import FAST_COMPILE_XLA_FLAGS

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300
FIELDS = ["behavior_id", "behavior", "draw", "prompt", "target", "log_likelihood", "target_loss",
          "judge_score", "completion", "selected"]  # fmt: skip
N, K, LIMIT = 8, 3, 3


def load_config(arg: str | None = None):
    spec = importlib.util.spec_from_file_location("dat_sample_cfg", ROOT / "configs/dat/sample.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


# ------------------------------------------------------------------------------ CLI helpers
@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """Tiny checkpoints + synthetic data files (built once) and a JAX compilation cache."""
    root = tmp_path_factory.mktemp("dat_cache")
    stage_a.tiny_inputs(sc.TinySpec(cache_dir=str(root / "tiny")), root)
    return root


def _env(cache: Path, devices: int = 1, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXAT_JAX_")}
    xla = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
    env.update(XLA_FLAGS=f"{xla} {FAST_COMPILE_XLA_FLAGS}".strip(), JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false",
               JAX_COMPILATION_CACHE_DIR=str(cache / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **extra)  # fmt: skip
    return env


def _cmd(workdir: Path, cache: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "mixat_jax.dat_sample", "--config=configs/dat/sample.py:tiny",
            f"--workdir={workdir}", f"--config.tiny.cache_dir={cache / 'tiny'}", *overrides]  # fmt: skip


def run_cli(workdir: Path, cache: Path, *overrides: str, devices: int = 1):
    return subprocess.run(_cmd(workdir, cache, *overrides), cwd=ROOT, env=_env(cache, devices),
                          capture_output=True, text=True, timeout=TIMEOUT_S)  # fmt: skip


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def outputs(workdir: Path) -> dict[str, object]:
    """What two equal runs share: the JSONL bytes and summary.json without `timing`."""
    summary = json.loads((workdir / "summary.json").read_text())
    summary.pop("timing")
    return {"samples": (workdir / "samples.jsonl").read_bytes(),
            "selected": (workdir / "selected.jsonl").read_bytes(), "summary": summary}  # fmt: skip


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory) -> Path:
    """One uninterrupted one-process run of configs/dat/sample.py:tiny."""
    out = tmp_path_factory.mktemp("dat_ref") / "run"
    proc = run_cli(out, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# ------------------------------------------------------------------------------ end to end
def tiny_config(cache: Path, **kw) -> sc.SampleConfig:
    """The config the CLI runs resolve to (configs/dat/sample.py:tiny + the cache dir)."""
    cfg = sc.from_config_dict(load_config("tiny"))
    tiny = dataclasses.replace(cfg.tiny, cache_dir=str(cache / "tiny"))
    return dataclasses.replace(cfg, tiny=tiny, **kw)


def test_end_to_end_counts_fields_ranges_and_rerun_is_a_noop(reference, cache):
    samples = read_jsonl(reference / "samples.jsonl")
    selected = read_jsonl(reference / "selected.jsonl")
    assert len(samples) == LIMIT * N and len(selected) == LIMIT * K
    ids = list(dict.fromkeys(r["behavior_id"] for r in samples))
    assert len(ids) == LIMIT
    for r in samples:
        assert list(r) == FIELDS
        assert r["log_likelihood"] <= 0.0 and np.isfinite(r["log_likelihood"])
        assert 0.0 <= r["judge_score"] <= 1.0
        assert r["target_loss"] > 0.0 and np.isfinite(r["target_loss"])
        assert isinstance(r["prompt"], str) and isinstance(r["completion"], str)
    for bid in ids:  # behaviour order, then draw; K selected per behaviour
        recs = [r for r in samples if r["behavior_id"] == bid]
        assert [r["draw"] for r in recs] == list(range(N))
        assert sum(r["selected"] for r in recs) == K
        assert len({r["behavior"] for r in recs}) == 1
    flagged = {(r["behavior_id"], r["draw"]) for r in samples if r["selected"]}
    assert {(r["behavior_id"], r["draw"]) for r in selected} == flagged
    assert all(r["selected"] for r in selected)
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["num_candidates"] == LIMIT * N and summary["num_selected"] == LIMIT * K
    assert sum(summary["all"]["judge_score"]["histogram"]["counts"]) == LIMIT * N
    assert 0.0 <= summary["similarity"]["mean_pairwise_all"] <= 1.0
    assert summary["timing"]["samples_per_s_per_process"] > 0
    assert summary["config"]["num_samples"] == N
    assert (reference / "summary.png").stat().st_size > 0
    assert (reference / "shards" / "process_00000.jsonl").exists()

    before = {p: p.read_bytes() for p in reference.iterdir() if p.is_file()}
    assert (
        stage_a.run(tiny_config(cache), reference) == summary
    )  # finished: returns, writes nothing
    assert {p: p.read_bytes() for p in reference.iterdir() if p.is_file()} == before
    with pytest.raises(ValueError, match=r"different config \(fields \['seed'\] differ\)"):
        stage_a.run(tiny_config(cache, seed=1), reference)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_main() -> None:
    """``python -m mixat_jax.dat_sample`` whose process 1 ALONE sends itself SIGTERM once its
    first unit is written (process 0 gets no signal: only the agreed stop can end it)."""
    import signal

    import jax

    from mixat_jax import dat_sample

    run_unit = stage_a.run_unit

    def run_unit_then_preempt(s, unit):
        records = run_unit(s, unit)
        if jax.process_index() == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return records

    stage_a.run_unit = run_unit_then_preempt
    sys.argv = ["mixat_jax.dat_sample", *sys.argv[1:]]
    dat_sample.cli()


def run_two_processes(out: Path, cache: Path, *, preempt: bool = False) -> list[str]:
    """`python -m mixat_jax.dat_sample` as two jax.distributed CPU processes (1 device each);
    ``preempt``: through :func:`child_main`, both must exit 143. Returns their logs."""
    coordinator = f"127.0.0.1:{_free_port()}"
    procs, logs = [], []
    cmd = _cmd(out, cache)
    if preempt:
        cmd = [sys.executable, "-c", "from tests.test_dat_sample import child_main; child_main()",
               *cmd[3:]]  # fmt: skip
    try:
        for i in range(2):
            env = _env(cache, MIXAT_JAX_DISTRIBUTED="1", MIXAT_JAX_COORDINATOR=coordinator,
                       MIXAT_JAX_NUM_PROCESSES="2", MIXAT_JAX_PROCESS_ID=str(i))  # fmt: skip
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT))  # fmt: skip
        deadline = time.monotonic() + TIMEOUT_S
        for i, p in enumerate(procs):
            log, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            assert p.returncode == (143 if preempt else 0), f"process {i}: {log[-3000:]}"
            logs.append(log)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return logs


def test_resumed_by_two_processes_equals_uninterrupted_one_process_run(reference, cache, tmp_path):
    """Interrupted after 2 units (one process; its shard then gets a torn last line, as from a
    kill in mid-write) and resumed by two jax.distributed processes, which split the remaining
    units round robin (process 0 merges after a barrier) — first preempted on process 1 only
    (both stop after the same round), then to the end: the files equal the uninterrupted
    one-process run's. So resuming, the process count and the order of work change nothing."""
    out = tmp_path / "resumed"
    first = run_cli(out, cache, "--config.stop_after_units=2")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "stopped after 2 units" in first.stderr
    assert not (out / "samples.jsonl").exists()
    shard = out / "shards" / "process_00000.jsonl"
    assert len(shard.read_text().splitlines()) == 2
    with shard.open("a") as f:
        f.write('{"behavior_id": "synthetic_2", "unit": 0, "records": [{"dra')
    fingerprint = json.loads((out / "inputs.json").read_text())["behaviors_sha256"]
    # Preempted on process 1 only (issue #16): both stop after the same round, exit 143, no merge.
    logs = run_two_processes(out, cache, preempt=True)
    assert all("preempted after 1 units" in log for log in logs), logs[0][-2000:]
    assert not (out / "samples.jsonl").exists()
    assert len(shard.read_text().splitlines()) == 3  # torn tail cut, unit 2 appended
    logs = run_two_processes(out, cache)
    assert "2 already done" in logs[0], logs[0][-3000:]  # units 0, 2 of process 0's 0, 2, 4
    assert json.loads((out / "inputs.json").read_text())["behaviors_sha256"] == fingerprint
    assert sorted(q.name for q in (out / "shards").iterdir()) == [
        "process_00000.jsonl", "process_00001.jsonl"]  # fmt: skip
    assert len(shard.read_text().splitlines()) == 4  # unit 4 appended on the resume
    assert outputs(out) == outputs(reference)


# ------------------------------------------------------------------------------ bad input
def test_cli_bad_input_is_one_line_and_writes_nothing(cache, tmp_path):
    out = tmp_path / "bad"
    proc = run_cli(out, cache, "--config.num_selected=9")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert (
        lines[0].startswith("error: ")
        and "num_selected (K=9) exceeds num_samples (N=8)" in lines[0]
    )
    assert not out.exists()


def _explicit(cache: Path, **kw) -> sc.SampleConfig:
    tiny = sc.from_config_dict(load_config("tiny"))
    inputs = stage_a.tiny_inputs(sc.TinySpec(cache_dir=str(cache / "tiny")), cache)
    base = dict(tiny=None, diffusion_model=inputs.diffusion_model,
                target_model=inputs.target_model, behaviors=inputs.behaviors,
                targets=inputs.targets)  # fmt: skip
    return dataclasses.replace(tiny, **{**base, **kw})


def _bad(cfg_or_fn, tmp_path: Path, match: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match) as e:
        cfg = cfg_or_fn() if callable(cfg_or_fn) else cfg_or_fn
        stage_a.run(cfg, out)
    assert "\n" not in str(e.value)
    assert not out.exists()


def test_bad_config_values(tmp_path):
    c = load_config("tiny")
    for key, value, match in [
        ("num_selected", 9, r"num_selected \(K=9\) exceeds num_samples \(N=8\)"),
        ("selection", "random", r"config.selection: 'random' is not one of"),
        ("diversity_threshold", 1.5, "diversity_threshold must be in"),
    ]:
        bad = c.copy_and_resolve_references()
        bad[key] = value
        with pytest.raises(ValueError, match=match):
            sc.from_config_dict(bad)
    strongreject = sc.from_config_dict({**c.to_dict(), "judge": "strongreject"})
    _bad(strongreject, tmp_path, "judge 'strongreject' needs a judge model")
    harmbench = sc.from_config_dict({**c.to_dict(), "judge": "harmbench"})
    _bad(harmbench, tmp_path, "judge 'harmbench' needs a judge model")


def test_bad_files_and_models(cache, tmp_path):
    _bad(_explicit(cache, behaviors=str(tmp_path / "nope.csv")), tmp_path,
         "behaviours file not found")  # fmt: skip
    _bad(_explicit(cache, targets=str(tmp_path / "nope.json")), tmp_path, "targets file not found")
    inputs = stage_a.tiny_inputs(sc.TinySpec(cache_dir=str(cache / "tiny")), cache)
    targets = json.loads(Path(inputs.targets).read_text())
    targets["synthetic_2"] = []
    partial = tmp_path / "targets.json"
    partial.write_text(json.dumps(targets))
    _bad(_explicit(cache, targets=str(partial)), tmp_path,
         "behaviour 'synthetic_2' has no \\(non-empty\\) targets")  # fmt: skip
    _bad(_explicit(cache, diffusion_model=inputs.target_model), tmp_path,
         "not a masked-diffusion|diffusion")  # fmt: skip
    _bad(_explicit(cache, target_model=inputs.diffusion_model), tmp_path, "causal")
    _bad(_explicit(cache, answer_prefix="\nQuestion: ", diffusion_model=str(_char_llada(cache, tmp_path))),
         tmp_path, "cannot encode the answer prefix")  # fmt: skip


def _char_llada(cache: Path, tmp_path: Path) -> Path:
    """The tiny LLaDA checkpoint with a character-level tokenizer without "Q" (an [UNK])."""
    import shutil

    from tests.diffusion_helpers import char_tokenizer

    inputs = stage_a.tiny_inputs(sc.TinySpec(cache_dir=str(cache / "tiny")), cache)
    out = tmp_path / "char_llada"
    shutil.copytree(inputs.diffusion_model, out)
    for f in out.glob("*token*"):
        f.unlink()
    char_tokenizer("abcdefghijklmnopqrstuvxyzAS :\n").save_pretrained(out)
    return out


def test_reference_config_is_valid():
    cfg = sc.from_config_dict(load_config())
    assert cfg.diffusion_model == "GSAI-ML/LLaDA-8B-Base"
    assert cfg.target_model == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert (cfg.num_samples, cfg.num_selected, cfg.prompt_length) == (1000, 16, 32)
    assert (cfg.judge, cfg.max_new_tokens, cfg.selection) == ("strongreject", 256, "judge")
    assert cfg.sampler == sc.SamplerSpec(steps=32, temperature=0.0, remasking="low_confidence",
                                         cond_dropout=True, global_remask_every=8,
                                         global_remask_count=8)  # fmt: skip
    assert cfg.answer_prefix == "\nAnswer: " and cfg.dtype == "bfloat16"
    assert cfg.behaviors.endswith("adv_training_behaviors.csv")
    assert cfg.targets.endswith("adv_training_targets.json")
    assert cfg.num_samples % cfg.batch_size == 0 and cfg.batch_size % 8 == 0
    judged = sc.from_config_dict({**load_config().to_dict(), "judge_model": "/j"})
    judged.check_runnable()
    tiny = sc.from_config_dict(load_config("tiny"))
    assert tiny.tiny is not None and tiny.judge == "refusal"
    tiny.check_runnable()


# ------------------------------------------------------------------------------ pure pieces
def test_draw_plan_is_a_function_of_seed_and_behaviour():
    a = draws.target_indices(0, "b1", 12, 1000)
    assert np.array_equal(a, draws.target_indices(0, "b1", 12, 1000))
    assert not np.array_equal(a, draws.target_indices(1, "b1", 12, 1000))
    assert not np.array_equal(a, draws.target_indices(0, "b2", 12, 1000))
    assert set(a.tolist()) == set(range(12))
    bs = [Behavior("b1", "x", targets=("t",)), Behavior("b2", "y", targets=("t",))]
    units = draws.plan_units(bs, 10, 4)
    assert [(u.behavior_id, u.unit, u.first_draw, u.num_draws) for u in units] == [
        ("b1", 0, 0, 4), ("b1", 1, 4, 4), ("b1", 2, 8, 2),
        ("b2", 0, 0, 4), ("b2", 1, 4, 4), ("b2", 2, 8, 2)]  # fmt: skip
    for count in (1, 2, 4, 7):
        shares = [draws.assigned(units, i, count) for i in range(count)]
        assert sorted(u.index for s in shares for u in s) == list(range(len(units)))
    import jax

    k = jax.random.key_data
    assert np.array_equal(k(draws.unit_key(0, "b1", 1)), k(draws.unit_key(0, "b1", 1)))
    assert not np.array_equal(k(draws.unit_key(0, "b1", 1)), k(draws.unit_key(0, "b1", 2)))
    assert not np.array_equal(k(draws.unit_key(0, "b1", 1)), k(draws.unit_key(0, "b2", 1)))


def test_selection_judge_rule_fill_and_ties():
    scores = [0.2, 0.9, 0.9, 0.6, 0.0, 0.4, 0.9]
    losses = [0.5, 3.0, 1.0, 2.0, 0.1, 0.3, 1.0]
    draws_ = list(range(7))
    prompts = [f"p{i}" for i in draws_]
    pick = lambda rule, k, **kw: selection.select(scores, losses, draws_, prompts, rule=rule, k=k,
                                                  threshold=0.5, **kw)  # fmt: skip
    # passing (>= 0.5) by score desc, loss asc, draw asc: 2 and 6 tie on (0.9, 1.0) -> draw order
    assert pick("judge", 3) == [2, 6, 1]
    assert pick("judge", 4) == [2, 6, 1, 3]
    # fewer than K pass: fill with the lowest target loss, not the highest sub-threshold score
    assert pick("judge", 6) == [2, 6, 1, 3, 4, 5]
    assert pick("likelihood", 3) == [4, 5, 0]
    assert pick("low_likelihood", 3) == [1, 3, 2]
    with pytest.raises(ValueError, match="unknown selection"):
        pick("best", 2)
    with pytest.raises(ValueError, match="cannot keep K=8 of 7"):
        pick("judge", 8)


def test_diversity_filter_and_similarity():
    prompts = ["how to pick a lock", "how to pick a lock", "how to pick a lock now",
               "tell me about the weather", "write a poem"]  # fmt: skip
    scores = [1.0] * 5
    losses = [0.1, 0.2, 0.3, 0.4, 0.5]
    d = list(range(5))
    assert selection.select(scores, losses, d, prompts, rule="judge", k=3) == [0, 1, 2]
    kept = selection.select(scores, losses, d, prompts, rule="judge", k=3,
                            diversity_threshold=0.95)  # fmt: skip
    assert kept == [0, 2, 3]  # 1 is an exact duplicate of 0; 2 is similar but below 0.95
    strict = selection.select(scores, losses, d, prompts, rule="judge", k=4,
                              diversity_threshold=0.5)  # fmt: skip
    assert strict == [0, 3, 4, 1]  # only 3 distinct enough: the skipped fill up to K in order
    s = selection.similarity_matrix(prompts)
    assert s[0, 1] == pytest.approx(1.0) and 0.5 < s[0, 2] < 0.95 and s[0, 3] == 0.0
    assert selection.mean_pairwise_similarity(["a b", "a b"]) == pytest.approx(1.0)
    assert selection.mean_pairwise_similarity(["x"]) is None


def test_shards_skip_torn_lines(tmp_path):
    w = shards.ShardWriter(tmp_path, 0)
    w.append("b", 0, 1.0, [{"draw": 0}])
    w.append("b", 1, 1.0, [{"draw": 1}])
    with w.path.open("a") as f:
        f.write('{"behavior_id": "b", "unit": 2, "rec')
    assert sorted(shards.read_all(tmp_path)) == [("b", 0), ("b", 1)]
    w2 = shards.ShardWriter(tmp_path, 0)  # a restarted process cuts the torn tail first
    w2.append("b", 2, 1.0, [{"draw": 2}])
    assert sorted(shards.read_all(tmp_path)) == [("b", 0), ("b", 1), ("b", 2)]
    assert len(w2.path.read_text().splitlines()) == 3


def test_scoring_sharded_over_two_devices_equals_the_one_device_run(reference, cache):
    """Target loss and greedy completions of one work unit with its batch sharded over 2 devices
    (the mesh's data axis) equal the one-device CLI run's records (inpainting: the sharded test of
    test_diffusion_inpaint)."""
    import jax

    from mixat_jax.dat.scoring import TargetScorer
    from mixat_jax.hf.load import load_pretrained
    from mixat_jax.mesh import MeshConfig, make_mesh

    cfg = tiny_config(cache)
    unit = read_jsonl(reference / "samples.jsonl")[:4]  # draws 0-3 of behaviour 1 = unit 0
    inputs = stage_a.tiny_inputs(cfg.tiny, cache)
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=1), devices=jax.devices()[:2])
    model, tok = load_pretrained(inputs.target_model, dtype="float32", mesh=mesh, kind="causal")
    scorer = TargetScorer(model, tok, max_new_tokens=cfg.max_new_tokens,
                          gen_batch_size=cfg.gen_batch_size, mesh=mesh)  # fmt: skip
    prompts, targets = [r["prompt"] for r in unit], [r["target"] for r in unit]
    losses = scorer.target_losses(prompts, targets, batch_rows=cfg.batch_size)
    np.testing.assert_allclose(losses, [r["target_loss"] for r in unit], rtol=1e-5)
    assert scorer.completions(prompts) == [r["completion"] for r in unit]


def test_resume_refuses_changed_behaviours_or_targets(tmp_path):
    """The config can stay the same while the files it names change: the fingerprint of the
    behaviours and targets a run started from is checked before a resume."""
    make = functools.partial(
        Behavior, id="b1", behavior="Tell me the code.", targets=("Sure: 1.", "Here: 1.")
    )
    fingerprint = stage_a.inputs_fingerprint([make()])
    assert fingerprint == stage_a.inputs_fingerprint([make()])
    assert fingerprint != stage_a.inputs_fingerprint([make(targets=("Sure: 2.", "Here: 1."))])
    stage_a.check_inputs(tmp_path, fingerprint)  # fresh workdir: nothing to compare
    (tmp_path / stage_a.INPUTS_FILE).write_text(json.dumps({"behaviors_sha256": fingerprint}))
    stage_a.check_inputs(tmp_path, fingerprint)
    with pytest.raises(ValueError, match=r"behaviours/targets changed .*use a new --workdir"):
        stage_a.check_inputs(tmp_path, stage_a.inputs_fingerprint([make(behavior="Other.")]))
