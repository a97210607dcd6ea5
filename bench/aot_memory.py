"""AOT compile of the FULL MixAT train step at real size on 8 simulated CPU devices.

    python bench/aot_memory.py [--preset llama3_8b] [--meshes 1x8x1,2x4x1,1x4x2] \
        [--adv 1] [--util 8] [--len 256] [--len_adv 256] [--grad_accum 8] [--lora_r 64] \
        [--remat] [--out bench/results/aot_memory]
    python bench/aot_memory.py --config configs/dat/qwen2_5_14b.py [--meshes 1x8x1] [--out ...]

``--config FILE`` takes the step (variant, attack iterations, loss), the batch layout, the
gradient accumulation, LoRA rank/alpha/dropout, remat and the model preset (by the config's
model id, :data:`MODEL_PRESETS`) from a training config instead of the flags (DAT's configs:
DAT spec §2.3).

Lowers and compiles ``steps.make_jitted_train_step`` (continuous attack with 10 iterations
inside, C-AdvUL loss, AdamW update, G-micro-batch ``lax.scan``) for Llama-3-8B shapes in bf16
with fp32 LoRA (r 64, all linear layers) on each mesh ``data x fsdp x tensor``, from ABSTRACT
inputs only (``jax.ShapeDtypeStruct`` with their ``NamedSharding``; no weight is allocated), and
reports ``compiled.memory_analysis()`` per device. Writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from mixat_jax import mesh as mesh_lib  # noqa: E402
from mixat_jax import steps as steps_lib  # noqa: E402
from mixat_jax.models.config import LoraConfig, preset  # noqa: E402
from mixat_jax.models.decoder import Decoder  # noqa: E402
from mixat_jax.training import run_config  # noqa: E402
from mixat_jax.training.batches import BatchLayout, batch_shapes  # noqa: E402
from mixat_jax.training.optim import OptimConfig, make_optimizer  # noqa: E402
from mixat_jax.training.state import init_train_state, train_state_shardings  # noqa: E402
from mixat_jax.training.step_config import StepConfig  # noqa: E402

GIB = 1024**3
MODEL_PRESETS = {  # training configs' model ids -> model shape presets
    "meta-llama/Meta-Llama-3-8B-Instruct": "llama3_8b",
    "meta-llama/Llama-3.1-8B-Instruct": "llama3_8b",
    "mistralai/Mistral-7B-Instruct-v0.1": "mistral_7b",
    "HuggingFaceH4/zephyr-7b-beta": "mistral_7b",
    "Qwen/Qwen2.5-14B-Instruct": "qwen2_5_14b",
    "Qwen/Qwen2.5-32B-Instruct": "qwen2_5_32b",
}
FIELDS = (
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "alias_size_in_bytes",
    "temp_size_in_bytes",
    "generated_code_size_in_bytes",
)


def abstract_state(model_preset: str, lora_r: int, remat: bool, tx, lora: LoraConfig | None = None):
    """TrainState of ShapeDtypeStructs (jax.eval_shape: nothing is allocated)."""
    cfg = preset(model_preset, dtype="bfloat16", remat=remat)
    lora = lora or LoraConfig.make(r=lora_r, alpha=16, dropout=0.1)

    def make():
        model = Decoder(cfg, rngs=nnx.Rngs(0))
        model.add_lora(lora, 0)
        return init_train_state(model, tx)

    return jax.eval_shape(make), cfg


def with_shardings(tree, shardings):
    """Attach each leaf's NamedSharding (leaves may be NNX Variables holding abstract values)."""

    def one(x, s):
        if isinstance(x, nnx.Variable):
            v = x.get_value()
            return x.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s))
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    return jax.tree.map(one, tree, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_batch(layout: BatchLayout, g: int, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    shapes = {k: ((g, *shape), dtype) for k, (shape, dtype) in batch_shapes(layout).items()}
    probe = {k: np.zeros(s, d) for k, (s, d) in ((k, (s, np.bool_)) for k, (s, _) in
                                                    shapes.items())}  # fmt: skip
    shardings = steps_lib.step_batch_shardings(probe, mesh)
    return {k: jax.ShapeDtypeStruct(s, d, sharding=shardings[k]) for k, (s, d) in shapes.items()}


def load_run_config(path: str):
    """The validated ``RunConfig`` of a training config file (``FILE[:arg]``)."""
    file, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("aot_config", file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return run_config.from_config_dict(mod.get_config(arg or None))


def apply_config(args, cfg) -> None:
    """Flag values from a ``RunConfig`` (the step, layout, accumulation, LoRA, remat, preset)."""
    if cfg.model not in MODEL_PRESETS:
        raise ValueError(f"no shape preset for model {cfg.model!r}; add it to MODEL_PRESETS")
    args.preset = MODEL_PRESETS[cfg.model]
    args.adv, args.util = cfg.batch.adv_slots, cfg.batch.util_slots
    args.len, args.len_adv = cfg.batch.max_len_util, cfg.batch.max_len_adv
    args.grad_accum, args.remat, args.lora_r = cfg.grad_accum, cfg.remat, cfg.lora.r
    args.step_config, args.lora, args.optim = cfg.step, cfg.lora.build(), cfg.optim


def lower_step(args, mesh_shape: tuple[int, int, int]):
    """(lowered train step, its abstract state, model config) on mesh ``data x fsdp x tensor``."""
    d, f, t = mesh_shape
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=d, fsdp=f, tensor=t))
    tx = make_optimizer(getattr(args, "optim", None) or OptimConfig(), 302)
    lora = getattr(args, "lora", None)
    state, model_cfg = abstract_state(args.preset, args.lora_r, args.remat, tx, lora)
    with jax.set_mesh(mesh):
        shardings = train_state_shardings(state, mesh)
        state = state.replace(
            lora=with_shardings(state.lora, shardings.lora),
            frozen=with_shardings(state.frozen, shardings.frozen),
            opt_state=with_shardings(state.opt_state, shardings.opt_state),
            step=with_shardings(state.step, shardings.step),
            emb_norm=with_shardings(state.emb_norm, shardings.emb_norm),
        )
        layout = BatchLayout(args.adv, args.util, args.len_adv, args.len)
        batch = abstract_batch(layout, args.grad_accum, mesh)
        key = jax.ShapeDtypeStruct(
            (), jax.random.key(0).dtype, sharding=NamedSharding(mesh, PartitionSpec())
        )
        step_cfg = getattr(args, "step_config", None) or StepConfig()
        step = steps_lib.make_jitted_train_step(step_cfg, mesh)
        return step.lower(state, batch, key), state, model_cfg, mesh


def compile_one(args, mesh_shape: tuple[int, int, int]) -> dict:
    d, f, t = mesh_shape
    t0 = time.perf_counter()
    lowered, state, model_cfg, mesh = lower_step(args, mesh_shape)
    t1 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = lowered.compile()
        t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    row = {f: int(getattr(mem, f)) for f in FIELDS}
    live = row["argument_size_in_bytes"] + row["output_size_in_bytes"]
    live += row["temp_size_in_bytes"] - row["alias_size_in_bytes"]
    n_lora = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.lora))
    return {
        "mesh": {"data": d, "fsdp": f, "tensor": t},
        "per_device_bytes": row,
        "peak_estimate_gib": live / GIB,
        "lower_seconds": t1 - t0,
        "compile_seconds": t2 - t1,
        "model_params": int(model_cfg.num_params()),
        "lora_params": n_lora,
    }


def markdown(args, rows: list[dict]) -> str:
    step_cfg = getattr(args, "step_config", None) or StepConfig()
    source = f"`{args.config}`, " if args.config else ""
    head = (
        f"# AOT memory of the full {step_cfg.variant} train step ({source}{args.preset}, bf16 "
        f"base, fp32 LoRA r={args.lora_r}, remat={args.remat})\n\n"
        f"Batch per optimizer step: {args.grad_accum} micro-batches x ({args.adv} adversarial "
        f"pair(s) of length {args.len_adv} + {args.util} utility rows of length {args.len}); "
        f"continuous attack {step_cfg.attack.iters} iterations inside the step. 8 simulated CPU devices; "
        f"`compiled.memory_analysis()` per device, GiB.\n\n"
        "| mesh (data x fsdp x tensor) | arguments | outputs | aliased | temp | peak est. "
        "| compile s |\n|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        m, b = r["mesh"], r["per_device_bytes"]
        lines.append(
            f"| {m['data']}x{m['fsdp']}x{m['tensor']} | {b['argument_size_in_bytes'] / GIB:.2f} "
            f"| {b['output_size_in_bytes'] / GIB:.2f} | {b['alias_size_in_bytes'] / GIB:.2f} "
            f"| {b['temp_size_in_bytes'] / GIB:.2f} | {r['peak_estimate_gib']:.2f} "
            f"| {r['compile_seconds']:.0f} |"
        )
    note = (
        "\n\npeak est. = arguments + outputs + temp - aliased (donated LoRA/optimizer buffers "
        "are reused for the outputs).\n"
    )
    return head + "\n".join(lines) + note


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama3_8b")
    p.add_argument("--meshes", default="1x8x1,2x4x1,1x4x2")
    p.add_argument("--adv", type=int, default=1)
    p.add_argument("--util", type=int, default=8)
    p.add_argument("--len", type=int, default=256)
    p.add_argument("--len_adv", type=int, default=256)
    p.add_argument("--grad_accum", type=int, default=8)
    p.add_argument("--lora_r", type=int, default=64)
    p.add_argument("--remat", action="store_true")
    p.add_argument("--out", default="bench/results/aot_memory")
    p.add_argument("--config", default="", help="a training config FILE[:arg] (overrides flags)")
    args = p.parse_args(argv)
    if args.config:
        try:
            apply_config(args, load_run_config(args.config))
        except (OSError, ValueError) as e:
            print(f"error: --config {args.config!r}: {e}", file=sys.stderr)
            return 2
    try:
        meshes = [tuple(int(x) for x in m.split("x")) for m in args.meshes.split(",")]
        if any(len(m) != 3 for m in meshes):
            raise ValueError
    except ValueError:
        print(f"error: --meshes {args.meshes!r}: use DxFxT[,DxFxT...]", file=sys.stderr)
        return 2
    if jax.device_count() != 8:
        print(f"error: needs 8 devices, found {jax.device_count()}", file=sys.stderr)
        return 2
    rows = []
    for m in meshes:
        try:
            row = compile_one(args, m)
        except ValueError as e:
            print(f"error: mesh {m}: {e}", file=sys.stderr)
            return 2
        print(json.dumps(row), flush=True)
        rows.append(row)
    write_results(args, rows, markdown(args, rows))
    return 0


def write_results(args, rows: list[dict], table: str) -> None:
    """`args.out` + .json (arguments and rows) and .md (the table), and the table on stdout."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps({"args": vars(args), "rows": rows}, indent=2, default=str)
    )
    out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    sys.exit(main())
