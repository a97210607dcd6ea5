"""DAT's reference configs lower (AOT) at their real shapes on 8 simulated devices (DAT spec §2.3).

The DAT train step of ``configs/dat/llama3_8b.py`` and ``configs/dat/qwen2_5_14b.py`` — the
config's own step (variant "dat", 10 / 40 attack iterations, utility weight 0.45), batch layout
(8 micro-batches of 1 adversarial pair + 7 utility rows, L 256), LoRA (r 64, all linear) and bf16
base at the Llama-3-8B / Qwen2.5-14B shapes — is ``jax.jit(...).lower``-ed from ABSTRACT inputs
(``jax.ShapeDtypeStruct`` with their ``NamedSharding``s, nothing allocated, no compile) through
``bench/aot_memory.py``'s ``lower_step`` on an fsdp=8 mesh, and the lowered module carries the
mesh and the FSDP shardings. The data-parallel alternative layout (8 adversarial + 56 utility
slots, no accumulation: the same 64 rows per step) lowers with the slot axis sharded. Stage A's
sampler (``inpaint.default_sampler`` in ``sample_jitted``) lowers at LLaDA-8B shape on 8-way
data parallelism. conftest.py gives this process 8 CPU devices.
"""

from __future__ import annotations

import argparse
import dataclasses
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from bench import aot_memory
from bench.aot_memory_diffusion import LLADA_8B, abstract_model
from mixat_jax import mesh as mesh_lib
from mixat_jax.diffusion.inpaint import default_sampler
from mixat_jax.diffusion.sampler import sample_jitted
from mixat_jax.models.config import ModelConfig

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

CONFIGS = {  # config -> (preset, stacked MLP up weight, embedding, attack iterations)
    "configs/dat/llama3_8b.py": ("llama3_8b", "32x4096x14336xbf16", "128256x4096xbf16", 10),
    "configs/dat/qwen2_5_14b.py": ("qwen2_5_14b", "48x5120x13824xbf16", "152064x5120xbf16", 40),
}


def _args(config: str) -> argparse.Namespace:
    args = argparse.Namespace(config=config)
    aot_memory.apply_config(args, aot_memory.load_run_config(config))
    return args


def _arg_sharding(text: str, tensor: str) -> str:
    """The sdy sharding of the first @main argument of type ``tensor<...>``."""
    sig = re.search(r"func\.func public @main\((.*?)\) ->", text, re.S).group(1)
    m = re.search(rf"tensor<{tensor}> \{{[^}}]*?sdy\.sharding<@mesh, (\[[^>]*\])>", sig)
    assert m, f"no argument tensor<{tensor}> in the lowered step"
    return m.group(1)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_dat_config_train_step_lowers_at_real_shape(config):
    preset, mlp_up, embedding, iters = CONFIGS[config]
    args = _args(config)
    assert args.preset == preset and args.step_config.variant == "dat"
    assert args.step_config.attack.iters == iters and args.lora_r == 64
    assert (args.adv, args.util, args.grad_accum, args.len, args.len_adv) == (1, 7, 8, 256, 256)
    lowered, _, model_cfg, _ = aot_memory.lower_step(args, (1, 8, 1))
    text = lowered.as_text()
    assert 'sdy.mesh @mesh = <["data"=1, "fsdp"=8, "tensor"=1]>' in text
    assert '{"fsdp"}' in _arg_sharding(text, embedding)  # vocab x hidden over fsdp
    assert '{"fsdp"}' in _arg_sharding(text, mlp_up)  # stacked [N, D, F]: D over fsdp
    # 1 + 7 slots do not divide 8 devices: the rows are replicated (the reference's batch 8)
    assert _arg_sharding(text, "8x7x256xi32") == "[{}, {}, {}]"
    assert model_cfg.num_layers == int(mlp_up.split("x")[0])


def test_data_parallel_layout_lowers_with_sharded_slots():
    """8 adversarial + 56 utility slots, G = 1: per device 1 + 7 rows (batch 8 per device)."""
    args = _args("configs/dat/llama3_8b.py")
    args.adv, args.util, args.grad_accum = 8, 56, 1
    args.step_config = dataclasses.replace(args.step_config, attack=dataclasses.replace(
        args.step_config.attack, iters=1))  # fmt: skip
    lowered, _, _, _ = aot_memory.lower_step(args, (1, 8, 1))
    text = lowered.as_text()
    assert _arg_sharding(text, "1x56x256xi32") == '[{}, {"data", "fsdp"}, {}]'
    assert _arg_sharding(text, "1x8x256xi32") == '[{}, {"data", "fsdp"}, {}]'


def test_stage_a_sampler_lowers_at_llada_8b_shape():
    cfg = ModelConfig(**LLADA_8B, dtype="bfloat16")
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=8, fsdp=1, tensor=1))
    prompt_len, length, batch = 32, 96, 64
    specials = tuple(sorted({cfg.bos_token_id, *cfg.eos_token_ids, cfg.pad_token_id}))
    sampler = default_sampler(cfg, prompt_len, steps=prompt_len, suppress_ids=specials)
    with jax.set_mesh(mesh):
        graphdef, state = abstract_model(cfg, mesh)
        rows = mesh_lib.batch_sharding(mesh, 2)
        canvas = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=rows)
        flags = jax.ShapeDtypeStruct((batch, length), jnp.bool_, sharding=rows)
        key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype,
                                   sharding=NamedSharding(mesh, PartitionSpec()))  # fmt: skip
        lowered = sample_jitted.lower(graphdef, state, canvas, flags, flags, key, cfg=sampler,
                                      fill_width=prompt_len)  # fmt: skip
    text = lowered.as_text()
    assert 'sdy.mesh @mesh = <["data"=8, "fsdp"=1, "tensor"=1]>' in text
    assert _arg_sharding(text, f"{batch}x{length}xi32") == '[{"data", "fsdp"}, {}]'
