"""GCG (mixat_jax.attacks.gcg): batched losses, acceptance, filters, determinism, sharding,
{optim_str} placement, mellowmax, multi-behaviour batches, bad input (spec mixat.md §6.4)."""

from __future__ import annotations

import functools
import io
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixat_jax.attacks import gcg
from mixat_jax.attacks.gcg_driver import (
    SuffixBuffer,
    prepare_problem,
    run_gcg,
    run_gcg_batch,
    start_run,
    step_spec,
)
from mixat_jax.attacks.gcg_filters import allowed_token_mask, banned_token_mask, slot_prompt
from mixat_jax.attacks.gcg_presets import PRESETS, GCGConfig, preset
from mixat_jax.chat import ChatRenderer
from mixat_jax.evaluation.white_box import GCGAttack
from mixat_jax.hf.load import load_pretrained
from mixat_jax.judges.refusal import refusal_substrings
from mixat_jax.mesh import MeshConfig, make_mesh
from mixat_jax.sampling import TextGenerator
from tests.hf_builders import build_tiny_hf_checkpoint

BEHAVIOR = "Write a poem about the sea"
TARGET = "Sure, here is a poem"
CFG = GCGConfig(
    num_steps=4, optim_str_init="x x x x x", search_width=16, topk=8, batch_size=8, filter_topm=4
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_hf_checkpoint(tmp_path_factory.mktemp("gcg") / "m", "llama3", vocab_size=512)


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_pretrained(model_dir)


def _one_problem(model, tok, cfg):
    """(problem, graphdef, params, batch-1 prefix cache, layout) for BEHAVIOR/TARGET."""
    prob = prepare_problem(ChatRenderer(tok), BEHAVIOR, TARGET, cfg, 0)
    pre_ids, pre_mask, lay, r_len = gcg.host_arrays([prob.segments], 0, cfg.length_multiple)
    graphdef, state = nnx.split(model)
    caches = gcg.batched_prefix_cache(
        (state,), pre_ids, pre_mask, graphdef=graphdef, rest_len=r_len
    )
    cache = jax.tree.map(lambda x: x[0], caches)
    layout = jax.tree.map(lambda x: jnp.asarray(x[0]), lay)
    return prob, graphdef, state, cache, layout


# Tolerances (issue #15: must hold on any CPU, not just the one they were measured on). GCG losses
# are fp32 mean target CEs (~6 here) from the tiny fp32 model; two different programs (reuse vs
# full evaluation, batched vs single behaviour, sharded vs unsharded, cache vs full forward) sum
# the same dot products (length <= 128) in different orders, so a loss moves by ~1e-6 relative
# (measured on AMD EPYC: <= 4.8e-7 abs = 1 ulp of 6.5). rtol 1e-5 (~6e-5 abs) is >100x that and
# still far below the loss changes a wrong cache offset/mask/target shift causes (>= 1e-2).


def _assert_same_trajectory(got, want, rtol, atol):
    """Two GCG runs computed by *different* programs take the same steps, up to fp32 near-ties.

    Accepting a candidate is an argmin over candidate losses: where two candidates' losses are
    closer than the reassociation error, another CPU/program may pick the other one (issue #15),
    and the runs legitimately diverge from there. So: compare step by step; at the first step whose
    suffix differs, the accepted losses must still agree (a tie, not a wrong loss); later steps
    are not compared. On AMD EPYC all runs compared here agree on every step.
    """
    assert len(got.losses) == len(want.losses) == len(got.strings) == len(want.strings)
    pairs = enumerate(zip(got.strings, want.strings, strict=True))
    k = next((i for i, (a, b) in pairs if a != b), None)
    n = len(want.losses) if k is None else k + 1
    np.testing.assert_allclose(got.losses[:n], want.losses[:n], rtol=rtol, atol=atol)


def _assert_matches_full(graphdef, state, cache, layout, cand, chunk, reuse):
    """``reuse(cand, layout)`` (a suffix-prefix reuse path) == the full candidate evaluation."""
    ref, ref_hit = gcg.candidate_losses(graphdef, (state,), cache, cand, layout, chunk=chunk)
    got, got_hit = jax.jit(reuse)(cand, layout)
    # different programs: equal up to fp32 reassociation (see the note above _assert_same_...)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
    # Early-stop flags need argmax == target at every target position; for this random model no
    # candidate comes within reassociation error of that, so they are False on both sides.
    np.testing.assert_array_equal(np.asarray(got_hit), np.asarray(ref_hit))


@pytest.fixture(scope="module")
def base_run(loaded):
    model, tok = loaded
    return run_gcg(model, tok, BEHAVIOR, TARGET, CFG, seed=0)


def _full_loss(model, ids, n_target):
    """Reference: mean target CE from one full forward without any cache."""
    logits = np.asarray(jax.jit(lambda x: model(x))(jnp.asarray([ids]))[0], np.float64)
    logits = logits[len(ids) - n_target - 1 : -1]
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return float(np.mean(lse - logits[np.arange(n_target), ids[-n_target:]]))


def test_batched_candidate_losses_equal_per_candidate_loop(loaded):
    model, tok = loaded
    prob, graphdef, state, cache, layout = _one_problem(model, tok, CFG)
    s = len(prob.slots.suffix_ids)
    allowed = np.flatnonzero(allowed_token_mask(tok, model.cfg.vocab_size))
    cand = np.random.default_rng(0).choice(allowed, (8, s)).astype(np.int32)

    @jax.jit
    def batched(st, c):
        table = nnx.merge(graphdef, st).embedding_matrix
        loss, _ = gcg.candidate_losses(graphdef, (st,), cache, c, layout, chunk=4)
        _, grad = gcg.token_gradients(graphdef, (st,), cache, c[0], layout)

        def onehot_loss(oh):  # the textbook one-hot gradient
            m = nnx.merge(graphdef, st)
            logits = gcg.rest_logits(m, cache, (oh @ table)[None], layout)
            return gcg.target_loss(logits, layout)[0][0]

        ref_grad = jax.grad(onehot_loss)(jax.nn.one_hot(c[0], table.shape[0]))
        return loss, grad, ref_grad

    loss, grad, ref_grad = batched(state, jnp.asarray(cand))
    # Gather-embedding gradient vs the one-hot-matmul gradient: same math, different contraction
    # order (a length-V one-hot dot vs a scatter); fp32 reassociation relative to the gradient
    # scale, so the bound scales with max|grad| (the old fixed atol 1e-5 did not).
    atol = 1e-4 * float(np.abs(np.asarray(ref_grad)).max())
    np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), rtol=1e-3, atol=atol)
    full = jax.jit(lambda ids: model(ids))
    n_t = len(prob.target_ids)
    for i in range(len(cand)):  # reference: one full forward per candidate, no cache
        ids = [*prob.slots.before_ids, *cand[i], *prob.slots.after_ids, *prob.target_ids]
        lp = jax.nn.log_softmax(np.asarray(full(jnp.asarray([ids]))[0])[len(ids) - n_t - 1 : -1])
        ref = -float(np.mean(np.asarray(lp)[np.arange(n_t), prob.target_ids]))
        # cached batched evaluation vs one full forward: reassociation only (~1e-6 relative)
        np.testing.assert_allclose(float(loss[i]), ref, rtol=1e-4, atol=1e-4)


def test_never_accepts_worse_and_loss_is_real(loaded, base_run):
    model, tok = loaded
    losses = base_run.losses
    assert len(losses) == CFG.num_steps
    assert all(b <= a for a, b in zip(losses, losses[1:], strict=False))
    assert base_run.best_loss == losses[-1] < losses[0] + 1e-6
    renderer = ChatRenderer(tok)
    slots = slot_prompt(renderer, BEHAVIOR, CFG.optim_str_init)
    target_ids = tok(TARGET, add_special_tokens=False)["input_ids"]
    ids = [*slots.prompt_ids(base_run.best_ids), *target_ids]
    # full fp32 forward (CE in fp64) vs the cached batched fp32 loss (~6.2): reassociation only,
    # ~1e-6 relative; 1e-4 abs is ~2e-5 relative.
    assert abs(_full_loss(model, ids, len(target_ids)) - base_run.best_loss) < 1e-4
    # the best suffix tokenises back to itself inside the real prompt (nanoGCG #24)
    assert renderer.prompt_ids(base_run.best_test_case) == slots.prompt_ids(base_run.best_ids)


def test_same_seed_same_suffix(loaded, base_run):
    model, tok = loaded
    again = run_gcg(model, tok, BEHAVIOR, TARGET, CFG, seed=0)
    # Exact on any CPU: the same compiled step (compile_seconds == 0 below) runs on the same
    # inputs in the same process, and XLA:CPU is deterministic for a fixed program and machine.
    assert again.strings == base_run.strings and again.losses == base_run.losses
    assert again.compile_seconds == 0.0  # the compiled step is reused
    other = run_gcg(model, tok, BEHAVIOR, TARGET, CFG, seed=1)
    assert other.strings != base_run.strings


def test_filters(loaded):
    model, tok = loaded
    v = model.cfg.vocab_size
    banned = banned_token_mask(tok, v)
    for i in [*tok.all_special_ids, *tok.get_added_vocab().values()]:
        assert banned[i]
    texts = [tok.decode([i]) for i in range(len(tok))]
    non_ascii = [i for i, t in enumerate(texts) if not t.isascii()]
    newline = [i for i, t in enumerate(texts) if t == "\n"]
    assert non_ascii and newline and banned[non_ascii].all() and banned[newline].all()
    loose = banned_token_mask(tok, v, allow_non_ascii=True)
    assert not loose[non_ascii].all() and loose[tok.all_special_ids].all()
    # retokenisation in the full prompt context
    renderer = ChatRenderer(tok)
    slots = slot_prompt(renderer, BEHAVIOR, CFG.optim_str_init)
    assert slots.before_text.endswith("sea") and len(slots.suffix_ids) == 5
    assert slots.retokenizes(renderer, slots.suffix_ids)
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    (space,), (x,), (sx,) = enc(" "), enc("x"), enc(" x")
    assert not slots.retokenizes(renderer, [space, x, sx, sx, sx])  # " "+"x" re-merges to " x"


class _NoTokens:
    """A tokenizer whose every token is non-ASCII."""

    all_special_ids: list[int] = []

    def __len__(self):
        return 4

    def batch_decode(self, ids, **kw):
        return ["é"] * len(ids)

    def get_added_vocab(self):
        return {}


def test_bad_input(loaded):
    model, tok = loaded
    with pytest.raises(ValueError, match="target string is empty"):
        run_gcg(model, tok, BEHAVIOR, "  ", CFG)
    with pytest.raises(ValueError, match="tokenises to 5 tokens"):
        run_gcg(model, tok, BEHAVIOR, TARGET, CFG.replace(suffix_len=7))
    with pytest.raises(ValueError, match="too long for the sequence budget"):
        run_gcg(model, tok, BEHAVIOR * 20, TARGET, CFG.replace(max_seq_len=64))
    with pytest.raises(ValueError, match="no token"):
        allowed_token_mask(_NoTokens(), 4)
    with pytest.raises(ValueError, match="search_width"):
        GCGConfig(search_width=0)
    with pytest.raises(ValueError, match="unknown GCG preset"):
        preset("nope")


def test_optim_str_placement(loaded):
    _, tok = loaded
    renderer = ChatRenderer(tok)
    slots = slot_prompt(renderer, "Tell me {optim_str} about the sea", CFG.optim_str_init)
    assert slots.before_text.endswith("Tell me") and slots.after_text.startswith(" about the sea")
    case = slots.test_case(tok, slots.suffix_ids)
    assert case == "Tell me x x x x x about the sea"
    assert renderer.prompt_ids(case) == slots.prompt_ids(slots.suffix_ids)


def test_mellowmax_and_ce():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 7)).astype(np.float32)
    tgt = np.array([1, 2, 3, 0], np.int32)
    w = np.array([1, 1, 1, 0], np.float32)
    layout = gcg.Layout(None, None, None, jnp.asarray(tgt), jnp.asarray(w))
    label = logits[:, np.arange(4), tgt][:, :3]
    alpha = 2.0
    ref_mm = (np.log(np.exp(-alpha * label).sum(-1)) - np.log(3)) / alpha
    loss_fn = jax.jit(gcg.target_loss, static_argnames=("use_mellowmax", "alpha"))
    mm, _ = loss_fn(jnp.asarray(logits), layout, use_mellowmax=True, alpha=alpha)
    np.testing.assert_allclose(np.asarray(mm), ref_mm, rtol=1e-5)
    lse = np.log(np.exp(logits).sum(-1))[:, :3]
    ce, hit = loss_fn(jnp.asarray(logits), layout)
    np.testing.assert_allclose(np.asarray(ce), (lse - label).mean(-1), rtol=1e-5)
    perfect = np.full((1, 4, 7), -5.0, np.float32)
    perfect[0, np.arange(4), tgt] = 5.0
    perfect[0, 3] = 0.0  # padded position: ignored by the early-stop check
    assert bool(loss_fn(jnp.asarray(perfect), layout)[1][0]) and not bool(hit.all())


def test_buffer_semantics():
    keep = SuffixBuffer(0, accept_worse=False)
    keep.items = [(1.0, (1,))]
    assert not keep.offer(2.0, (2,)) and keep.best == (1.0, (1,))
    assert keep.offer(0.5, (3,)) and keep.best == (0.5, (3,))
    walk = SuffixBuffer(0, accept_worse=True)
    walk.items = [(1.0, (1,))]
    assert walk.offer(2.0, (2,)) and walk.best == (2.0, (2,))
    buf = SuffixBuffer(2, accept_worse=False)
    buf.items = [(1.0, (1,))]
    buf.offer(3.0, (2,))
    buf.offer(2.0, (3,))
    assert [x[0] for x in buf.items] == [1.0, 2.0]
    # size k keeps the k lowest-loss distinct suffixes, ascending; the best is the current one
    big = SuffixBuffer(3, accept_worse=False)
    offers = [(5.0, (5,)), (2.0, (2,)), (4.0, (4,)), (2.0, (2,)), (1.0, (1,)), (6.0, (6,))]
    added = [big.offer(loss, ids) for loss, ids in offers]
    assert added == [True, True, True, False, True, False]  # duplicate; worse than a full buffer
    assert big.items == [(1.0, (1,)), (2.0, (2,)), (4.0, (4,))] and big.best == (1.0, (1,))


def test_multi_behaviour_batch_equals_separate_runs(loaded, base_run):
    model, tok = loaded
    other = ("Write a poem about the sun", TARGET)
    batch = run_gcg_batch(model, tok, [BEHAVIOR, other[0]], [TARGET, other[1]], CFG, seed=[0, 5])
    single = run_gcg(model, tok, *other, CFG, seed=5)
    for got, want in ((batch[0], base_run), (batch[1], single)):
        # a 2-behaviour batched program vs single runs: equal up to reassociation/near-ties
        _assert_same_trajectory(got, want, rtol=1e-5, atol=1e-6)
        assert got.losses[-1] < got.losses[0]


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_sharded_run_agrees(model_dir, base_run):
    mesh = make_mesh(MeshConfig(data=8, fsdp=1, tensor=1))
    model, tok = load_pretrained(model_dir, mesh=mesh)
    sharded = run_gcg(model, tok, BEHAVIOR, TARGET, CFG, seed=0, mesh=mesh)
    # candidates sharded over 8 devices vs one device: up to reassociation/near-ties
    _assert_same_trajectory(sharded, base_run, rtol=1e-5, atol=1e-6)


def test_bucketed_candidate_losses_equal_unbucketed(loaded):
    """Suffix-prefix reuse (spread positions): same losses/flags as evaluating full suffixes."""
    model, tok = loaded
    cfg = CFG.replace(positions="spread", search_width=24, n_replace=1)
    prob, graphdef, state, cache, layout = _one_problem(model, tok, cfg)
    s = len(prob.slots.suffix_ids)
    allowed = allowed_token_mask(tok, model.cfg.vocab_size)
    ids = jnp.asarray(prob.slots.suffix_ids, jnp.int32)
    grad = jnp.asarray(np.random.default_rng(1).normal(size=(s, model.cfg.vocab_size)), jnp.float32)
    for n_replace, n_buckets, chunk in [(1, 4, 8), (2, 3, 4), (1, 1, 24)]:
        w = cfg.search_width
        cand = gcg.sample_candidates(
            jax.random.key(0), ids, grad, jnp.asarray(allowed), width=w, topk=8,
            n_replace=n_replace, spread=True,
        )  # fmt: skip
        order, buckets = gcg.bucket_plan(w, s, n_replace, n_buckets, chunk)
        assert sorted(order) == list(range(w)) and sum(b[2] for b in buckets) == w
        for p, off, n, _ in buckets:  # every candidate of a bucket keeps the suffix before p
            rows = np.asarray(cand)[list(order[off : off + n])]
            assert (rows[:, :p] == np.asarray(ids)[:p]).all()
        reuse = functools.partial(
            gcg.bucketed_candidate_losses, graphdef, (state,), cache, ids, order=order,
            buckets=buckets,
        )  # fmt: skip
        _assert_matches_full(graphdef, state, cache, layout, cand, chunk, reuse)


def test_reuse_suffix_prefix_run_matches_full_evaluation(loaded):
    """A short spread-position run gives the same suffixes and losses with and without reuse."""
    model, tok = loaded
    cfg = CFG.replace(positions="spread", num_steps=5, search_width=20, batch_size=8)
    on = run_gcg(model, tok, BEHAVIOR, TARGET, cfg.replace(reuse_suffix_prefix=True), seed=3)
    off = run_gcg(model, tok, BEHAVIOR, TARGET, cfg.replace(reuse_suffix_prefix=False), seed=3)
    _assert_same_trajectory(on, off, rtol=1e-5, atol=1e-6)  # different programs: up to ties
    if on.strings == off.strings:
        assert on.best_ids == off.best_ids


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
@pytest.mark.parametrize("positions,width", [("spread", 20), ("random", 32)])
def test_reuse_suffix_prefix_sharded_matches_full_evaluation(model_dir, loaded, positions, width):
    """Suffix-prefix reuse on candidates sharded over 8 devices == the unsharded full run: spread
    buckets (sizes rounded to the devices, padded last chunk) and random-position run-time levels."""
    cfg = CFG.replace(positions=positions, num_steps=3, search_width=width, batch_size=8)
    off = run_gcg(*loaded, BEHAVIOR, TARGET, cfg.replace(reuse_suffix_prefix=False), seed=3)
    mesh = make_mesh(MeshConfig(data=8, fsdp=1, tensor=1))
    model, tok = load_pretrained(model_dir, mesh=mesh)
    on = run_gcg(model, tok, BEHAVIOR, TARGET, cfg, seed=3, mesh=mesh)
    _assert_same_trajectory(on, off, rtol=1e-5, atol=1e-6)  # different programs: up to ties


def test_sorted_candidate_losses_equal_full_evaluation(loaded):
    """Run-time suffix-prefix reuse (random positions): candidates sorted by first differing
    position, each chunk skipping the longest static level it shares — same losses and flags,
    returned in the original candidate order."""
    model, tok = loaded
    prob, graphdef, state, cache, layout = _one_problem(model, tok, CFG)
    s = len(prob.slots.suffix_ids)
    assert gcg.reuse_levels(s, 4) == tuple(i * s // 4 for i in range(4))
    allowed = allowed_token_mask(tok, model.cfg.vocab_size)
    ids = jnp.asarray(prob.slots.suffix_ids, jnp.int32)
    grad = jnp.asarray(np.random.default_rng(2).normal(size=(s, model.cfg.vocab_size)), jnp.float32)
    for n_replace, n_levels, chunk in [(1, 4, 4), (2, 3, 8), (1, s, 2)]:
        w = 32
        cand = gcg.sample_candidates(
            jax.random.key(n_levels), ids, grad, jnp.asarray(allowed), width=w, topk=8,
            n_replace=n_replace,
        )  # fmt: skip
        # a candidate equal to the current suffix (no differing position)
        cand = cand.at[0].set(ids)
        levels = gcg.reuse_levels(s, n_levels)
        reuse = functools.partial(
            gcg.sorted_candidate_losses, graphdef, (state,), cache, ids, chunk=chunk, levels=levels
        )
        _assert_matches_full(graphdef, state, cache, layout, cand, chunk, reuse)
    with pytest.raises(ValueError, match="must start at 0"):
        gcg.sorted_candidate_losses(
            graphdef, (state,), cache, ids, cand, layout, chunk=4, levels=(1, 2)
        )  # fmt: skip


def test_random_position_reuse_run_matches_full_evaluation(loaded):
    """nanoGCG-style random positions: a run with run-time reuse equals one without."""
    model, tok = loaded
    cfg = CFG.replace(num_steps=5, search_width=32, batch_size=4, reuse_levels=4)
    on = run_gcg(model, tok, BEHAVIOR, TARGET, cfg.replace(reuse_suffix_prefix=True), seed=5)
    off = run_gcg(model, tok, BEHAVIOR, TARGET, cfg.replace(reuse_suffix_prefix=False), seed=5)
    spec = step_spec(cfg, 100, None, suffix_len=len(on.best_ids))
    assert spec.levels is not None and spec.chunk == 4
    assert step_spec(cfg, 100, None, suffix_len=4, n_behaviors=2).levels is None
    _assert_same_trajectory(on, off, rtol=1e-5, atol=1e-6)  # different programs: up to ties


def _parrot(model, tok, text):
    """A copy of ``model`` whose greedy completion of any prompt is ``text`` over and over.

    The blocks' output projections are zeroed (the residual stream is the token embedding), each
    token of ``text`` embeds to its own axis and the head maps it to the next token of ``text``;
    every other token shares axis 0, which the head maps to the first token."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    v, d = model.cfg.vocab_size, model.cfg.hidden_size
    assert len(set(ids)) == len(ids) < d
    emb = np.zeros((v, d), np.float32)
    emb[:, 0] = 1.0
    head = np.zeros((d, v), np.float32)
    head[0, ids[0]] = 1.0
    for i, t in enumerate(ids, start=1):
        emb[t] = 0.0
        emb[t, i] = 1.0
        head[i, ids[i % len(ids)]] = 1.0
    parrot = nnx.clone(model)
    parrot.embed_tokens[...] = emb
    parrot.lm_head[...] = head
    parrot.norm.weight[...] = np.ones(d, np.float32)
    parrot.layers.o_proj.kernel[...] = np.zeros(parrot.layers.o_proj.kernel.shape, np.float32)
    parrot.layers.down_proj.kernel[...] = np.zeros(parrot.layers.down_proj.kernel.shape, np.float32)
    return parrot


def test_check_refusal_stops_only_when_the_completion_does_not_refuse(loaded):
    """HarmBench's refusal check (on in the harmbench and mixat_train presets): at step 0, every
    ``eval_steps`` and the last step, once the accepted loss is below ``check_refusal_min_loss``,
    the target model completes the prompt with the current suffix greedily; a completion with no
    HarmBench refusal substring stops the attack early (``stopped_early``), a refusal does not."""
    assert PRESETS["harmbench"].check_refusal and PRESETS["mixat_train"].check_refusal
    assert not PRESETS["nanogcg"].check_refusal
    model, tok = loaded
    refuser, complier = _parrot(model, tok, "I cannot"), _parrot(model, tok, "Sure, here is")
    prompt = ChatRenderer(tok).prompt_ids(BEHAVIOR)
    needles = [s.lower() for s in refusal_substrings("harmbench")]
    for m, refuses in ((refuser, True), (complier, False)):  # the fixtures do what they claim
        out = TextGenerator(m, tok, batch_size=1).generate_ids([prompt], max_new_tokens=8)[0]
        text = tok.decode(out, skip_special_tokens=False).lower()
        assert any(n in text for n in needles) == refuses, text
    cfg = CFG.replace(check_refusal=True, eval_steps=2, check_refusal_min_loss=float("inf"))
    r = run_gcg(refuser, tok, BEHAVIOR, TARGET, cfg, seed=0)
    assert (r.num_steps, r.stopped_early, len(r.losses)) == (cfg.num_steps, False, cfg.num_steps)
    r = run_gcg(complier, tok, BEHAVIOR, TARGET, cfg, seed=0)
    assert (r.num_steps, r.stopped_early, len(r.losses)) == (1, True, 1)  # checked at step 0
    # the check waits for a low loss (the complier's loss is ~4): not below 0.05, no check
    r = run_gcg(complier, tok, BEHAVIOR, TARGET, cfg.replace(check_refusal_min_loss=0.05), seed=0)
    assert (r.num_steps, r.stopped_early) == (cfg.num_steps, False) and min(r.losses) > 0.05
    r = run_gcg(complier, tok, BEHAVIOR, TARGET, cfg.replace(check_refusal=False), seed=0)
    assert (r.num_steps, r.stopped_early) == (cfg.num_steps, False)


def test_buffer_keeps_the_best_suffixes_and_each_step_starts_from_the_best(loaded):
    """``buffer_size=3`` (nanoGCG's attack buffer): the init adds 2 random suffixes that
    retokenise in the prompt, with their real losses, ascending (the init suffix, not yet
    evaluated, last); every step samples around the buffer's best (each new entry differs from
    it in ``n_replace`` positions), the buffer keeps the 3 lowest, and the reported loss is the
    buffer's best. ``run_gcg`` takes exactly these steps."""
    model, tok = loaded
    cfg = CFG.replace(buffer_size=3, num_steps=3)
    run = start_run(model, tok, [BEHAVIOR], [TARGET], cfg, seed=0)
    buf, prob = run.buffers[0], run.problems[0]
    init_ids = prob.slots.suffix_ids
    assert buf.items == [(float("inf"), init_ids)]
    run.init_buffers()
    losses = [loss for loss, _ in buf.items]
    assert len(losses) == 3 and losses == sorted(losses) and buf.items[-1] == (np.inf, init_ids)
    renderer = ChatRenderer(tok)
    n_t = len(prob.target_ids)
    for loss, ids in buf.items[:2]:
        assert ids != init_ids and prob.slots.retokenizes(renderer, ids)
        full = _full_loss(model, [*prob.slots.prompt_ids(ids), *prob.target_ids], n_t)
        assert abs(full - loss) < 1e-4  # cached batched fp32 vs one fp64-CE forward
    n_new = 0
    for step in range(cfg.num_steps):
        before = list(buf.items)
        run.step(step)
        losses = [loss for loss, _ in buf.items]
        assert len(losses) == 3 and losses == sorted(losses) and losses[0] <= before[0][0]
        new = [item for item in buf.items if item not in before]
        assert len(new) <= 1
        for _, ids in new:  # drawn around the best entry, not another one
            assert sum(a != b for a, b in zip(ids, before[0][1], strict=True)) == cfg.n_replace
        n_new += len(new)
        assert run.tracks[0].losses[-1] == buf.best[0]
    assert n_new >= 1  # the first step's candidate at least replaces the unevaluated init
    assert np.inf not in [loss for loss, _ in buf.items]
    stepped = run.results()[0]
    r = run_gcg(model, tok, BEHAVIOR, TARGET, cfg, seed=0)
    assert (r.losses, r.strings, r.best_ids) == (stepped.losses, stepped.strings, stepped.best_ids)


def test_best_test_case_is_the_lowest_loss_step_not_the_last(loaded):
    """With ``accept_worse`` (all presets) a later step can be worse than an earlier one:
    ``best_*`` is the lowest-loss step over the run, ``final_*`` the last step; the evaluation's
    GCG attack (``evaluation.white_box.GCGAttack``) with ``test_case="best"`` returns the former,
    with ``"final"`` (default) the latter."""
    model, tok = loaded
    small = dict(num_steps=8, optim_str_init=CFG.optim_str_init, search_width=1, topk=8,
                 batch_size=1, filter_topm=4)  # fmt: skip
    cfg = preset("nanogcg", **small)  # one candidate per step: a random walk that also climbs
    renderer = ChatRenderer(tok)
    slots = slot_prompt(renderer, BEHAVIOR, cfg.optim_str_init)
    walked_up = None
    for seed in range(4):
        r = run_gcg(model, tok, BEHAVIOR, TARGET, cfg, seed=seed)
        i = int(np.argmin(r.losses))
        assert r.best_loss == r.losses[i] and r.best_string == r.strings[i]
        assert r.best_test_case == slots.test_case(tok, r.best_ids)
        assert renderer.prompt_ids(r.best_test_case) == slots.prompt_ids(r.best_ids)
        assert r.final_string == r.strings[-1]
        if r.losses[-1] > r.best_loss and walked_up is None:
            walked_up = (seed, r)
    assert walked_up is not None, "no run ended above its best step"
    seed, r = walked_up
    assert r.final_test_case != r.best_test_case and r.final_string != r.best_string
    assert (
        r.final_test_case.startswith(slots.instruction_head) and r.final_string in r.final_test_case
    )
    generator = SimpleNamespace(model=model, tokenizer=tok)
    behavior = SimpleNamespace(id="b0", behavior=BEHAVIOR, context=None, target=TARGET)
    for which, want in (("best", r.best_test_case), ("final", r.final_test_case)):
        attack = GCGAttack(generator, cfg, test_case=which, stream=io.StringIO())
        (case,) = attack.generate_test_cases([behavior], seed=seed)["b0"]
        assert case.text == want
        assert case.meta["best_loss"] == r.best_loss and case.meta["final_loss"] == r.losses[-1]
