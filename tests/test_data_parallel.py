"""Data parallelism and micro-batch composition (issue #16 "Batch placement", issue #17).

* mesh: physical device order, a hybrid mesh on multi-slice devices (only data crosses slices);
* stream: a global micro-batch = ``shards`` one-shard compositions; one shard = today's stream;
* composition: "reference" is exact (Binomial adversarial counts, ~35 % adversarial-free
  micro-batches at the default rates); "fixed" fills every slot at epoch boundaries;
* metrics: an absent term is dropped, never NaN;
* one train step on a (data=2, fsdp=2) mesh with non-default rules: the compiled step's in/out
  shardings follow the rules; two ``jax.distributed`` processes x 2 CPU devices hold a quarter
  of the batch each and give the loss of the one-process run (``tests/data_parallel_case.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from mixat_jax import mesh as mesh_lib
from mixat_jax.training import batches as B
from mixat_jax.training import data as D
from mixat_jax.training import run_config as rc
from mixat_jax.training import step_metrics
from mixat_jax.training.stream import EpochStream, load_rows
from tests.fast_compile import FAST_COMPILE_XLA_FLAGS

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ mesh
@dataclasses.dataclass(frozen=True)
class FakeDevice:
    id: int
    slice_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"
    process_index: int = 0


def test_hybrid_mesh_only_data_crosses_slices():
    # 2 slices x 4 devices, listed interleaved: the grid must still group devices by slice
    devices = [FakeDevice(i, i % 2) for i in range(8)]
    grid = mesh_lib.device_grid(mesh_lib.MeshConfig(data=1, fsdp=-1, tensor=2), devices)
    assert grid.shape == (2, 2, 2)  # data = 2 slices x mesh.data=1; fsdp/tensor inside a slice
    slices = np.vectorize(lambda d: d.slice_index)(grid)
    assert (slices == np.arange(2)[:, None, None]).all()  # fsdp and tensor never cross a slice
    grid = mesh_lib.device_grid(mesh_lib.MeshConfig(data=2, fsdp=2, tensor=1), devices)
    assert grid.shape == (4, 2, 1)
    assert np.vectorize(lambda d: d.slice_index)(grid)[:, :, 0].tolist() == [
        [0, 0],
        [0, 0],
        [1, 1],
        [1, 1],
    ]
    with pytest.raises(ValueError, match="describes ONE of the 2 slices"):
        mesh_lib.device_grid(mesh_lib.MeshConfig(data=1, fsdp=8), devices)
    with pytest.raises(ValueError, match="different device counts"):
        mesh_lib.device_grid(mesh_lib.MeshConfig(), devices[:7])


def test_single_slice_mesh_is_jax_make_mesh():
    cfg = mesh_lib.MeshConfig(data=2, fsdp=-1)
    mesh = mesh_lib.make_mesh(cfg)
    ref = jax.make_mesh(cfg.shape(jax.device_count()), mesh_lib.AXES)
    assert mesh.devices.tolist() == ref.devices.tolist()
    assert mesh_lib.batch_shards(mesh) == jax.device_count()


def test_global_batch_places_rows_by_the_sharding_and_refuses_indivisible_slots():
    from mixat_jax.training.loop import global_batch

    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=2, fsdp=2), jax.devices()[:4])
    host = {"util_ids_UxM": np.arange(1 * 8 * 3).reshape(1, 8, 3), "adv_valid_A": np.ones(4, bool)}
    placed = global_batch(host, mesh)
    for shard in placed["util_ids_UxM"].addressable_shards:
        assert shard.data.shape == (1, 2, 3)
        np.testing.assert_array_equal(shard.data, host["util_ids_UxM"][shard.index])
    with pytest.raises(ValueError, match="6 slots, not divisible by the 4 batch shards"):
        global_batch({"util_ids_UxM": np.zeros((1, 6, 3), np.int32)}, mesh)


# ------------------------------------------------------------------------------ stream
def _tiny_stream(shards: int = 1) -> tuple[EpochStream, B.BatchLayout]:
    sys.path.insert(0, str(ROOT))
    from configs import tiny  # the default tiny config (1 + 3 slots, synthetic world)

    cfg = rc.from_config_dict(tiny.get_config())
    adv, util = load_rows(cfg.data, cfg.dat)
    mixture = D.interleave(adv, util, adv_probability=cfg.data.adv_probability,
                           seed=cfg.data.interleave_seed)  # fmt: skip
    return EpochStream(mixture, cfg.batch, cfg.seed, shards=shards), cfg.batch


def _key(r):
    return (
        ["a", r.behavior_id, r.target] if isinstance(r, D.AdvRow) else ["u", json.dumps(r.messages)]
    )


def test_one_shard_stream_is_unchanged_and_shards_concatenate_it():
    one, layout = _tiny_stream()
    # pinned: the first 16 micro-batches (configs/tiny.py's 8 steps x 2) as the code before
    # issue #16 composed them (hash of their rows' identities)
    rows = [[[_key(r) for r in one[m].adv_rows], [_key(r) for r in one[m].util_rows]]
            for m in range(16)]  # fmt: skip
    digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    assert digest == "662db29ded62b4464a143d583b40eb28db55874de3518c65faa28fb735a438ee"
    assert one.packing_layout(16) == layout

    four, _ = _tiny_stream(shards=4)
    assert four.packing_layout(8) == dataclasses.replace(layout, adv_slots=4, util_slots=12)
    per_epoch = one.micro_batches_in(1)
    assert four.micro_batches_in(1) == -(-per_epoch // 4)
    for k in range(per_epoch // 4):  # global micro-batch k = one-shard micro-batches 4k..4k+3
        got = four[k]
        want = [one[4 * k + j] for j in range(4)]
        assert got.adv_rows == [r for mb in want for r in mb.adv_rows]
        assert got.util_rows == [r for mb in want for r in mb.util_rows]


def test_fixed_composition_fills_utility_slots_at_epoch_boundaries():
    # configs/demo.py's stream: 90 adversarial + 245 utility rows, 2 + 6 slots. It used to end
    # every epoch with 4 micro-batches without a utility row (utility nan at steps 42-45, ...).
    spec = rc.DataSpec(source="synthetic", behaviors="", targets="", safe_responses="",
                       utility="")  # fmt: skip
    adv, util = load_rows(spec)
    mixture = D.interleave(adv, util, adv_probability=0.25, seed=D.INTERLEAVE_SEED)
    stream = EpochStream(mixture, B.BatchLayout(adv_slots=2, util_slots=6), seed=0)
    ends = [stream.micro_batches_in(e) for e in (1, 2, 3)]
    assert ends[0] == 45
    for m in range(ends[-1]):
        assert len(stream[m].util_rows) == 6 and len(stream[m].adv_rows) == 2, m


# ------------------------------------------------------------------------------ composition
def _default_mixture(n_adv=1188, n_util=9000):
    adv = [D.AdvRow(f"b{i}", "x", "t") for i in range(n_adv)]
    util = [D.UtilityRow([{"role": "user", "content": str(i)}]) for i in range(n_util)]
    return D.interleave(adv, util)  # p = 0.125, seed 42: the default mixture


def test_reference_composition_statistics():
    mixture = _default_mixture()
    p = sum(isinstance(r, D.AdvRow) for r in mixture) / len(mixture)
    layout = B.BatchLayout(composition="reference")  # default slots 1 + 7, 8 rows per chunk
    stream = EpochStream(mixture, layout, seed=0)
    n = stream.micro_batches_in(2)
    counts = np.array([len(stream[m].adv_rows) for m in range(n)])
    assert (counts + [len(stream[m].util_rows) for m in range(n)] == 8).sum() >= n - 2
    no_adv = float(np.mean(counts == 0))
    expected = (1 - p) ** 8  # Binomial(8, p): 0.350 at p = 0.1228
    assert abs(no_adv - expected) < 3 * np.sqrt(expected * (1 - expected) / n) + 0.01
    assert abs(counts.mean() - 8 * p) < 0.05
    # exact (no carry-over): the packing layout is sized to the largest chunk of the run
    packing = stream.packing_layout(n)
    assert packing.adv_slots == counts.max() > 1 and packing.util_slots == 8
    # the adversarial terms' weight relative to the reference under "fixed" (every micro-batch)
    fixed = EpochStream(mixture, B.BatchLayout(), seed=0)
    assert all(len(fixed[m].adv_rows) == 1 for m in range(fixed.micro_batches_in(1)))
    assert 1.5 < 1 / (1 - no_adv) < 1.6


# ------------------------------------------------------------------------------ metrics
def test_absent_terms_are_dropped_not_nan():
    one, zero = np.float32(1.0), np.float32(0.0)
    parts = step_metrics.empty_parts()
    values = {k: one for k in step_metrics.METRIC_NAMES}
    values.update(num_adv_rows=np.float32(2.0), num_util_rows=zero)
    tokens = {k: (one, one) for k in step_metrics.TOKEN_WEIGHTED}
    mb = step_metrics.microbatch_parts(values, tokens, has_adv=np.bool_(True),
                                       has_util=np.bool_(False))  # fmt: skip
    raw = step_metrics.finish_parts(step_metrics.combine_parts(parts, mb), None)
    assert np.isnan(float(raw["utility"]))  # in the program: mean over no micro-batch
    host = step_metrics.drop_absent({k: float(v) for k, v in raw.items()})
    assert "utility" not in host and host["num_util_rows"] == 0.0
    assert all(np.isfinite(v) for v in host.values())
    assert host["away"] == 1.0
    no_adv = step_metrics.drop_absent({"away": float("nan"), "delta_norm_mean": float("nan"),
                                       "num_adv_rows": 0.0, "loss": 1.0})  # fmt: skip
    assert no_adv == {"num_adv_rows": 0.0, "loss": 1.0}


# ------------------------------------------------------------------------------ one step
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spec(sharding) -> tuple:
    """The partition spec without trailing Nones (P() == P(None, None))."""
    spec = list(sharding.spec)
    while spec and spec[-1] is None:
        spec.pop()
    return tuple(spec)


@pytest.mark.slow
def test_rules_and_two_process_data_parallel_step():
    from tests import data_parallel_case as case

    # two processes x 2 simulated devices, started first (they run while this process compiles)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXAT_JAX_")}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {FAST_COMPILE_XLA_FLAGS}",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), MIXAT_JAX_DISTRIBUTED="1",
               MIXAT_JAX_COORDINATOR=f"127.0.0.1:{_free_port()}", MIXAT_JAX_NUM_PROCESSES="2")  # fmt: skip
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "data_parallel_case.py")],
                              cwd=ROOT, env={**env, "MIXAT_JAX_PROCESS_ID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]  # fmt: skip
    try:
        mesh, step, state, batch, host, key = case.build(jax.devices()[:4])
        # the compiled step's shardings follow the run's (non-default) rules, not DEFAULT_RULES
        from mixat_jax.training.state import train_state_shardings

        want = train_state_shardings(state, mesh, case.RULES)
        default = train_state_shardings(state, mesh)
        with jax.set_mesh(mesh):
            compiled = step.compile(state, batch, key)
        donated_in, kept_in = compiled.input_shardings[0][:2]
        got_frozen = jax.tree.leaves(kept_in[0])
        want_frozen = jax.tree.leaves(want.frozen)
        assert [_spec(s) for s in got_frozen] == [_spec(s) for s in want_frozen]
        assert [_spec(s) for s in want_frozen] != [
            _spec(s) for s in jax.tree.leaves(default.frozen)
        ]
        (lora_out, opt_out, _), _ = compiled.output_shardings
        assert [_spec(s) for s in jax.tree.leaves(lora_out)] == [
            _spec(s) for s in jax.tree.leaves(want.lora)
        ]
        assert [_spec(s) for s in jax.tree.leaves(opt_out)] == [
            _spec(s) for s in jax.tree.leaves(want.opt_state)
        ]
        assert [_spec(s) for s in jax.tree.leaves(want.lora)] != [
            _spec(s) for s in jax.tree.leaves(default.lora)
        ]
        with jax.set_mesh(mesh):
            _, metrics = step(state, batch, key)
        loss = float(metrics["loss"])

        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    results = []
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
        results.append(json.loads(out.split("RESULT ", 1)[1].splitlines()[0]))
    a = host["away_ids_AxL"].shape[1]
    assert a == 4 * case.SHARD_ADV
    held = sorted(tuple(v[:2]) for r in results for v in r["rows"].values())
    assert held == [(i, i + 1) for i in range(a)]  # 4 devices, 4 different quarters of the batch
    assert all(v[2] == [1, a // 4, case.LA] for r in results for v in r["rows"].values())
    for r in results:  # same program, 4-operand all-reduce over gloo instead of in-process
        np.testing.assert_allclose(r["loss"], loss, rtol=1e-6)
