"""`sampler.sample` on a masked-diffusion `Decoder` (DAT spec §5.3): a batch sharded over the data
axes of an 8-device mesh gives the single-device result, a second call with new data does not
recompile, the LM head runs only at the fill positions (no [B, L, V] array in the compiled program)
with the results of the full-canvas sampler, and bad input fails with one-line ValueErrors."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from mixat_jax.diffusion import sampler as sampler_lib
from mixat_jax.diffusion.denoiser import decoder_logits_fn
from mixat_jax.diffusion.sampler import SamplerConfig, sample, sample_jitted
from mixat_jax.mesh import MeshConfig, make_mesh, shard_batch, state_shardings
from mixat_jax.models.config import tiny_config
from mixat_jax.models.decoder import Decoder
from tests.diffusion_helpers import CANVAS_MASK as M
from tests.diffusion_helpers import CANVAS_PAD as PAD
from tests.diffusion_helpers import CANVAS_V as V
from tests.diffusion_helpers import check_invariants, full_canvas_denoise, make_canvas, max_fill


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


# ----------------------------------------------------------------------------- LM head at the fills
SHARP_V = 80  # differs from every other dimension, so f32[B, L, V] is recognisable in the HLO


def sharp_model(shift: bool):
    """A tiny decoder with weights scaled up (peaked logits: no fp32 near-ties between the
    candidates of a step, so the comparison with the full-canvas sampler can be exact)."""
    cfg = tiny_config(
        vocab_size=SHARP_V, hidden_size=32, intermediate_size=48, num_heads=2, num_kv_heads=2,
        head_dim=16, causal=False, mask_token_id=M, pad_token_id=PAD, shift_logits=shift,
    )  # fmt: skip
    graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(int(shift))))
    return graphdef, jax.tree.map(lambda x: x * 6.0, state)


def bos_canvas(l=15):
    canvas, attn, editable = make_canvas(l=l)
    b = canvas.shape[0]
    return (
        np.concatenate([np.full((b, 1), 5, np.int32), canvas], 1),
        np.concatenate([np.ones((b, 1), bool), attn], 1),
        np.concatenate([np.zeros((b, 1), bool), editable], 1),
    )


@pytest.mark.parametrize(
    "shift,cfg_kw",
    [
        (False, dict(steps=7, global_remask_every=2, global_remask_count=2, cond_dropout=True)),
        (False, dict(steps=7, temperature=1.0, remasking="margin", cfg_scale=1.5)),
        (False, dict(steps=8, num_blocks=2, temperature=0.8, remasking="origin")),
        (True, dict(steps=8, num_blocks=2, temperature=1.0, cond_dropout=True, cfg_scale=1.0)),
        (True, dict(steps=8, remasking="entropy", global_remask_every=2)),
    ],
)
def test_decoder_logits_at_fill_positions_equal_full_canvas(shift, cfg_kw):
    """`sample` (the decoder's `logits_at_BxT`, T = the largest fill count) gives the canvases,
    reveal counts and path log-probabilities of the full-canvas sampler over the decoder's
    [B, L, V] logits, and its compiled program holds no [B, L, V] (or CFG [2B, L, V]) array."""
    graphdef, state = sharp_model(shift)
    canvas, attn, editable = bos_canvas() if shift else make_canvas()
    cfg = SamplerConfig(mask_token_id=M, shift_logits=shift, suppress_ids=(1, 2), **cfg_kw)
    key = jax.random.key(4)
    got = sample(graphdef, state, canvas, attn, editable, key, cfg=cfg)
    full_fn = decoder_logits_fn(graphdef, state)
    ref = jax.jit(full_canvas_denoise, static_argnames=("logits_fn", "cfg"))(
        lambda c, a: full_fn(c, a), canvas, attn, editable, key, cfg=cfg
    )
    np.testing.assert_array_equal(np.asarray(got.canvas_BxL), np.asarray(ref.canvas_BxL))
    np.testing.assert_array_equal(np.asarray(got.revealed_SxB), np.asarray(ref.revealed_SxB))
    np.testing.assert_allclose(np.asarray(got.logp_B), np.asarray(ref.logp_B), rtol=1e-5, atol=1e-5)
    if cfg.global_remask_every:  # re-reveals break the schedule's counts (checked elsewhere)
        assert not (np.asarray(got.canvas_BxL)[editable & attn] == M).any()
    else:
        check_invariants(got, canvas, attn, editable, cfg, exact_counts=cfg.remasking != "origin")
    b, l = canvas.shape
    t = max_fill(canvas, attn, editable, M)
    assert t < l

    def hlo(width):
        lowered = sample_jitted.lower(
            graphdef, state, canvas, attn, editable, key, cfg=cfg, fill_width=width
        )
        return lowered.compile().as_text()

    rows = (b, 2 * b) if cfg.cfg_scale else (b,)
    full_shapes = [f"f32[{r},{l},{SHARP_V}]" for r in rows]
    assert any(s in hlo(l) for s in full_shapes)  # T = L: the check sees a full-canvas array
    text = hlo(t)
    assert not any(s in text for s in full_shapes)
    assert f"f32[{b},{t},{SHARP_V}]" in text


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
    with pytest.raises(ValueError, match="row 1 has 7 \\[MASK\\]s to fill but fill_width=3") as e:
        sample(*split, canvas, attn, editable, key, cfg=cfg, fill_width=3)
    one_line(e)
    with pytest.raises(ValueError, match="fill_width=0 must be in \\[1, L = 16\\]") as e:
        sample(*split, canvas, attn, editable, key, cfg=cfg, fill_width=0)
    one_line(e)
    first_mask = np.where(editable, M, canvas)
    first_mask[:, 0] = M
    edit0 = editable.copy()
    edit0[:, 0] = True
    with pytest.raises(ValueError, match="starts with a \\[MASK\\]"):
        sampler_lib.check_inputs(
            cfg.replace(shift_logits=True), first_mask, np.ones_like(attn), edit0
        )
