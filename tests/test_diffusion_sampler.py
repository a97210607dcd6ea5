"""The scanned masked-diffusion sampler loop (DAT spec §5.3–§5.5) over cheap logits functions:
invariants of every remasking mode, blocks in order, jit == eager, T = 0 determinism, CFG, AAPL
global remasking and conditioning dropout, rank top-k vs NumPy, oracle marginals, Dream's shift,
fp64 Gumbel; and the LM head restricted to the fill positions ([B, T, V]) reproduces the full-canvas
sampler exactly (every mode, blocks, CFG, dropout, global remasking, Dream shift, fp64 noise). The
`Decoder`-backed API (sharding, compiles, errors) is in test_diffusion_sample_api."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixat_jax.diffusion import sampler as sampler_lib
from mixat_jax.diffusion.denoiser import align_logits, at_positions
from mixat_jax.diffusion.ranks import top_k_mask
from mixat_jax.diffusion.sampler import SamplerConfig, denoise
from tests.diffusion_helpers import CANVAS_MASK as M
from tests.diffusion_helpers import CANVAS_V as V
from tests.diffusion_helpers import (
    check_invariants,
    full_canvas_denoise,
    make_canvas,
    max_fill,
    schedule_reference,
)

SUPPRESS = (1, 2)
FAST = {"xla_backend_optimization_level": 0}  # quick XLA:CPU compiles, same numerics
_W_VxV = jax.random.normal(jax.random.key(0), (V, V))
_POS_LxV = jax.random.normal(jax.random.key(1), (32, V))


def mixer(canvas_BxL, attn_BxL, positions_BxT=None):
    """A cheap context-dependent stand-in for a model: position table + a pooled-canvas term, over
    the whole canvas or (computed only there) at `positions_BxT`."""
    one_hot = jax.nn.one_hot(canvas_BxL, V) * attn_BxL[..., None]
    context_BxV = one_hot.mean(1) @ _W_VxV
    table = (
        _POS_LxV[None, : canvas_BxL.shape[1]] if positions_BxT is None else _POS_LxV[positions_BxT]
    )
    return table + 4.0 * context_BxV[:, None, :]


def mixer_full(canvas_BxL, attn_BxL):
    return mixer(canvas_BxL, attn_BxL)


_COMPILED = {}


def run(logits_fn, canvas, attn, editable, key, *, cfg, fill_width="tight", fn=denoise):
    """`denoise` (or `fn`) jitted, compiled once per logits_fn, cfg, width and shape with FAST
    options; `fill_width="tight"` = the largest fill count of the batch (what `sample` uses)."""
    kw = {}
    if fn is denoise:
        tight = max_fill(canvas, attn, editable, cfg.mask_token_id)
        kw["fill_width"] = tight if fill_width == "tight" else fill_width
    sig = (fn, logits_fn, cfg, np.shape(canvas), jax.config.jax_enable_x64, *kw.values())
    if sig not in _COMPILED:
        jitted = jax.jit(fn, static_argnames=("logits_fn", "cfg", *kw))
        lowered = jitted.lower(logits_fn, canvas, attn, editable, key, cfg=cfg, **kw)
        _COMPILED[sig] = lowered.compile(FAST)
    return _COMPILED[sig](canvas, attn, editable, key)


@pytest.mark.parametrize("mode", sampler_lib.REMASKING_MODES)
def test_invariants_every_mode(mode):
    canvas, attn, editable = make_canvas()
    cfg = SamplerConfig(
        mask_token_id=M,
        steps=6,
        num_blocks=2,
        temperature=1.0,
        remasking=mode,
        suppress_ids=SUPPRESS,
        cond_dropout=True,
    )
    out = run(mixer, canvas, attn, editable, jax.random.key(3), cfg=cfg)
    check_invariants(out, canvas, attn, editable, cfg, exact_counts=mode != "origin")


def test_blocks_fill_in_order_and_jit_equals_eager():
    """Eager run (scan body un-jitted) records each step's input; blocks < current are complete,
    blocks > current untouched; the jitted result is identical."""
    canvas, attn, editable = make_canvas(b=4, l=12)
    cfg = SamplerConfig(
        mask_token_id=M, steps=6, num_blocks=3, temperature=1.0, suppress_ids=SUPPRESS
    )
    seen = []

    def recording(x, a, positions):
        seen.append(np.asarray(x))
        return mixer(x, a, positions)

    with jax.disable_jit():
        eager = denoise(recording, canvas, attn, editable, jax.random.key(0), cfg=cfg)
    jitted = run(mixer, canvas, attn, editable, jax.random.key(0), cfg=cfg)
    np.testing.assert_array_equal(np.asarray(eager.canvas_BxL), np.asarray(jitted.canvas_BxL))
    np.testing.assert_allclose(np.asarray(eager.logp_B), np.asarray(jitted.logp_B), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(eager.revealed_SxB), np.asarray(jitted.revealed_SxB))
    check_invariants(jitted, canvas, attn, editable, cfg)
    assert len(seen) == cfg.steps
    blocks = np.asarray(sampler_lib.block_ids(jnp.asarray(editable & attn), cfg.num_blocks))
    fill = (canvas == M) & editable
    for s, x in enumerate([*seen, np.asarray(jitted.canvas_BxL)]):
        blk = s // cfg.steps_per_block
        masked = (x == M) & editable
        assert not masked[blocks < blk].any(), s  # earlier blocks complete
        np.testing.assert_array_equal(masked[blocks > blk], fill[blocks > blk])  # later untouched


def test_t0_deterministic_and_keys_matter_at_t1():
    canvas, attn, editable = make_canvas()
    cfg = SamplerConfig(mask_token_id=M, steps=7)
    a = run(mixer, canvas, attn, editable, jax.random.key(0), cfg=cfg)
    b = run(mixer, canvas, attn, editable, jax.random.key(1), cfg=cfg)
    np.testing.assert_array_equal(np.asarray(a.canvas_BxL), np.asarray(b.canvas_BxL))
    np.testing.assert_array_equal(np.asarray(a.logp_B), np.asarray(b.logp_B))
    hot = cfg.replace(temperature=1.0)
    c = run(mixer, canvas, attn, editable, jax.random.key(0), cfg=hot)
    d = run(mixer, canvas, attn, editable, jax.random.key(0), cfg=hot)
    e = run(mixer, canvas, attn, editable, jax.random.key(1), cfg=hot)
    np.testing.assert_array_equal(np.asarray(c.canvas_BxL), np.asarray(d.canvas_BxL))
    assert not np.array_equal(np.asarray(c.canvas_BxL), np.asarray(e.canvas_BxL))


def test_cfg_zero_equals_no_cfg_and_cfg_changes_logits():
    canvas, attn, editable = make_canvas()
    plain = SamplerConfig(mask_token_id=M, steps=7)
    key = jax.random.key(0)
    # w = 1e-9 runs the two-pass CFG path; (w + 1) rounds to 1 in fp32, i.e. w = 0
    zero = run(mixer, canvas, attn, editable, key, cfg=plain.replace(cfg_scale=1e-9))
    ref = run(mixer, canvas, attn, editable, key, cfg=plain)
    np.testing.assert_array_equal(np.asarray(zero.canvas_BxL), np.asarray(ref.canvas_BxL))
    np.testing.assert_allclose(np.asarray(zero.logp_B), np.asarray(ref.logp_B), rtol=1e-5)
    strong = run(mixer, canvas, attn, editable, key, cfg=plain.replace(cfg_scale=3.0))
    check_invariants(strong, canvas, attn, editable, plain)
    assert np.abs(np.asarray(strong.logp_B) - np.asarray(ref.logp_B)).max() > 1e-3
    c, u = jnp.array([1.0, -2.0]), jnp.array([0.5, 4.0])
    np.testing.assert_allclose(sampler_lib.combine_cfg(c, u, 0.0), c)
    np.testing.assert_allclose(sampler_lib.combine_cfg(c, u, 2.0), u + 3 * (c - u))


def test_rank_top_k_matches_numpy():
    rng = np.random.RandomState(0)
    conf = rng.randint(0, 5, size=(32, 20)).astype(np.float32)  # many ties
    conf[rng.rand(32, 20) < 0.3] = -np.inf
    k = rng.randint(0, 21, size=32)
    got = np.asarray(top_k_mask(jnp.asarray(conf), jnp.asarray(k)))
    want = np.zeros_like(got)
    for i in range(32):
        want[i, np.argsort(-conf[i], kind="stable")[: k[i]]] = True
    np.testing.assert_array_equal(got, want)


def test_aapl_global_remask_and_conditioning_dropout():
    canvas, attn, editable = make_canvas()
    editable_masks = ((canvas == M) & editable).sum(-1)
    cfg = SamplerConfig(
        mask_token_id=M, steps=12, temperature=0.0, global_remask_every=4, global_remask_count=2,
        cond_dropout=True,
    )  # fmt: skip
    out = run(mixer, canvas, attn, editable, jax.random.key(0), cfg=cfg)
    base = schedule_reference(canvas, attn, editable, cfg)
    want = base.copy()
    for s in range(4, cfg.steps, 4):
        fire = base[s] == 0
        want[s, fire] = np.minimum(2, editable_masks[fire])
    np.testing.assert_array_equal(np.asarray(out.revealed_SxB), want)
    assert (want != base).any()  # the test covers a firing step
    got = np.asarray(out.canvas_BxL)
    assert not np.any(got[editable & attn] == M)
    # steps == P: there is always something to reveal, so it never fires
    full = cfg.replace(steps=7)
    outs = [run(mixer, canvas, attn, editable, jax.random.key(k), cfg=full) for k in range(3)]
    for o in outs:
        check_invariants(o, canvas, attn, editable, full)
    # conditioning dropout is where T = 0 inpainting gets its diversity (spec §5.4)
    assert len({np.asarray(o.canvas_BxL).tobytes() for o in outs}) > 1


# ----------------------------------------------------------------------------- oracle model
def oracle(table_LxV, shift=False):
    """Context-independent logits: position i always gets table[i] (or table[i + 1] when the
    model predicts the next token, Dream-style)."""
    t = jnp.asarray(table_LxV)
    if shift:
        t = jnp.concatenate([t[1:], t[:1]])

    def logits_fn(canvas_BxL, attn_BxL, positions_BxT=None):
        # "+ 0 · canvas" keeps XLA from constant-folding the broadcast table (slow compiles)
        if positions_BxT is None:
            return t[None] + 0.0 * canvas_BxL[..., None].astype(jnp.float32)
        return t[positions_BxT] + 0.0 * positions_BxT[..., None].astype(jnp.float32)

    return logits_fn


@pytest.mark.parametrize("mode", ["random", "origin"])
def test_oracle_marginals_match_softmax(mode):
    """At T = 1 with random (or Dream origin) remasking each position's samples follow its softmax
    (with [MASK] and suppressed ids removed), and the path log-likelihood is exact."""
    vv, l, b, mask = 8, 5, 4096, 7
    rng = np.random.RandomState(0)
    table = rng.randn(l, vv).astype(np.float32) * 1.5
    canvas = np.full((b, l), mask, np.int32)
    canvas[:, 0] = 3  # a known token
    editable = np.ones((b, l), bool)
    editable[:, 0] = False
    attn = np.ones((b, l), bool)
    cfg = SamplerConfig(
        mask_token_id=mask, steps=4, temperature=1.0, remasking=mode, suppress_ids=(0,)
    )
    out = run(oracle(table), canvas, attn, editable, jax.random.key(0), cfg=cfg)
    got = np.asarray(out.canvas_BxL)
    masked_table = table.copy()
    masked_table[:, [0, mask]] = -np.inf
    p = np.exp(masked_table - masked_table.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    for i in range(1, l):
        freq = np.bincount(got[:, i], minlength=vv) / b
        np.testing.assert_allclose(freq, p[i], atol=0.03, err_msg=f"position {i}")
    logq = np.log(np.where(p > 0, p, 1.0))
    exact = np.array([sum(logq[i, got[r, i]] for i in range(1, l)) for r in range(b)])
    np.testing.assert_allclose(np.asarray(out.logp_B), exact, rtol=1e-5, atol=1e-5)


def test_dream_shift_realignment():
    """A model whose logits at i predict token i + 1, sampled with shift_logits, gives exactly the
    unshifted model's result."""
    vv, l, b = 8, 6, 16
    table = np.random.RandomState(1).randn(l, vv).astype(np.float32)
    canvas = np.full((b, l), 7, np.int32)
    canvas[:, 0] = 2
    canvas[:, -1] = 3
    editable = np.zeros((b, l), bool)
    editable[:, 1:-1] = True
    attn = np.ones((b, l), bool)
    cfg = SamplerConfig(mask_token_id=7, steps=4, temperature=1.0)
    ref = run(oracle(table), canvas, attn, editable, jax.random.key(0), cfg=cfg)
    got = run(
        oracle(table, shift=True),
        canvas,
        attn,
        editable,
        jax.random.key(0),
        cfg=cfg.replace(shift_logits=True),
    )
    np.testing.assert_array_equal(np.asarray(got.canvas_BxL), np.asarray(ref.canvas_BxL))
    np.testing.assert_allclose(np.asarray(got.logp_B), np.asarray(ref.logp_B), rtol=1e-6)
    shifted_BxLxV = oracle(table, shift=True)(canvas, attn)
    np.testing.assert_array_equal(
        align_logits(shifted_BxLxV, True)[:, 1:], table[None, 1:].repeat(b, 0)
    )
    assert not np.allclose(shifted_BxLxV[:, 1:], table[None, 1:])  # the shift matters


def test_fp64_gumbel():
    canvas, attn, editable = make_canvas()
    cfg = SamplerConfig(mask_token_id=M, steps=7, temperature=1.0, gumbel_dtype="float64")
    with jax.enable_x64(True):
        out = run(mixer, canvas, attn, editable, jax.random.key(0), cfg=cfg)
        check_invariants(out, canvas, attn, editable, cfg)


# ------------------------------------------------------------------------ [B, T, V] == [B, L, V]
def with_bos(canvas, attn, editable, bos=5):
    """Dream canvases: a known first token before every row."""
    b = canvas.shape[0]
    return (
        np.concatenate([np.full((b, 1), bos, np.int32), canvas], 1),
        np.concatenate([np.ones((b, 1), bool), attn], 1),
        np.concatenate([np.zeros((b, 1), bool), editable], 1),
    )


_C = {"mask_token_id": M, "suppress_ids": SUPPRESS}
EQUIVALENCE = {
    **{
        f"{mode}_t1_blocks_dropout": (
            make_canvas(),
            SamplerConfig(
                **_C, steps=6, num_blocks=2, temperature=1.0, remasking=mode, cond_dropout=True
            ),
        )
        for mode in sampler_lib.REMASKING_MODES
    },
    "aapl_t0_global_remask": (
        make_canvas(),
        SamplerConfig(
            mask_token_id=M,
            steps=12,
            global_remask_every=4,
            global_remask_count=2,
            cond_dropout=True,
        ),
    ),  # fmt: skip
    "cfg_margin_t07_dropout": (
        make_canvas(),
        SamplerConfig(
            **_C, steps=7, cfg_scale=1.5, temperature=0.7, remasking="margin", cond_dropout=True
        ),
    ),
    "entropy_t1_global_remask_blocks": (
        make_canvas(),
        SamplerConfig(
            **_C,
            steps=12,
            num_blocks=2,
            temperature=1.0,
            remasking="entropy",
            global_remask_every=3,
            global_remask_count=3,
            cond_dropout=True,
        ),
    ),  # fmt: skip
    "dream_shift_cfg_blocks_t1": (
        with_bos(*make_canvas(l=15)),
        SamplerConfig(
            **_C, steps=8, num_blocks=2, temperature=1.0, shift_logits=True, cfg_scale=2.0
        ),
    ),
    "dream_shift_origin_dropout": (
        with_bos(*make_canvas(l=15)),
        SamplerConfig(
            **_C,
            steps=8,
            remasking="origin",
            temperature=0.5,
            shift_logits=True,
            cond_dropout=True,
        ),
    ),  # fmt: skip
}


def assert_same(got, ref):
    np.testing.assert_array_equal(np.asarray(got.canvas_BxL), np.asarray(ref.canvas_BxL))
    np.testing.assert_array_equal(np.asarray(got.revealed_SxB), np.asarray(ref.revealed_SxB))
    np.testing.assert_allclose(np.asarray(got.logp_B), np.asarray(ref.logp_B), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(EQUIVALENCE))
def test_fill_positions_equal_full_canvas_sampler(name):
    """The sampler with the LM head, noise, softmax and ranks at the T fill positions only gives
    the canvases, reveal counts and path log-probabilities of the full-canvas [B, L, V] sampler
    (`full_canvas_denoise`, the code before the restriction), with the same keys."""
    (canvas, attn, editable), cfg = EQUIVALENCE[name]
    assert max_fill(canvas, attn, editable, M) < canvas.shape[1]  # T < L: a real restriction
    for seed in (0, 1):
        key = jax.random.key(seed)
        ref = run(mixer_full, canvas, attn, editable, key, cfg=cfg, fn=full_canvas_denoise)
        got = run(mixer, canvas, attn, editable, key, cfg=cfg)
        assert_same(got, ref)
    # full logits gathered at the positions (T = L, padded slots included): the same again
    wide = run(at_positions(mixer_full), canvas, attn, editable, key, cfg=cfg, fill_width=None)
    assert_same(wide, ref)


def test_fill_positions_equal_full_canvas_fp64_gumbel():
    canvas, attn, editable = make_canvas()
    cfg = SamplerConfig(**_C, steps=7, temperature=1.0, gumbel_dtype="float64")
    with jax.enable_x64(True):
        ref = run(mixer_full, canvas, attn, editable, jax.random.key(2), cfg=cfg,
                  fn=full_canvas_denoise)  # fmt: skip
        assert_same(run(mixer, canvas, attn, editable, jax.random.key(2), cfg=cfg), ref)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gumbel_at_is_the_full_draw_at_the_positions(dtype):
    """`gumbel_at` computes only the [B, T, V] entries, bit-identical to `jax.random.gumbel` over
    [B, L, V] gathered there (typed and raw keys, eager and jitted)."""
    b, l, v = 3, 9, 37
    pos = jnp.asarray(np.random.RandomState(0).randint(0, l, (b, 5)), jnp.int32)
    with jax.enable_x64(dtype == "float64"):
        for key in (jax.random.key(3), jax.random.PRNGKey(4)):
            assert sampler_lib.counter_gumbel_exact(key)
            full = jax.random.gumbel(key, (b, l, v), jnp.dtype(dtype))
            want = np.asarray(jnp.take_along_axis(full, pos[..., None], axis=1))
            np.testing.assert_array_equal(
                np.asarray(sampler_lib.gumbel_at(key, l, v, pos, dtype)), want
            )
            jitted = jax.jit(sampler_lib.gumbel_at, static_argnums=(1, 2, 4))
            np.testing.assert_array_equal(np.asarray(jitted(key, l, v, pos, dtype)), want)


def test_wide_counter_arithmetic():
    """The 64-bit flat index row · V + v from uint32 words (B·L·V may exceed 2**32 at 8B)."""
    rng = np.random.RandomState(0)
    x = rng.randint(0, 2**32, 500, dtype=np.uint64)
    y = rng.randint(0, 2**32, 500, dtype=np.uint64)
    for c in (0, 1, 65535, 65536, 126464, 151936, 2**32 - 1):
        hi, lo = sampler_lib.mul_add_u32(
            jnp.asarray(x.astype(np.uint32)), c, jnp.asarray(y.astype(np.uint32))
        )
        got = [(int(h) << 32) | int(w) for h, w in zip(np.asarray(hi), np.asarray(lo), strict=True)]
        want = [(int(a) * c + int(d)) % 2**64 for a, d in zip(x, y, strict=True)]
        assert got == want, c


def test_fill_positions_layout():
    fill = jnp.asarray([[0, 1, 1, 0, 1], [1, 0, 0, 0, 0], [0, 0, 0, 1, 1]], bool)
    pos, valid, slot = sampler_lib.fill_positions(fill, 3)
    np.testing.assert_array_equal(pos, [[1, 2, 4], [0, 1, 2], [3, 4, 0]])
    np.testing.assert_array_equal(valid, [[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    back = sampler_lib.scatter_back(pos, slot)
    np.testing.assert_array_equal(np.where(fill, back, -1), np.where(fill, np.arange(5), -1))
    with pytest.raises(ValueError, match="fill_width=17 must be in"):
        canvas, attn, editable = make_canvas()
        denoise(mixer, canvas, attn, editable, jax.random.key(0),
                cfg=SamplerConfig(mask_token_id=M), fill_width=17)  # fmt: skip
