"""Losses (MixAT spec §4, §12): masked CE vs numpy, soft cutoffs (value and slope), log(1 - p)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixat_jax import lora as lora_lib
from mixat_jax import objectives
from mixat_jax.models.config import LoraConfig, tiny_config
from mixat_jax.models.decoder import Decoder
from mixat_jax.training import losses


def _np_masked_ce(logits, ids, tmask, valid):
    """Reference: sum of -log softmax at the shifted targets of valid rows / their count."""
    total, count = 0.0, 0
    for b in range(ids.shape[0]):
        if not valid[b]:
            continue
        for t in range(1, ids.shape[1]):
            if tmask[b, t]:
                z = logits[b, t - 1].astype(np.float64)
                logz = np.log(np.sum(np.exp(z - z.max()))) + z.max()
                total += logz - z[ids[b, t]]
                count += 1
    return total / max(count, 1)


def _random_case(seed=0, b=4, l=9, v=11):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, l, v)).astype(np.float32) * 3
    ids = rng.integers(0, v, (b, l)).astype(np.int32)
    tmask = rng.random((b, l)) < 0.5
    valid = np.array([True, False, True, True])[:b]
    return logits, ids, tmask, valid


def test_masked_ce_matches_numpy_token_mean():
    logits, ids, tmask, valid = _random_case()
    got = objectives.masked_ce(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(tmask), valid)
    np.testing.assert_allclose(got, _np_masked_ce(logits, ids, tmask, valid), rtol=1e-5)
    all_valid = np.ones_like(valid)
    got_all = objectives.masked_ce(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(tmask))
    np.testing.assert_allclose(got_all, _np_masked_ce(logits, ids, tmask, all_valid), rtol=1e-5)


def test_masked_ce_is_token_mean_not_row_mean():
    # Row 0 has 1 target token with CE ~ log(V), row 1 has 3 confident tokens: HF semantics
    # weight every token equally across the sub-batch (spec §1).
    v = 5
    logits = np.zeros((2, 4, v), np.float32)
    ids = np.array([[0, 1, 0, 0], [0, 2, 3, 4]], np.int32)
    tmask = np.array([[0, 1, 0, 0], [0, 1, 1, 1]], bool)
    for t in range(3):
        logits[1, t, ids[1, t + 1]] = 50.0
    got = float(objectives.masked_ce(jnp.asarray(logits), ids, tmask))
    np.testing.assert_allclose(got, np.log(v) / 4, rtol=1e-5)


def test_masked_ce_zero_without_tokens_and_finite_grad():
    logits = jnp.ones((2, 3, 4))
    ids = jnp.zeros((2, 3), jnp.int32)
    none = jnp.zeros((2, 3), bool)
    assert float(objectives.masked_ce(logits, ids, none)) == 0.0
    g = jax.grad(lambda x: objectives.masked_ce(x, ids, none))(logits)
    assert np.all(np.asarray(g) == 0.0)
    with pytest.raises(ValueError, match="masked_ce needs"):
        objectives.masked_ce(logits, ids[:, :2], none)


def test_gathered_targets_equal_full_ce_and_count_dropped():
    logits, ids, tmask, valid = _random_case(1)
    full = objectives.masked_ce(jnp.asarray(logits), ids, tmask, valid)
    pos, labels, w, dropped = objectives.target_positions(ids, tmask, valid, max_targets=8)
    gathered = jnp.take_along_axis(jnp.asarray(logits)[:, :-1], pos[..., None], axis=1)
    np.testing.assert_allclose(objectives.gathered_ce(gathered, labels, w), full, rtol=1e-6)
    assert int(dropped) == 0
    _, _, w2, dropped2 = objectives.target_positions(ids, tmask, valid, max_targets=1)
    n_targets = int(np.sum(tmask[:, 1:] & valid[:, None]))
    assert int(dropped2) == n_targets - int(np.sum(w2))


@pytest.mark.parametrize(
    "z, value, slope",
    [(-3.0, -3.0, 1.0), (-5.0, -5.0, 1.0), (-6.0, -5.0 - 6e-3, 1e-3), (-20.0, -5.02, 1e-3)],
)
def test_floor_away_value_and_slope(z, value, slope):
    np.testing.assert_allclose(losses.floor_away(jnp.float32(z)), value, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(losses.floor_away)(jnp.float32(z)), slope, rtol=1e-6)


@pytest.mark.parametrize(
    "c, value, slope",
    [(2.0, 2.0, 1.0), (0.5, 0.5, 1.0), (0.2, 0.5 + 2e-4, 1e-3), (0.0, 0.5, 1e-3)],
)
def test_floor_toward_value_and_slope(c, value, slope):
    np.testing.assert_allclose(losses.floor_toward(jnp.float32(c)), value, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(losses.floor_toward)(jnp.float32(c)), slope, rtol=1e-6)


def test_away_cutoff_through_negative_ce():
    # L_away = floor_away(-CE): CE = 7 > 5 -> -5 - 7e-3, d/dCE = -1e-3 (spec §4).
    f = lambda ce: losses.floor_away(-ce)
    np.testing.assert_allclose(f(jnp.float32(7.0)), -5.007, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(f)(jnp.float32(7.0)), -1e-3, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(f)(jnp.float32(2.0)), -1.0, rtol=1e-6)


def test_log1mexp_and_log_1_minus_p():
    x = np.array([-1e-5, -0.1, -0.69, -0.7, -3.0, -30.0], np.float64)
    np.testing.assert_allclose(
        losses.log1mexp(jnp.asarray(x, jnp.float32)), np.log1p(-np.exp(x)), rtol=2e-3
    )
    logp = jnp.array([[np.log(0.5), np.log(0.9), -6.0]], jnp.float32)
    w = jnp.array([[True, True, True]])
    want = (-np.log(0.5) - np.log(0.1) + 0.0) / 3  # log p = -6 < -5 contributes 0
    np.testing.assert_allclose(losses.log_1_minus_p_loss(logp, w), want, rtol=1e-5)


def test_sequence_ce_gathered_equals_full_on_model():
    model = Decoder(tiny_config(num_layers=1), rngs=nnx.Rngs(0))
    model.add_lora(LoraConfig(r=2, alpha=4))
    graphdef, lora, frozen = lora_lib.split(model)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, 512, (2, 10)), jnp.int32)
    mask = jnp.asarray(np.arange(10)[None] < np.array([[10], [7]]))
    tmask = mask & jnp.asarray(np.arange(10)[None] >= np.array([[6], [4]]))

    @jax.jit
    def both(lora, frozen):
        m = lora_lib.merge(graphdef, lora, frozen)
        emb = m.embed(ids)
        full = objectives.sequence_ce(m, emb, mask, ids, tmask)
        gathered = objectives.sequence_ce(m, emb, mask, ids, tmask, max_targets=4)
        ref = objectives.masked_ce(m.apply_embeddings(emb, mask), ids, tmask)
        return full, gathered, ref

    fast = {"xla_backend_optimization_level": 0}  # fast XLA:CPU compile, same numerics
    full, gathered, ref = both.lower(lora, frozen).compile(fast)(lora, frozen)
    np.testing.assert_allclose(full, ref, rtol=1e-5)
    np.testing.assert_allclose(gathered, ref, rtol=1e-5)
