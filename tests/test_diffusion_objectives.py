"""Masked-diffusion objectives (DAT spec §5.1) against a context-independent oracle model:
the training loss is unbiased for the token CE (pre-training and SFT normalisation), the prompt
is never masked, Dream's shift is undone, and the Monte-Carlo likelihood converges to the exact
factorised log-likelihood while masking exactly l target tokens (stratified l)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mixat_jax.diffusion.objectives import (
    masked_diffusion_loss,
    mc_log_likelihood,
    stratified_mask_counts,
)

V, M = 16, 15
FAST = {"xla_backend_optimization_level": 0}  # quick XLA:CPU compiles, same numerics


def fast(fn, *args, **static):
    """`fn(*args, **static)` jitted (callables and keywords static), compiled with FAST options."""
    bound = [a for a in args if callable(a)]
    arrays = [a for a in args if not callable(a)]
    jitted = jax.jit(functools.partial(fn, *bound, **static))
    return jitted.lower(*arrays).compile(FAST)(*arrays)


def oracle(table_LxV, shift=False, record=None):
    """Logits table[i] at position i whatever the context (Dream-style: table[i + 1] at i)."""
    t = jnp.asarray(table_LxV)
    if shift:
        t = jnp.concatenate([t[1:], t[:1]])

    def logits_fn(canvas_BxL, attn_BxL):
        if record is not None:
            jax.debug.callback(lambda x: record.append(np.asarray(x)), canvas_BxL)
        # "+ 0 · canvas" keeps XLA from constant-folding the broadcast table (slow compiles)
        return t[None] + 0.0 * canvas_BxL[..., None].astype(jnp.float32)

    return logits_fn


def exact_nll(table, ids):
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(table), axis=-1))
    return -logp[np.arange(ids.shape[1])[None], ids]  # [B, L]


def data(b=8, l=10, seed=0):
    rng = np.random.RandomState(seed)
    table = rng.randn(l, V).astype(np.float32) * 2
    table[:, M] = -1e9  # the oracle never predicts [MASK]
    ids = rng.randint(0, M, size=(b, l)).astype(np.int32)
    return table, ids


def test_loss_is_unbiased_for_token_ce():
    table, ids = data()
    b, l = ids.shape
    attn = np.ones((b, l), bool)
    attn[1, -3:] = False  # padding is never masked or counted
    maskable = np.ones((b, l), bool)
    fn = oracle(table)

    def many(keys, ids, attn, maskable):
        one = functools.partial(masked_diffusion_loss, fn, ids, attn, maskable, mask_token_id=M)
        return jax.vmap(one)(keys)

    keys = jax.random.split(jax.random.key(0), 4000)
    losses = np.asarray(fast(many, keys, ids, attn, maskable))
    nll = exact_nll(table, ids)
    want = nll[attn].mean()
    assert abs(losses.mean() - want) < 0.03 * want, (losses.mean(), want)


def test_sft_never_masks_the_prompt_and_normalises_by_answer_length():
    table, ids = data()
    b, l = ids.shape
    attn = np.ones((b, l), bool)
    maskable = np.zeros((b, l), bool)
    maskable[:, 6:] = True
    maskable[0, 6:9] = False  # row 0 has a 1-token answer the oracle finds very unlikely
    table[9, ids[0, 9]] = -8.0
    attn[3, -1] = False
    seen = []
    loss = masked_diffusion_loss(
        oracle(table, record=seen),
        ids,
        attn,
        maskable,
        jax.random.key(0),
        mask_token_id=M,
        sft=True,
    )
    jax.block_until_ready(loss)
    (noisy,) = seen
    assert not np.any(noisy[~(maskable & attn)] == M)
    np.testing.assert_array_equal(noisy[noisy != M], ids[noisy != M])

    fn = oracle(table)

    def many(keys, ids, attn, maskable):
        one = functools.partial(
            masked_diffusion_loss, fn, ids, attn, maskable, mask_token_id=M, sft=True
        )
        return jax.vmap(one)(keys)

    keys = jax.random.split(jax.random.key(1), 4000)
    losses = np.asarray(fast(many, keys, ids, attn, maskable))
    nll = exact_nll(table, ids)
    elig = maskable & attn
    per_row = (nll * elig).sum(1) / elig.sum(1)
    want, token_mean = per_row.mean(), nll[elig].mean()
    assert abs(losses.mean() - want) < 0.03 * want, (losses.mean(), want)
    assert abs(token_mean - want) > 0.1 * want  # the two normalisations really differ here


def test_loss_undoes_dream_shift():
    table, ids = data()
    attn = np.ones(ids.shape, bool)
    maskable = np.ones(ids.shape, bool)
    maskable[:, 0] = False  # Dream's first token is never a [MASK]
    key = jax.random.key(3)
    ref = masked_diffusion_loss(oracle(table), ids, attn, maskable, key, mask_token_id=M)
    got = masked_diffusion_loss(
        oracle(table, shift=True), ids, attn, maskable, key, mask_token_id=M, shift_logits=True
    )
    wrong = masked_diffusion_loss(
        oracle(table, shift=True), ids, attn, maskable, key, mask_token_id=M
    )
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)
    assert abs(float(wrong) - float(ref)) > 0.1


def test_stratified_counts():
    lens = jnp.array([5, 1, 7, 0])
    counts = np.asarray(stratified_mask_counts(jax.random.key(0), lens, 5))
    assert sorted(counts[0]) == [1, 2, 3, 4, 5]  # m = L: every l exactly once
    assert np.all(counts[1] == 1) and np.all(counts[3] == 1)
    assert counts[2].min() >= 1 and counts[2].max() <= 7
    assert len(set(counts[2])) == 5  # spread over the range, not repeated


def test_mc_likelihood_masks_exactly_l_target_tokens():
    table, ids = data(b=2, l=8)
    attn = np.ones(ids.shape, bool)
    target = np.zeros(ids.shape, bool)
    target[:, 2:6] = True  # L_x = 4, y (the rest) stays visible
    seen = []
    ll = fast(
        mc_log_likelihood, oracle(table, record=seen), ids, attn, target, jax.random.key(0),
        mask_token_id=M, num_mc=8, mc_batch=4,
    )  # fmt: skip
    jax.block_until_ready(ll)
    assert len(seen) == 2  # two chunks of 4 samples
    for noisy in seen:
        noisy = noisy.reshape(2, 4, -1)
        for r in range(2):
            np.testing.assert_array_equal(
                noisy[r][:, ~target[r]], ids[r][None, ~target[r]].repeat(4, 0)
            )
            counts = (noisy[r] == M).sum(-1)
            assert sorted(counts) == [1, 2, 3, 4]  # stratified: every l once per chunk of L_x


def test_mc_likelihood_converges_to_exact_factorised_loglik():
    table, ids = data(b=4, l=10)
    attn = np.ones(ids.shape, bool)
    attn[2, 8:] = False
    target = np.zeros(ids.shape, bool)
    target[:, 3:] = True
    target[3] = False  # a row without target: estimate 0
    fn = oracle(table)
    args = (ids, attn, target)
    got = np.asarray(
        fast(
            mc_log_likelihood,
            fn,
            *args,
            jax.random.key(0),
            mask_token_id=M,
            num_mc=2048,
            mc_batch=64,
        )
    )
    nll = exact_nll(table, ids)
    want = -(nll * (target & attn)).sum(1)
    assert got[3] == 0.0
    np.testing.assert_allclose(got, want, rtol=0.02, atol=1e-6)
    few = np.asarray(
        fast(mc_log_likelihood, fn, *args, jax.random.key(1), mask_token_id=M, num_mc=8, mc_batch=8)
    )
    assert np.abs(few - want).max() > np.abs(got - want).max()  # more samples, less error
