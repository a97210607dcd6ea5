"""AOT compile of the jitted masked-diffusion sampler at LLaDA-8B shape on 8 simulated CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 PYTHONPATH=. \
        python bench/aot_memory_diffusion.py [--meshes 8x1x1,2x4x1,1x8x1] [--batches 64,256] \
        [--prompt_len 32] [--answer_len 64] [--steps 32] [--sampler aapl|plain] [--cfg_scale 0] \
        [--out bench/results/aot_memory_diffusion]

Lowers and compiles `mixat_jax.diffusion.sampler.sample_jitted` (the whole `steps`-step
`lax.scan` denoising loop, DAT Stage A inpainting, spec §2.2 / §5.3) for LLaDA-8B shapes (d_model
4096, 32 layers, 32 query = 32 KV heads of 128, SwiGLU 12288, vocab 126464, untied head, bf16,
bidirectional, [MASK] = 126336; spec §5.1) on each mesh `data x fsdp x tensor` and each batch
(canvases of `prompt_len` masks + `answer_len` answer tokens), from ABSTRACT inputs only:
`nnx.eval_shape` builds the decoder's parameters as `jax.ShapeDtypeStruct`s, each given the
`NamedSharding` of its logical axes (`mesh.state_shardings`: embed over fsdp, heads/mlp/vocab
over tensor), the canvas/attention/editable arrays are sharded on the batch axis over
(data, fsdp) — no weight is allocated. Reports `compiled.memory_analysis()` per device.
`--sampler aapl` (default) is the Stage-A sampler (`inpaint.default_sampler`: steps = P, T = 0,
low-confidence, conditioning dropout, global remasking every 8, BOS/EOS/PAD suppressed);
`plain` drops the two AAPL options. Writes `OUT.json` and `OUT.md`.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aot_memory import FIELDS, GIB, with_shardings, write_results  # noqa: E402

from mixat_jax import mesh as mesh_lib  # noqa: E402
from mixat_jax.diffusion.inpaint import default_sampler  # noqa: E402
from mixat_jax.diffusion.sampler import sample_jitted  # noqa: E402
from mixat_jax.models.config import ModelConfig  # noqa: E402
from mixat_jax.models.decoder import Decoder  # noqa: E402

# LLaDA-8B (spec §5.1): full MHA, FFN 12288, vocab = embedding_size 126464, untied head.
LLADA_8B = dict(
    vocab_size=126464,
    hidden_size=4096,
    intermediate_size=12288,
    num_layers=32,
    num_heads=32,
    num_kv_heads=32,
    head_dim=128,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    model_type="llada",
    max_position_embeddings=4096,
    bos_token_id=126080,
    eos_token_ids=(126081,),
    pad_token_id=126081,
    causal=False,
    mask_token_id=126336,
)


def abstract_model(cfg: ModelConfig, mesh):
    """(graphdef, state) of the decoder with ShapeDtypeStruct leaves carrying their shardings."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    return graphdef, with_shardings(state, mesh_lib.state_shardings(state, mesh))


def hoisted_f32_weight_copies(hlo: str) -> int:
    """Bytes of f32 copies of whole bf16 parameters made in the ENTRY computation.

    XLA:CPU has no bf16 matmul, so it upcasts the dots' bf16 weights; when the weights are
    loop-invariant (replicated over the mesh, as in a pure data-parallel mesh), loop-invariant
    code motion hoists `convert(param)` for the WHOLE stacked [layers, ...] weight out of both
    scans, i.e. an fp32 copy of the parameters lives for the whole call. GPU/TPU run bf16 dots
    natively and never make it, so it is reported separately and subtracted in `peak_gpu_like`.
    """
    start = hlo.find("\nENTRY ")
    if start < 0:
        return 0
    entry = hlo[start + 1 :]
    header = entry.splitlines()[0]
    bf16_params = dict(re.findall(r"(param[.\d]*): bf16\[([\d,]+)\]", header))
    total = 0
    pattern = r"= f32\[([\d,]+)\]\{[^}]*\} (?:fusion|convert)\(%(param[.\d]*)\)"
    for dims, name in re.findall(pattern, entry):
        if bf16_params.get(name) == dims:
            total += int(np.prod([int(x) for x in dims.split(",")])) * 4
    return total


def compile_one(args, model_cfg: ModelConfig, mesh_shape: tuple[int, int, int], batch: int):
    d, f, t = mesh_shape
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=d, fsdp=f, tensor=t))
    if batch % (d * f):
        raise ValueError(f"batch {batch} is not divisible by data x fsdp = {d * f}")
    length = args.prompt_len + args.answer_len
    specials = (model_cfg.bos_token_id, *model_cfg.eos_token_ids, model_cfg.pad_token_id)
    sampler = default_sampler(
        model_cfg, args.prompt_len, steps=args.steps, cfg_scale=args.cfg_scale,
        suppress_ids=tuple(sorted(set(specials))),
    )  # fmt: skip
    if args.sampler == "plain":
        sampler = sampler.replace(cond_dropout=False, global_remask_every=0)
    with jax.set_mesh(mesh):
        graphdef, state = abstract_model(model_cfg, mesh)
        rows = mesh_lib.batch_sharding(mesh, 2)
        canvas_BxL = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=rows)
        attn_BxL = jax.ShapeDtypeStruct((batch, length), jnp.bool_, sharding=rows)
        editable_BxL = jax.ShapeDtypeStruct((batch, length), jnp.bool_, sharding=rows)
        key = jax.ShapeDtypeStruct(
            (), jax.random.key(0).dtype, sharding=NamedSharding(mesh, PartitionSpec())
        )
        t0 = time.perf_counter()
        lowered = sample_jitted.lower(
            graphdef, state, canvas_BxL, attn_BxL, editable_BxL, key, cfg=sampler,
            fill_width=args.prompt_len,
        )  # fmt: skip
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    row = {k: int(getattr(mem, k)) for k in FIELDS}
    live = row["argument_size_in_bytes"] + row["output_size_in_bytes"]
    live += row["temp_size_in_bytes"] - row["alias_size_in_bytes"]
    f32_copies = hoisted_f32_weight_copies(compiled.as_text())
    param_bytes = sum(
        int(np.prod(s.sharding.shard_shape(s.shape))) * s.dtype.itemsize
        for s in jax.tree.leaves(state)
    )
    logits_bytes = batch // (d * f) * length * model_cfg.vocab_size * 4
    if args.cfg_scale:
        logits_bytes *= 2
    return {
        "mesh": {"data": d, "fsdp": f, "tensor": t},
        "batch": batch,
        "canvas_len": length,
        "per_device_bytes": row,
        "peak_estimate_gib": live / GIB,
        "xla_cpu_f32_weight_copies_gib": f32_copies / GIB,
        "peak_gpu_like_gib": (live - f32_copies) / GIB,
        "param_shard_gib": param_bytes / GIB,
        "fp32_logits_per_step_gib": logits_bytes / GIB,
        "lower_seconds": t1 - t0,
        "compile_seconds": t2 - t1,
        "model_params": int(model_cfg.num_params()),
        "sampler": {
            "steps": sampler.steps,
            "cond_dropout": sampler.cond_dropout,
            "global_remask_every": sampler.global_remask_every,
            "cfg_scale": sampler.cfg_scale,
        },
    }


def markdown(args, rows: list[dict]) -> str:
    length = args.prompt_len + args.answer_len
    head = (
        f"# AOT memory of the masked-diffusion sampler (LLaDA-8B shapes, bf16)\n\n"
        f"`sample_jitted`: {args.steps} denoising steps in one `lax.scan`, canvas {length} tokens "
        f"({args.prompt_len} [MASK] + {args.answer_len} answer), sampler `{args.sampler}`"
        f"{f', CFG {args.cfg_scale}' if args.cfg_scale else ''}; batch sharded over "
        f"(data, fsdp), parameters by their logical axes (embed over fsdp, heads/mlp/vocab over "
        f"tensor). 8 simulated CPU devices; `compiled.memory_analysis()` per device, GiB.\n\n"
        "| mesh (data x fsdp x tensor) | batch | arguments (param shard) | temp "
        "| peak est. (XLA:CPU) | of which f32 weight copies | peak without them "
        "| fp32 logits / step | compile s |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        m, b = r["mesh"], r["per_device_bytes"]
        lines.append(
            f"| {m['data']}x{m['fsdp']}x{m['tensor']} | {r['batch']} "
            f"| {b['argument_size_in_bytes'] / GIB:.2f} ({r['param_shard_gib']:.2f}) "
            f"| {b['temp_size_in_bytes'] / GIB:.2f} | {r['peak_estimate_gib']:.2f} "
            f"| {r['xla_cpu_f32_weight_copies_gib']:.2f} | **{r['peak_gpu_like_gib']:.2f}** "
            f"| {r['fp32_logits_per_step_gib']:.2f} "
            f"| {r['compile_seconds']:.0f} |"
        )
    note = (
        "\n\npeak est. = arguments + outputs + temp - aliased (XLA:CPU buffer assignment; outputs "
        "are a few KiB). f32 weight copies = `convert(bf16 param -> f32)` of whole stacked "
        "weights that XLA:CPU (no bf16 matmul) hoists out of the loops when the parameters are "
        "loop-invariant; GPU/TPU run bf16 dots natively, so 'peak without them' is the "
        "estimate to plan accelerator memory with (still an XLA:CPU schedule, not a GPU "
        "measurement). fp32 logits / step = the per-device [B/(data·fsdp), L, V] fp32 logits "
        "of one denoising step, for scale.\n"
    )
    return head + "\n".join(lines) + note


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--meshes", default="8x1x1,2x4x1,1x8x1")
    p.add_argument("--batches", default="64,256")
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--answer_len", type=int, default=64)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--sampler", choices=("aapl", "plain"), default="aapl")
    p.add_argument("--cfg_scale", type=float, default=0.0)
    p.add_argument("--out", default="bench/results/aot_memory_diffusion")
    args = p.parse_args(argv)
    try:
        meshes = [tuple(int(x) for x in m.split("x")) for m in args.meshes.split(",")]
        batches = [int(b) for b in args.batches.split(",")]
        if any(len(m) != 3 for m in meshes) or min(batches) < 1:
            raise ValueError
    except ValueError:
        print(
            f"error: --meshes {args.meshes!r} / --batches {args.batches!r}: use "
            "DxFxT[,DxFxT...] and N[,N...]",
            file=sys.stderr,
        )
        return 2
    if jax.device_count() != 8:
        print(f"error: needs 8 devices, found {jax.device_count()}", file=sys.stderr)
        return 2
    model_cfg = ModelConfig(**LLADA_8B, dtype="bfloat16")
    rows = []
    for m in meshes:
        for b in batches:
            try:
                row = compile_one(args, model_cfg, m, b)
            except ValueError as e:
                print(f"error: mesh {m}, batch {b}: {e}", file=sys.stderr)
                return 2
            print(json.dumps(row), flush=True)
            rows.append(row)
    write_results(args, rows, markdown(args, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
