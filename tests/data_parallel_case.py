"""One data-parallel train step on a (data=2, fsdp=2) mesh with NON-default sharding rules
(issues #16, #17), shared by ``tests/test_data_parallel.py`` (one process, 4 of its simulated CPU
devices) and its two ``jax.distributed`` worker processes (2 simulated devices each), which run
this file as a script and print one JSON line: the step's loss and, per addressable device, the
batch rows it holds.

The global micro-batch is 4 batch shards × (1 adversarial + 1 utility slot), built with a seeded
numpy generator (identical on every process) and placed with ``loop.global_batch``.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

SHARD_ADV, SHARD_UTIL, LA, LU, V = 1, 1, 16, 12, 512
RULES = (  # differs from mesh.DEFAULT_RULES on every axis the tiny model shards
    ("vocab", None),
    ("embed", None),
    ("heads", "fsdp"),
    ("kv_heads", "fsdp"),
    ("mlp", "fsdp"),
    ("layers", None),
    ("norm", None),
)


def rows(rng, n, length, prompt_lens, target_lens, vocab=V):
    """Random token rows with their (valid, prompt, target) masks; pad id 0 past each row's end
    (also used by tests/test_steps.py)."""
    ids = rng.integers(1, vocab, (n, length)).astype(np.int32)
    pos = np.arange(length)[None]
    mask = pos < (prompt_lens + target_lens)[:, None]
    prompt = pos < prompt_lens[:, None]
    ids[~mask] = 0
    return ids, mask, prompt, mask & ~prompt


def make_batch(shards: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``[1, shards * slots, L]`` arrays; every row distinct (random ids)."""
    rng = np.random.default_rng(seed)
    a, u = SHARD_ADV * shards, SHARD_UTIL * shards
    plen = rng.integers(4, 8, a)
    away = rows(rng, a, LA, plen, rng.integers(3, 6, a))
    toward = rows(rng, a, LA, plen, rng.integers(2, 5, a))
    toward[0][toward[2]] = away[0][away[2]]
    out = {}
    for name, x, y in zip(("ids", "mask", "prompt_mask", "target_mask"), away, toward, strict=True):
        out[f"away_{name}_AxL"], out[f"toward_{name}_AxL"] = x, y
    util = rows(rng, u, LU, rng.integers(3, 6, u), rng.integers(3, 6, u))
    out.update(util_ids_UxM=util[0], util_mask_UxM=util[1], util_target_mask_UxM=util[3])
    out.update(adv_valid_A=np.ones(a, bool), util_valid_U=np.ones(u, bool))
    return {k: v[None] for k, v in out.items()}


def build(devices):
    """(mesh, jitted step, placed state, global batch, host batch, key) on ``devices``."""
    import jax
    import optax
    from flax import nnx

    from mixat_jax.attacks.continuous import ContinuousAttackConfig
    from mixat_jax.mesh import MeshConfig, batch_shards, make_mesh
    from mixat_jax.models.config import LoraConfig, tiny_config
    from mixat_jax.models.decoder import Decoder
    from mixat_jax.training.compiled_step import make_jitted_train_step
    from mixat_jax.training.loop import global_batch
    from mixat_jax.training.state import init_train_state, place_train_state
    from mixat_jax.training.step_config import StepConfig

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=1, rules=RULES), devices)
    model = Decoder(tiny_config(num_layers=1), rngs=nnx.Rngs(0))
    model.add_lora(LoraConfig(r=4, alpha=8.0, dropout=0.0, targets=("q_proj", "down_proj")))
    cfg = StepConfig(variant="sft", attack=ContinuousAttackConfig(iters=0), train_dropout=False)
    with jax.set_mesh(mesh):
        state = place_train_state(init_train_state(model, optax.sgd(1e-2)), mesh, RULES)
        step = make_jitted_train_step(cfg, mesh, {"xla_backend_optimization_level": 0},
                                      rules=RULES)  # fmt: skip
        host = make_batch(batch_shards(mesh))
        batch = global_batch(host, mesh)
    return mesh, step, state, batch, host, jax.random.key(0)


def run_step(devices) -> dict:
    """Runs the step; the loss and each addressable device's adversarial rows (start, stop)."""
    import jax

    mesh, step, state, batch, _, key = build(devices)
    arr = batch["away_ids_AxL"]
    rows = {str(s.device.id): [s.index[1].start, s.index[1].stop, list(s.data.shape)]
            for s in arr.addressable_shards}  # fmt: skip
    with jax.set_mesh(mesh):
        _, metrics = step(state, batch, key)
    return {"loss": float(metrics["loss"]), "rows": rows}


def main() -> None:
    import jax

    from mixat_jax import cli

    cli.initialize_distributed(jax)
    out = run_step(jax.devices())
    print("RESULT " + json.dumps({"process": jax.process_index(), **out}), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
