"""`sampler.sample` on a masked-diffusion `Decoder` (DAT spec §5.3): a batch sharded over the data
axes of an 8-device mesh gives the single-device result, a second call with new data does not
recompile, and bad input fails with one-line ValueErrors."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from mixat_jax.diffusion import sampler as sampler_lib
from mixat_jax.diffusion.sampler import SamplerConfig, sample, sample_jitted
from mixat_jax.mesh import MeshConfig, make_mesh, shard_batch, state_shardings
from mixat_jax.models.config import tiny_config
from mixat_jax.models.decoder import Decoder
from tests.diffusion_helpers import CANVAS_MASK as M
from tests.diffusion_helpers import CANVAS_PAD as PAD
from tests.diffusion_helpers import CANVAS_V as V
from tests.diffusion_helpers import check_invariants, make_canvas


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        num_kv_heads=2,
        head_dim=16,
        causal=False,
        mask_token_id=M,
        pad_token_id=PAD,
    )
    return Decoder(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def split(model):
    return nnx.split(model)


def test_sharded_equals_single_device_and_no_recompile(model, split):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    canvas, attn, editable = make_canvas(b=8)
    cfg = SamplerConfig(mask_token_id=M, steps=7, temperature=1.0, cond_dropout=True)
    single = sample(*split, canvas, attn, editable, jax.random.key(5), cfg=cfg)
    check_invariants(single, canvas, attn, editable, cfg)
    mesh = make_mesh(MeshConfig(data=4, fsdp=2, tensor=1))
    graphdef, state = split
    with jax.set_mesh(mesh):
        placed = jax.device_put(state, state_shardings(state, mesh))
        batch = shard_batch({"c": canvas, "a": attn, "e": editable}, mesh)
        assert batch["c"].sharding.spec[0] == ("data", "fsdp")
        sharded = sample(
            graphdef, placed, batch["c"], batch["a"], batch["e"], jax.random.key(5), cfg=cfg
        )
    np.testing.assert_array_equal(np.asarray(sharded.canvas_BxL), np.asarray(single.canvas_BxL))
    np.testing.assert_allclose(np.asarray(sharded.logp_B), np.asarray(single.logp_B), rtol=1e-5)
    # a second call with new data of the same shapes reuses the compiled sampler
    before = sample_jitted._cache_size()
    new_canvas, _, _ = make_canvas(b=8, seed=1)
    new_canvas[editable] = M
    again = sample(*split, new_canvas, attn, editable, jax.random.key(6), cfg=cfg)
    jax.block_until_ready(again)
    assert sample_jitted._cache_size() == before
    check_invariants(again, new_canvas, attn, editable, cfg)


# ----------------------------------------------------------------------------- bad input
def test_bad_input_errors(model, split):
    canvas, attn, editable = make_canvas()
    cfg = SamplerConfig(mask_token_id=M, steps=7)
    key = jax.random.key(0)

    def one_line(excinfo):
        assert "\n" not in str(excinfo.value)

    fp64 = cfg.replace(temperature=1.0, gumbel_dtype="float64")
    with pytest.raises(ValueError, match="gumbel_dtype='float64' needs jax_enable_x64") as e:
        sample(*split, canvas, attn, editable, key, cfg=fp64)
    one_line(e)
    with pytest.raises(ValueError, match="not divisible by num_blocks") as e:
        SamplerConfig(mask_token_id=M, steps=7, num_blocks=2)
    one_line(e)
    with pytest.raises(ValueError, match="unknown remasking mode 'topk'") as e:
        SamplerConfig(mask_token_id=M, remasking="topk")
    one_line(e)
    no_mask = canvas.copy()
    no_mask[3][editable[3]] = 9
    with pytest.raises(ValueError, match="row 3 contains no \\[MASK\\]") as e:
        sample(*split, no_mask, attn, editable, key, cfg=cfg)
    one_line(e)
    graphdef, state = split
    for bad_id, msg in ((V, "outside the vocabulary"), (PAD, "equals the pad id")):
        m2 = nnx.merge(graphdef, state)
        m2.cfg = dataclasses.replace(m2.cfg, mask_token_id=bad_id)
        c2 = np.where(canvas == M, bad_id, canvas)
        with pytest.raises(ValueError, match=msg) as e:
            sample(*nnx.split(m2), c2, attn, editable, key, cfg=cfg.replace(mask_token_id=bad_id))
        one_line(e)
    with pytest.raises(ValueError, match="mask_token_id=62 but the model's mask_token_id=63"):
        sample(*split, canvas, attn, editable, key, cfg=cfg.replace(mask_token_id=62))
    with pytest.raises(ValueError, match="shift_logits"):
        sample(*split, canvas, attn, editable, key, cfg=cfg.replace(shift_logits=True))
    first_mask = np.where(editable, M, canvas)
    first_mask[:, 0] = M
    edit0 = editable.copy()
    edit0[:, 0] = True
    with pytest.raises(ValueError, match="starts with a \\[MASK\\]"):
        sampler_lib.check_inputs(
            cfg.replace(shift_logits=True), first_mask, np.ones_like(attn), edit0
        )
