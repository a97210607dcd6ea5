"""The scanned masked-diffusion sampler loop (DAT spec §5.3–§5.5) over cheap logits functions:
invariants of every remasking mode, blocks in order, jit == eager, T = 0 determinism, CFG, AAPL
global remasking and conditioning dropout, rank top-k vs NumPy, oracle marginals, Dream's shift,
fp64 Gumbel. The `Decoder`-backed API (sharding, compiles, errors) is in test_diffusion_sample_api."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixat_jax.diffusion import sampler as sampler_lib
from mixat_jax.diffusion.denoiser import align_logits
from mixat_jax.diffusion.ranks import top_k_mask
from mixat_jax.diffusion.sampler import SamplerConfig, denoise
from tests.diffusion_helpers import CANVAS_MASK as M
from tests.diffusion_helpers import CANVAS_V as V
from tests.diffusion_helpers import check_invariants, make_canvas, schedule_reference

SUPPRESS = (1, 2)
FAST = {"xla_backend_optimization_level": 0}  # quick XLA:CPU compiles, same numerics
_W_VxV = jax.random.normal(jax.random.key(0), (V, V))
_POS_LxV = jax.random.normal(jax.random.key(1), (32, V))


def mixer(canvas_BxL, attn_BxL):
    """A cheap context-dependent stand-in for a model: position table + a pooled-canvas term."""
    one_hot = jax.nn.one_hot(canvas_BxL, V) * attn_BxL[..., None]
    context_BxV = one_hot.mean(1) @ _W_VxV
    return _POS_LxV[None, : canvas_BxL.shape[1]] + 4.0 * context_BxV[:, None, :]


_COMPILED = {}


def run(logits_fn, canvas, attn, editable, key, *, cfg):
    """`denoise` jitted (compiled once per logits_fn, cfg and shape, with FAST options)."""
    sig = (logits_fn, cfg, np.shape(canvas), jax.config.jax_enable_x64)
    if sig not in _COMPILED:
        jitted = jax.jit(denoise, static_argnames=("logits_fn", "cfg"))
        lowered = jitted.lower(logits_fn, canvas, attn, editable, key, cfg=cfg)
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

    def recording(x, a):
        seen.append(np.asarray(x))
        return mixer(x, a)

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

    def logits_fn(canvas_BxL, attn_BxL):
        # "+ 0 · canvas" keeps XLA from constant-folding the broadcast table (slow compiles)
        return t[None] + 0.0 * canvas_BxL[..., None].astype(jnp.float32)

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
