"""Multi-host path of ``python -m mixat_jax.train``: two local CPU processes form one JAX job.

ONE multi-process scenario (they are expensive): both processes run configs/tiny.py:sft for
2 steps with ``mesh.data=2`` (1 CPU device each, so 2 global devices), joined by
``jax.distributed.initialize`` on a loopback coordinator (``MIXAT_JAX_COORDINATOR`` /
``MIXAT_JAX_NUM_PROCESSES`` / ``MIXAT_JAX_PROCESS_ID``; gloo CPU collectives). The slot counts
are even, so every batch array is split over the two hosts (``loop.global_batch``).

1. Preemption agreed between hosts (issue #16): process 1 ALONE gets SIGTERM right after step 1
   (a test hook in :func:`child_main` sends it to itself); both processes must stop at step 1
   (``PreemptionFlag.agree``), save the step-1 checkpoint once and exit 143. Without the
   agreement process 0 would run step 2 alone and block in a collective.
2. Re-running the same command resumes and finishes; the adapter and the per-step losses must
   equal an uninterrupted run.

Why the comparison is exact: the reference is ONE process with two simulated CPU devices and the
same ``mesh.data=2``. Both runs then execute the same SPMD-partitioned program: each device
computes the gradient of its half of the global batch, and the halves are summed by an
all-reduce of two operands (in-process, or gloo between processes). A sum of two floats is
commutative and correctly rounded, so the adapters must be bitwise equal on any CPU: neither the
distributed runtime nor the preemption/resume adds a numerical difference. (Comparing against a
``mesh.data=1`` run compares two different summation orders; that is covered, with tolerances,
by the sharded-vs-unsharded tests.)

The unit tests below it check ``cli.distributed_env_kwargs`` (``MIXAT_JAX_LOCAL_DEVICE_IDS``,
``MIXAT_JAX_INIT_TIMEOUT``) and the hub download-once-then-barrier order of ``hf.load`` without
starting a distributed runtime or touching the network.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mixat_jax import cli
from tests.fast_compile import FAST_COMPILE_XLA_FLAGS

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240
NUM_PROCESSES = 2


def _env(cache: Path, devices: int = 1, **extra: str) -> dict[str, str]:
    """The children's environment. Every run of the test shares ``xla/`` next to the tiny-model
    ``cache``: a persistent XLA compilation cache of every program (however fast its compile), so
    the resumed run loads what the preempted run compiled. A cached executable is the same binary,
    so the exact comparison below is unchanged."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXAT_JAX_")}
    xla = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
    xla = f"{xla} {FAST_COMPILE_XLA_FLAGS}".strip()
    env.update(XLA_FLAGS=xla, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               TOKENIZERS_PARALLELISM="false", JAX_COMPILATION_CACHE_DIR=str(cache.parent / "xla"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **extra)  # fmt: skip
    return env


def _cmd(workdir: Path, cache: Path, data: int, hook: bool = False) -> list[str]:
    start = ["-c", "import tests.test_multihost as t; t.child_main()"] if hook else [
        "-m", "mixat_jax.train"]  # fmt: skip
    return [sys.executable, *start, "--config=configs/tiny.py:sft", "--config.grad_accum=1",
            f"--workdir={workdir}", "--config.steps=2", "--config.checkpoint_every=2",
            f"--config.mesh.data={data}", "--config.mesh.fsdp=1", "--config.mesh.tensor=1",
            "--config.batch.adv_slots=2", "--config.batch.util_slots=2",
            f"--config.tiny_model.cache_dir={cache}"]  # fmt: skip


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _adapter(workdir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(workdir / "adapter" / "adapter_model.safetensors"))


def child_main() -> None:
    """``python -m mixat_jax.train`` whose process ``PREEMPT_PROCESS`` sends itself SIGTERM once
    step ``PREEMPT_AT_STEP`` is done (the other process gets no signal)."""
    import signal

    import jax

    from mixat_jax import train
    from mixat_jax.training import metrics

    write = metrics.MetricWriter.write_scalars
    at, who = int(os.environ["PREEMPT_AT_STEP"]), int(os.environ["PREEMPT_PROCESS"])

    def write_and_maybe_preempt(self, step, scalars):
        write(self, step, scalars)
        if step == at and jax.process_index() == who:
            os.kill(os.getpid(), signal.SIGTERM)

    metrics.MetricWriter.write_scalars = write_and_maybe_preempt
    sys.argv = ["mixat_jax.train", *sys.argv[1:]]
    train.cli()


def _run_multihost(
    workdir: Path, cache: Path, *, hook: bool = False, expect: int = 0
) -> list[tuple[int, str]]:
    """Runs the two processes; returns [(returncode, output)] (children killed on failure)."""
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = []
    try:
        for i in range(NUM_PROCESSES):
            env = _env(cache, MIXAT_JAX_DISTRIBUTED="1", MIXAT_JAX_COORDINATOR=coordinator,
                       MIXAT_JAX_NUM_PROCESSES=str(NUM_PROCESSES), MIXAT_JAX_PROCESS_ID=str(i),
                       PREEMPT_AT_STEP="1", PREEMPT_PROCESS="1")  # fmt: skip
            procs.append(subprocess.Popen(
                _cmd(workdir, cache, data=NUM_PROCESSES, hook=hook), cwd=ROOT, env=env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))  # fmt: skip
        deadline = time.monotonic() + TIMEOUT_S
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, out))
            if p.returncode != expect:  # the peer would block in a collective: do not wait
                break
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


def _checkpoints(workdir: Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _losses(workdir: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines() if x]
    return [(r["step"], r["loss"], r["away"]) for r in rows]


@pytest.mark.slow
def test_preemption_of_one_process_stops_both_and_resume_equals_uninterrupted(tmp_path):
    cache = tmp_path / "tiny"
    single = subprocess.run(_cmd(tmp_path / "single", cache, data=NUM_PROCESSES), cwd=ROOT,
                            env=_env(cache, devices=NUM_PROCESSES), capture_output=True, text=True,
                            timeout=TIMEOUT_S)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]

    multi = tmp_path / "multi"
    stopped = _run_multihost(multi, cache, hook=True, expect=cli.EXIT_PREEMPTED)
    assert len(stopped) == NUM_PROCESSES, stopped[-1][1][-3000:]
    for i, (rc, out) in enumerate(stopped):  # process 0 got no signal, yet stops with process 1
        assert rc == cli.EXIT_PREEMPTED, f"process {i} exited with {rc}:\n{out[-3000:]}"
    assert "preempted at step 1/2" in stopped[0][1]
    assert "mesh {'data': 2" in stopped[0][1]
    assert _checkpoints(multi) == [1]  # the agreed step, saved once by both
    assert [s for s, _, _ in _losses(multi)] == [1]
    assert not (multi / "adapter").exists()

    resumed = _run_multihost(multi, cache)
    for i, (rc, out) in enumerate(resumed):
        assert rc == 0, f"process {i} exited with {rc}:\n{out[-3000:]}"
    assert len(resumed) == NUM_PROCESSES
    assert "resumed from checkpoint step 1" in resumed[0][1]
    assert _checkpoints(multi) == [1, 2]

    assert _losses(multi) == _losses(tmp_path / "single")
    ref, got = _adapter(tmp_path / "single"), _adapter(multi)
    assert sorted(ref) == sorted(got)
    for k in ref:  # same partitioned program, two-operand all-reduce: exact (see module doc)
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


# ------------------------------------------------------------------ distributed init (no runtime)
class _FakeJax:
    """What ``cli.initialize_distributed`` touches of jax: config and distributed.initialize."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.updates: dict = {}
        self.config = type("Config", (), {"jax_platforms": "cpu",
                                          "update": lambda _, k, v: self.updates.update({k: v})})()  # fmt: skip
        self.distributed = type("Distributed", (), {
            "initialize": staticmethod(lambda **kw: self.calls.append(kw))})()  # fmt: skip


@pytest.mark.parametrize(
    "env, want",
    [
        ({}, {}),
        ({"MIXAT_JAX_LOCAL_DEVICE_IDS": "0,1,2"}, {"local_device_ids": [0, 1, 2]}),
        (
            {"MIXAT_JAX_LOCAL_DEVICE_IDS": "all", "CUDA_VISIBLE_DEVICES": "4,5,6,7"},
            {"local_device_ids": [0, 1, 2, 3]},
        ),  # fmt: skip
        ({"MIXAT_JAX_INIT_TIMEOUT": "900"}, {"initialization_timeout": 900}),
        (
            {
                "MIXAT_JAX_COORDINATOR": "10.0.0.1:1234",
                "MIXAT_JAX_NUM_PROCESSES": "4",
                "MIXAT_JAX_PROCESS_ID": "3",
                "MIXAT_JAX_LOCAL_DEVICE_IDS": " 7 ",
            },
            {
                "coordinator_address": "10.0.0.1:1234",
                "num_processes": 4,
                "process_id": 3,
                "local_device_ids": [7],
            },
        ),  # fmt: skip
    ],
)
def test_initialize_distributed_kwargs(monkeypatch, env, want):
    for k in list(os.environ):
        if k.startswith("MIXAT_JAX_") or k in ("CUDA_VISIBLE_DEVICES", "JAX_PLATFORMS"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    fake = _FakeJax()
    cli.initialize_distributed(fake)
    assert fake.calls == [want]
    assert fake.updates == {"jax_cpu_collectives_implementation": "gloo"}


@pytest.mark.parametrize(
    "env, message",
    [
        ({"MIXAT_JAX_LOCAL_DEVICE_IDS": "0,x"}, "use 'all' or a comma-separated list"),
        ({"MIXAT_JAX_LOCAL_DEVICE_IDS": "1,1"}, "must be distinct"),
        ({"MIXAT_JAX_INIT_TIMEOUT": "soon"}, "MIXAT_JAX_INIT_TIMEOUT='soon' must be an integer"),
        ({"MIXAT_JAX_INIT_TIMEOUT": "0"}, "must be an integer >= 1"),
    ],
)
def test_distributed_env_errors_are_one_line(env, message):
    with pytest.raises(ValueError, match=message):
        cli.distributed_env_kwargs(env)


def test_local_device_ids_all_without_visible_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(cli, "cuda_device_count", lambda: 0)
    with pytest.raises(ValueError, match="no GPU visible"):
        cli.distributed_env_kwargs({"MIXAT_JAX_LOCAL_DEVICE_IDS": "all"})
    monkeypatch.setattr(cli, "cuda_device_count", lambda: 8)
    got = cli.distributed_env_kwargs({"MIXAT_JAX_LOCAL_DEVICE_IDS": "all"})
    assert got == {"local_device_ids": list(range(8))}


# ------------------------------------------------------------------ hub download once, then barrier
class _Hub:
    """Fake ``hf.load.snapshot``: a shared cache (set of ids) and an ordered event log."""

    def __init__(self, events: list, cached: set, fail: bool = False) -> None:
        self.events, self.cached, self.fail = events, cached, fail

    def __call__(self, hub_id: str, *, local_files_only: bool) -> str:
        self.events.append(("cache" if local_files_only else "download", hub_id))
        if local_files_only and hub_id not in self.cached:
            raise FileNotFoundError(hub_id)
        if not local_files_only:
            if self.fail:
                raise ConnectionError("offline")
            self.cached.add(hub_id)
        return f"/cache/{hub_id}"


def test_download_once_then_barrier(monkeypatch):
    from mixat_jax.hf import load

    events: list = []
    shared: set = set()
    monkeypatch.setattr(load, "snapshot", _Hub(events, shared))
    barrier = lambda name: events.append(("barrier", name))  # noqa: E731
    # process 0 downloads BEFORE the barrier; process 1 only reads the cache AFTER it
    assert load.download_once("org/m", process_index=0, process_count=2, barrier=barrier) == (
        "/cache/org/m")  # fmt: skip
    assert load.download_once("org/m", process_index=1, process_count=2, barrier=barrier) == (
        "/cache/org/m")  # fmt: skip
    assert events == [("download", "org/m"), ("barrier", "mixat_jax.hf.load download org/m"),
                      ("barrier", "mixat_jax.hf.load download org/m"), ("cache", "org/m")]  # fmt: skip

    # a host with its own (empty) cache downloads after the barrier
    events.clear()
    monkeypatch.setattr(load, "snapshot", _Hub(events, set()))
    load.download_once("org/m", process_index=1, process_count=2, barrier=barrier)
    assert [e[0] for e in events] == ["barrier", "cache", "download"]

    # process 0's failure: it still reaches the barrier (nobody hangs), then raises
    events.clear()
    monkeypatch.setattr(load, "snapshot", _Hub(events, set(), fail=True))
    with pytest.raises(ConnectionError):
        load.download_once("org/m", process_index=0, process_count=2, barrier=barrier)
    assert [e[0] for e in events] == ["download", "barrier"]

    # one process: a plain download, no barrier; resolve() goes through it for a hub id
    events.clear()
    monkeypatch.setattr(load, "snapshot", _Hub(events, set()))
    assert load.resolve("org/m") == Path("/cache/org/m")
    assert events == [("download", "org/m")]


# ------------------------------------------------------------------ the agreed stop decision
@pytest.mark.parametrize(
    "mine, gathered, want_stop, want_status",
    [
        (None, [0, 0], False, None),
        (None, [0, 15], True, "preempted"),  # only the other process got SIGTERM
        (2, [2, 15], True, "preempted"),  # Ctrl-C here, SIGTERM there: all exit 143
        (2, [2, 0], True, "interrupted"),
    ],
)
def test_preemption_flag_agree_adopts_any_process_signal(
    monkeypatch, mine, gathered, want_stop, want_status
):
    from mixat_jax.training import checkpoint as ckpt_lib

    sent = []

    def allgather(x):
        sent.append(int(np.asarray(x).reshape(-1)[0]))
        return np.asarray(gathered, np.int32).reshape(2, 1)

    monkeypatch.setattr(ckpt_lib.jax, "process_count", lambda: 2)
    monkeypatch.setattr(ckpt_lib.multihost_utils, "process_allgather", allgather)
    flag = ckpt_lib.PreemptionFlag()
    if mine is not None:
        flag.set(mine)
    assert flag.agree() is want_stop
    assert sent == [mine or 0]
    assert flag.requested is want_stop
    if want_stop:
        assert flag.status == want_status
