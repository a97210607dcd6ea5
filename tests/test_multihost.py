"""Multi-host path of ``python -m mixat_jax.train``: two local CPU processes form one JAX job.

Both processes run configs/tiny.py for 2 steps with ``mesh.data=2`` (1 CPU device each, so 2
global devices), joined by ``jax.distributed.initialize`` on a loopback coordinator
(``MIXAT_JAX_COORDINATOR`` / ``MIXAT_JAX_NUM_PROCESSES`` / ``MIXAT_JAX_PROCESS_ID``; gloo CPU
collectives). The slot counts are even, so every batch array is split over the two hosts
(``loop.global_batch``). Process 0 writes the adapter.

What is promised, and why it is exact: the reference is ONE process with two simulated CPU devices
and the same ``mesh.data=2``. Both runs then execute the same SPMD-partitioned program: each
device computes the gradient of its half of the global batch, and the halves are summed by an
all-reduce of two operands (in-process, or gloo between processes). A sum of two floats is
commutative and correctly rounded, so the adapters must be bitwise equal on any CPU: the
distributed runtime adds no numerical difference. (Comparing against a ``mesh.data=1`` run, as an
earlier version did, compares two different summation orders; that difference depends on the CPU's
kernels and is covered, with tolerances, by the sharded-vs-unsharded tests.)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240
NUM_PROCESSES = 2


def _env(devices: int = 1, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXAT_JAX_")}
    xla = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
    env.update(XLA_FLAGS=xla, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               TOKENIZERS_PARALLELISM="false", **extra)  # fmt: skip
    return env


def _cmd(workdir: Path, cache: Path, data: int) -> list[str]:
    return [sys.executable, "-m", "mixat_jax.train", "--config=configs/tiny.py",
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


def _run_multihost(workdir: Path, cache: Path) -> list[tuple[int, str]]:
    """Runs the two processes; returns [(returncode, output)] (children killed on failure)."""
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = []
    try:
        for i in range(NUM_PROCESSES):
            env = _env(MIXAT_JAX_DISTRIBUTED="1", MIXAT_JAX_COORDINATOR=coordinator,
                       MIXAT_JAX_NUM_PROCESSES=str(NUM_PROCESSES), MIXAT_JAX_PROCESS_ID=str(i))  # fmt: skip
            procs.append(subprocess.Popen(
                _cmd(workdir, cache, data=NUM_PROCESSES), cwd=ROOT, env=env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))  # fmt: skip
        deadline = time.monotonic() + TIMEOUT_S
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, out))
            if p.returncode != 0:  # the peer would block in a collective: do not wait for it
                break
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


@pytest.mark.slow
def test_two_process_run_equals_single_process(tmp_path):
    cache = tmp_path / "tiny"
    single = subprocess.run(_cmd(tmp_path / "single", cache, data=NUM_PROCESSES), cwd=ROOT,
                            env=_env(devices=NUM_PROCESSES), capture_output=True, text=True,
                            timeout=TIMEOUT_S)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]

    results = _run_multihost(tmp_path / "multi", cache)
    for i, (rc, out) in enumerate(results):
        assert rc == 0, f"process {i} exited with {rc}:\n{out[-3000:]}"
    assert len(results) == NUM_PROCESSES
    assert "mesh {'data': 2" in results[0][1]

    ref, got = _adapter(tmp_path / "single"), _adapter(tmp_path / "multi")
    assert sorted(ref) == sorted(got)
    for k in ref:  # same partitioned program, two-operand all-reduce: exact (see module doc)
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
