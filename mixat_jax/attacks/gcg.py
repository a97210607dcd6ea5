"""Greedy Coordinate Gradient (GCG) with static shapes (spec mixat.md §6.4; peers.md §1, §2, §12).

One GCG step is one compiled call (``gcg_step``), vmapped over behaviours (not for one):
  1. ``token_gradients``: loss and gradient at the current suffix — VJP to the suffix embeddings,
     then ``grad_emb @ Eᵀ`` (equal to the one-hot gradient, one [S, D]x[D, V] matmul);
  2. ``sample_candidates``: top-k tokens per position (banned tokens masked), ``search_width``
     candidates with ``n_replace`` swaps at random (nanoGCG) or evenly spread (HarmBench)
     positions, from an explicit PRNG key;
  3. ``candidate_losses``: all candidates against a prefix KV cache computed once per run (cache of
     batch 1 broadcast to the chunk), logits only at the target positions, chunks of
     ``batch_size`` through ``lax.map``; candidates sharded over the mesh's data axes;
     with "spread" positions and ``reuse_suffix_prefix`` (default) ``bucketed_candidate_losses``
     instead: candidates grouped (static plan) into buckets by first swapped position p, the cache
     extended once per step with the current suffix's first tokens, each bucket run from p on;
     with random positions (one behaviour) ``sorted_candidate_losses``: candidates sorted by
     first differing position on device, each chunk run from the longest static prefix level it
     shares (``lax.switch`` over one branch per level);
  4. duplicates masked to +inf, the top-M candidates by loss returned with their early-stop flags
     (every target token argmax-correct: the target logit equals the row maximum).
  With probe sampling (``StepSpec.probe_size``; ``probe_candidate_losses``, issue #14) step 3
  scores every candidate with a draft model that shares the tokenizer, the target only a random
  probe set and the draft's f best (f from the Spearman agreement; ``gcg_probe``); the rest +inf.
Several behaviours share one compiled step (``batched_gcg_step``; prefix and rest padded to
common, bucketed lengths by ``host_arrays`` so repeated calls — e.g. MixAT training — reuse it);
``compile_cached`` keeps the AOT executables. Everything here is pure and config-independent: the
host driver (``gcg_driver``: ``run_gcg`` / ``run_gcg_batch``, the attack buffer, acceptance of the
best top-M candidate that retokenises *in the full prompt*, the HarmBench refusal check) builds
on it and is never imported from here.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from mixat_jax.attacks.gcg_probe import filtered_size, spearman

__all__ = [
    "HostArrays",
    "Layout",
    "Segments",
    "StepSpec",
    "batched_candidate_losses",
    "batched_gcg_step",
    "batched_prefix_cache",
    "bucket_plan",
    "bucketed_candidate_losses",
    "candidate_losses",
    "compile_cached",
    "gcg_step",
    "host_arrays",
    "prefix_cache",
    "probe_candidate_losses",
    "rest_logits",
    "reuse_levels",
    "round_up",
    "sample_candidates",
    "sorted_candidate_losses",
    "target_loss",
    "token_gradients",
]

Cache = dict[str, jax.Array]


class Layout(NamedTuple):
    """Per-behaviour token layout after the cached prefix: ``[suffix S | after | target | pad]``."""

    rest_ids_R: jax.Array  # int32; the suffix slots hold any ids (replaced by candidates)
    rest_mask_R: jax.Array  # bool
    target_at_T: jax.Array  # int32; rest index whose logits predict each target token
    target_ids_T: jax.Array  # int32
    target_w_T: jax.Array  # float32; 1 for real target tokens, 0 for padding


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Static shape/loss settings of the compiled step (hashable)."""

    width: int  # real search width
    chunk: int  # candidates per forward (lax.map batch)
    n_chunks: int
    topk: int
    n_replace: int
    spread: bool
    use_mellowmax: bool = False
    mellowmax_alpha: float = 1.0
    top_m: int = 16
    data_axes: tuple[str, ...] | None = None
    # Suffix-prefix reuse (``bucket_plan``): candidate order (sorted by first swapped position)
    # and per bucket (first swapped position, offset in that order, count, chunk); None = off.
    order: tuple[int, ...] | None = None
    buckets: tuple[tuple[int, int, int, int], ...] | None = None
    # Run-time suffix-prefix reuse for random positions (``sorted_candidate_losses``): the
    # static prefix lengths a sorted chunk may skip; None = off. Needs one behaviour per call
    # (under vmap a batched ``lax.switch`` would run every branch).
    levels: tuple[int, ...] | None = None
    # Probe sampling (``probe_candidate_losses``; ``gcg_probe``): probe set size P (0 = off),
    # nanoGCG's r, and the static filtered-set sizes (one size: a mask over the largest, F;
    # several: ``lax.switch`` to the smallest that holds f). Sizes are multiples of the data
    # devices when sharded (``probe_pad`` likewise for P).
    probe_size: int = 0
    probe_r: float = 8.0
    filter_sizes: tuple[int, ...] = ()
    probe_pad: int = 0

    @property
    def padded_width(self) -> int:
        return self.chunk * self.n_chunks


# ------------------------------------------------------------------------------ host arrays


def round_up(n: int, m: int) -> int:
    """``n`` rounded up to a multiple of ``m``, at least ``m`` (padded lengths, chunk sizes)."""
    return max(m, -(-n // m) * m)


class Segments(NamedTuple):
    """One behaviour's token ids as the full prompt tokenises: ``before | suffix | after``, then
    the target (``gcg_filters.PromptSlots`` gives the first three)."""

    before_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]
    after_ids: tuple[int, ...]
    target_ids: tuple[int, ...]


class HostArrays(NamedTuple):
    """Padded host arrays for B behaviours: left-padded prefixes and stacked rest layouts."""

    prefix_ids_BxP: np.ndarray  # int32
    prefix_mask_BxP: np.ndarray  # bool
    layouts: Layout  # numpy leaves with a leading B axis
    rest_len: int  # R


def host_arrays(segments: Sequence[Segments], pad_id: int, length_multiple: int) -> HostArrays:
    """Left-padded prefixes [B, P] and stacked right-padded rest layouts [B, R] (``Layout``).

    P and R are rounded up to ``length_multiple`` and the target length to 8, so calls with
    similar prompts share one compiled step. Every behaviour's suffix has the same length S."""
    m = length_multiple
    s = len(segments[0].suffix_ids)
    p_len = round_up(max(len(q.before_ids) for q in segments), m)
    t_len = round_up(max(len(q.target_ids) for q in segments), 8)
    r_len = round_up(max(s + len(q.after_ids) + len(q.target_ids) for q in segments), m)
    b = len(segments)
    pre_ids = np.full((b, p_len), pad_id, np.int32)
    pre_mask = np.zeros((b, p_len), bool)
    rest_ids = np.full((b, r_len), pad_id, np.int32)
    rest_mask = np.zeros((b, r_len), bool)
    at = np.zeros((b, t_len), np.int32)
    tgt = np.zeros((b, t_len), np.int32)
    tw = np.zeros((b, t_len), np.float32)
    for i, q in enumerate(segments):
        before, after = q.before_ids, q.after_ids
        pre_ids[i, p_len - len(before) :] = before
        pre_mask[i, p_len - len(before) :] = True
        seq = [*q.suffix_ids, *after, *q.target_ids]
        rest_ids[i, : len(seq)] = seq
        rest_mask[i, : len(seq)] = True
        n_t = len(q.target_ids)
        at[i, :n_t] = s + len(after) - 1 + np.arange(n_t)
        tgt[i, :n_t] = q.target_ids
        tw[i, :n_t] = 1.0
    return HostArrays(pre_ids, pre_mask, Layout(rest_ids, rest_mask, at, tgt, tw), r_len)


# ------------------------------------------------------------------------------ pure pieces


def _merge(graphdef: nnx.GraphDef, params: Sequence[nnx.State]):
    return nnx.merge(graphdef, *params)


def prefix_cache(
    graphdef: nnx.GraphDef,
    params: Sequence[nnx.State],
    prefix_ids_BxP: jax.Array,
    prefix_mask_BxP: jax.Array,
    rest_len: int,
) -> Cache:
    """KV cache of each behaviour's (left-padded) prefix, as B caches of batch 1:
    k, v [B, N, 1, P + rest_len, K, Dh]; mask [B, 1, P + rest_len]."""
    model = _merge(graphdef, params)
    b, p = prefix_ids_BxP.shape
    cache = model.init_cache(b, p + rest_len)
    _, cache = model.forward(
        model.embed(prefix_ids_BxP), prefix_mask_BxP, cache=cache, return_hidden=True
    )
    return {
        "k": jnp.moveaxis(cache["k"], 1, 0)[:, :, None],
        "v": jnp.moveaxis(cache["v"], 1, 0)[:, :, None],
        "mask": cache["mask"][:, None],
    }


def rest_logits(model, cache: Cache, suffix_emb_CxSxD: jax.Array, layout: Layout) -> jax.Array:
    """Logits [C, T, V] at the target positions for C suffixes (embeddings) after the cached
    prefix (``model`` is the merged Decoder; the rest after the suffix comes from ``layout``)."""
    c, s, d = suffix_emb_CxSxD.shape
    r = layout.rest_ids_R.shape[0]
    start = cache["mask"].shape[-1] - r
    tail = model.embed(layout.rest_ids_R[s:]).astype(suffix_emb_CxSxD.dtype)
    emb = jnp.concatenate([suffix_emb_CxSxD, jnp.broadcast_to(tail, (c, r - s, d))], axis=1)
    mask = jnp.broadcast_to(layout.rest_mask_R, (c, r))
    at = jnp.broadcast_to(layout.target_at_T, (c, layout.target_at_T.shape[0]))
    logits, _ = model.forward(emb, mask, cache=cache, cache_index=start, logits_at_BxT=at)
    return logits


def target_loss(
    logits_CxTxV: jax.Array, layout: Layout, *, use_mellowmax: bool = False, alpha: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """(loss [C], all-target-tokens-argmax-correct [C]). Mean token CE, or nanoGCG's mellowmax
    over the negative target logits; padded target slots (weight 0) are ignored."""
    w = layout.target_w_T
    n = jnp.maximum(w.sum(), 1.0)
    label = jnp.take_along_axis(logits_CxTxV, layout.target_ids_T[None, :, None], axis=-1)[..., 0]
    # One max over the vocabulary serves the stable logsumexp and the early-stop flag (the target
    # token is a maximiser); a separate argmax pass over [C, T, V] cost ~7 % of a CPU step.
    top = jax.lax.stop_gradient(jnp.max(logits_CxTxV, axis=-1))
    if use_mellowmax:
        t = jnp.where(w > 0, -alpha * label, -jnp.inf)
        loss = (jax.nn.logsumexp(t, axis=-1) - jnp.log(n)) / alpha
    else:
        lse = top + jnp.log(jnp.sum(jnp.exp(logits_CxTxV - top[..., None]), axis=-1))
        loss = ((lse - label) * w).sum(-1) / n
    hit = (label >= top) | (w == 0)
    return loss, jnp.all(hit, axis=-1)


def token_gradients(
    graphdef: nnx.GraphDef,
    params: Sequence[nnx.State],
    cache: Cache,
    ids_S: jax.Array,
    layout: Layout,
    *,
    use_mellowmax: bool = False,
    alpha: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """(loss at ``ids_S``, d loss / d one-hot [S, V]) via the suffix-embedding VJP times Eᵀ.

    Only the suffix embeddings are differentiated (parameters are constants)."""
    model = _merge(graphdef, params)
    table_VxD = model.embedding_matrix

    def loss_fn(emb_SxD):
        logits = rest_logits(model, cache, emb_SxD[None], layout)
        return target_loss(logits, layout, use_mellowmax=use_mellowmax, alpha=alpha)[0][0]

    emb = jnp.take(table_VxD, ids_S, axis=0).astype(jnp.float32)
    loss, g_SxD = jax.value_and_grad(loss_fn)(emb)
    grad_SxV = jnp.einsum("sd,vd->sv", g_SxD, table_VxD, preferred_element_type=jnp.float32)
    return loss, grad_SxV


def sample_candidates(
    key: jax.Array,
    ids_S: jax.Array,
    grad_SxV: jax.Array,
    allowed_V: jax.Array,
    *,
    width: int,
    topk: int,
    n_replace: int = 1,
    spread: bool = False,
    spread_width: int | None = None,
) -> jax.Array:
    """``width`` candidates [width, S]: each swaps ``n_replace`` positions of ``ids_S`` for a
    token drawn uniformly from that position's top-k (most negative gradient, allowed only).

    Positions are a random subset per candidate (nanoGCG) or, with ``spread``, evenly spread
    ``floor(i * S / spread_width)`` (HarmBench; further swaps offset by S / n_replace)."""
    s = ids_S.shape[0]
    k_pos, k_val = jax.random.split(key)
    score = jnp.where(allowed_V[None, :], -grad_SxV, -jnp.inf)
    _, top_SxK = jax.lax.top_k(score, topk)
    if spread:
        base = jnp.arange(width) * s // (spread_width or width)
        pos_WxR = (base[:, None] + jnp.arange(n_replace)[None, :] * s // n_replace) % s
    else:
        pos_WxR = jnp.argsort(jax.random.uniform(k_pos, (width, s)), axis=-1)[:, :n_replace]
    pick_WxR = jax.random.randint(k_val, (width, n_replace), 0, topk)
    val_WxR = top_SxK[pos_WxR, pick_WxR]
    cand = jnp.broadcast_to(ids_S, (width, s))
    return cand.at[jnp.arange(width)[:, None], pos_WxR].set(val_WxR.astype(ids_S.dtype))


def candidate_losses(
    graphdef: nnx.GraphDef,
    params: Sequence[nnx.State],
    cache: Cache,
    cand_WxS: jax.Array,
    layout: Layout,
    *,
    chunk: int,
    use_mellowmax: bool = False,
    alpha: float = 1.0,
    data_axes: tuple[str, ...] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(loss [W], early-stop flag [W]) for W candidates, ``chunk`` per forward (W % chunk == 0).

    With ``data_axes`` (inside ``jax.set_mesh``) each chunk is sharded over those mesh axes."""
    model = _merge(graphdef, params)
    w, s = cand_WxS.shape
    if w % chunk:
        raise ValueError(f"candidate count {w} is not a multiple of the chunk size {chunk}")
    chunks = cand_WxS.reshape(w // chunk, chunk, s)
    if data_axes:
        chunks = jax.lax.with_sharding_constraint(chunks, PartitionSpec(None, data_axes, None))

    def one(cand_CxS):
        emb = jnp.take(model.embedding_matrix, cand_CxS, axis=0)
        logits = rest_logits(model, cache, emb, layout)
        return target_loss(logits, layout, use_mellowmax=use_mellowmax, alpha=alpha)

    if chunks.shape[0] == 1:  # one chunk: no loop (cheaper to compile)
        loss, hit = jax.tree.map(lambda x: x[None], one(chunks[0]))
    else:
        loss, hit = jax.lax.map(one, chunks)
    return loss.reshape(w), hit.reshape(w)


def bucket_plan(
    width: int, s: int, n_replace: int, n_buckets: int, chunk: int, granule: int = 1
) -> tuple[tuple[int, ...], tuple[tuple[int, int, int, int], ...]]:
    """Static plan for evaluating "spread" candidates in position buckets (suffix-prefix reuse).

    Spread positions do not depend on the PRNG key, so each candidate's first swapped position is
    known at trace time. Candidates are stably sorted by it and split into ``n_buckets`` groups
    (boundaries on multiples of ``granule``); a group whose first swapped position is ``p`` shares
    ``suffix[:p]`` with the current suffix, so only ``rest[p:]`` is recomputed. Returns
    (order, buckets) with buckets = ((p, offset, count, chunk), ...) over the sorted order."""
    base = np.arange(width) * s // width
    pos = (base[:, None] + np.arange(n_replace)[None, :] * s // n_replace) % s
    first = pos.min(axis=1)
    order = np.argsort(first, kind="stable")
    n_buckets = max(1, min(n_buckets, width // max(granule, 1)))
    bounds = sorted({min(width, -(-width * k // n_buckets // granule) * granule)
                     for k in range(n_buckets + 1)} | {0, width})  # fmt: skip
    buckets = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        if hi <= lo:
            continue
        n = hi - lo
        c = min(chunk, -(-n // granule) * granule)
        buckets.append((int(first[order[lo]]), lo, n, c))
    return tuple(int(i) for i in order), tuple(buckets)


def _extend_cache(model, cache: Cache, ids_S: jax.Array, layout: Layout, p_max: int) -> Cache:
    """The batch-1 prefix cache extended with the current suffix's first ``p_max`` tokens."""
    if p_max <= 0:
        return cache
    r = layout.rest_ids_R.shape[0]
    start = cache["mask"].shape[-1] - r
    emb = jnp.take(model.embedding_matrix, ids_S[None, :p_max], axis=0)
    _, cache = model.forward(
        emb, layout.rest_mask_R[None, :p_max], cache=cache, cache_index=start,
        return_hidden=True, logits_at_BxT=jnp.zeros((1, 1), jnp.int32),
    )  # fmt: skip
    return cache


def _tail_losses(model, cache: Cache, layout: Layout, p: int, tail_CxT: jax.Array, mm: dict):
    """Losses of candidates that equal the current suffix before ``p``: only ``rest[p:]`` runs,
    after the extended cache's first p suffix slots (later slots masked out)."""
    r = layout.rest_ids_R.shape[0]
    start = cache["mask"].shape[-1] - r
    slot = jnp.arange(cache["mask"].shape[-1])
    sub = Layout(
        layout.rest_ids_R[p:], layout.rest_mask_R[p:], layout.target_at_T - p,
        layout.target_ids_T, layout.target_w_T,
    )  # fmt: skip
    sub_cache = {**cache, "mask": cache["mask"] & (slot < start + p)[None]}
    emb = jnp.take(model.embedding_matrix, tail_CxT, axis=0)
    logits = rest_logits(model, sub_cache, emb, sub)
    return target_loss(logits, sub, **mm)


def bucketed_candidate_losses(
    graphdef: nnx.GraphDef,
    params: Sequence[nnx.State],
    cache: Cache,
    ids_S: jax.Array,
    cand_WxS: jax.Array,
    layout: Layout,
    *,
    order: tuple[int, ...],
    buckets: tuple[tuple[int, int, int, int], ...],
    use_mellowmax: bool = False,
    alpha: float = 1.0,
    data_axes: tuple[str, ...] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``candidate_losses`` for the first ``len(order)`` candidates, reusing the current suffix's
    prefix: the batch-1 cache is extended once with ``ids_S[:max p]``; bucket (p, ...) then runs
    only ``rest[p:]`` after the first p suffix tokens (cache slots beyond them masked out).
    Every candidate of a bucket must equal ``ids_S`` before p (``bucket_plan`` guarantees it)."""
    model = _merge(graphdef, params)
    mm = dict(use_mellowmax=use_mellowmax, alpha=alpha)
    s = ids_S.shape[0]
    cache = _extend_cache(model, cache, ids_S, layout, max(b[0] for b in buckets))
    order_arr = jnp.asarray(order, jnp.int32)
    sorted_cand = cand_WxS[order_arr]
    losses, hits = [], []
    for p, off, n, c in buckets:
        n_chunks = -(-n // c)
        idx = jnp.minimum(off + jnp.arange(n_chunks * c), off + n - 1)
        chunks = sorted_cand[idx, p:].reshape(n_chunks, c, s - p)
        if data_axes:
            chunks = jax.lax.with_sharding_constraint(chunks, PartitionSpec(None, data_axes, None))
        one = functools.partial(_tail_losses, model, cache, layout, p, mm=mm)
        if n_chunks == 1:
            loss, hit = one(chunks[0])
        else:
            loss, hit = jax.tree.map(lambda x: x.reshape(-1), jax.lax.map(one, chunks))
        losses.append(loss[:n])
        hits.append(hit[:n])
    loss_sorted = jnp.concatenate(losses)
    hit_sorted = jnp.concatenate(hits)
    w = len(order)
    return (
        jnp.zeros((w,), loss_sorted.dtype).at[order_arr].set(loss_sorted),
        jnp.zeros((w,), bool).at[order_arr].set(hit_sorted),
    )


def reuse_levels(s: int, n_levels: int) -> tuple[int, ...]:
    """Static suffix-prefix lengths a sorted chunk may reuse: ``floor(i * s / n_levels)``."""
    n_levels = max(1, min(n_levels, s))
    return tuple(sorted({i * s // n_levels for i in range(n_levels)}))


def sorted_candidate_losses(
    graphdef: nnx.GraphDef,
    params: Sequence[nnx.State],
    cache: Cache,
    ids_S: jax.Array,
    cand_WxS: jax.Array,
    layout: Layout,
    *,
    chunk: int,
    levels: tuple[int, ...],
    use_mellowmax: bool = False,
    alpha: float = 1.0,
    data_axes: tuple[str, ...] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``candidate_losses`` with suffix-prefix reuse for candidates whose swapped positions are
    only known at run time (nanoGCG's random positions).

    Each candidate equals ``ids_S`` before its first differing position f. Candidates are sorted
    by f (on device) and cut into chunks; a chunk whose smallest f is at least ``levels[i]``
    (the largest such level) runs only ``rest[levels[i]:]`` after the extended prefix cache —
    ``lax.switch`` over one compiled branch per level, so shapes stay static. Losses come back in
    the original candidate order; equal to ``candidate_losses`` up to float rounding."""
    model = _merge(graphdef, params)
    mm = dict(use_mellowmax=use_mellowmax, alpha=alpha)
    w, s = cand_WxS.shape
    if w % chunk:
        raise ValueError(f"candidate count {w} is not a multiple of the chunk size {chunk}")
    if not levels or levels[0] != 0 or list(levels) != sorted(set(levels)) or levels[-1] >= s:
        raise ValueError(f"reuse levels {levels} must start at 0, increase, and stay below {s}")
    differs_WxS = cand_WxS != ids_S[None]
    first_W = jnp.where(jnp.any(differs_WxS, axis=1), jnp.argmax(differs_WxS, axis=1), s)
    order_W = jnp.argsort(first_W, stable=True)
    chunks = cand_WxS[order_W].reshape(w // chunk, chunk, s)
    if data_axes:
        chunks = jax.lax.with_sharding_constraint(chunks, PartitionSpec(None, data_axes, None))
    chunk_first = first_W[order_W].reshape(w // chunk, chunk)[:, 0]  # sorted: the chunk minimum
    level_idx = jnp.sum(chunk_first[:, None] >= jnp.asarray(levels)[None, :], axis=1) - 1
    cache = _extend_cache(model, cache, ids_S, layout, levels[-1])
    branches = [lambda c, p=p: _tail_losses(model, cache, layout, p, c[:, p:], mm) for p in levels]

    def one(xs):
        cand_CxS, i = xs
        return jax.lax.switch(i, branches, cand_CxS)

    loss_s, hit_s = jax.tree.map(lambda x: x.reshape(w), jax.lax.map(one, (chunks, level_idx)))
    return (
        jnp.zeros((w,), loss_s.dtype).at[order_W].set(loss_s),
        jnp.zeros((w,), bool).at[order_W].set(hit_s),
    )


def _all_losses(graphdef, params, cache, ids_S, cand, layout, spec: StepSpec, mm: dict):
    """(loss, hit) [padded width] of every candidate under ``graphdef``/``params`` with the
    spec's evaluation path (bucketed / sorted suffix-prefix reuse, or plain chunks)."""
    if spec.buckets is not None and spec.spread:
        loss_w, hit_w = bucketed_candidate_losses(
            graphdef, params, cache, ids_S, cand, layout, order=spec.order,
            buckets=spec.buckets, data_axes=spec.data_axes, **mm,
        )  # fmt: skip
        pad = spec.padded_width - spec.width  # padding rows are masked below; never evaluated
        loss = jnp.concatenate([loss_w, jnp.full((pad,), jnp.inf, loss_w.dtype)])
        hit = jnp.concatenate([hit_w, jnp.zeros((pad,), bool)])
        return loss, hit
    if spec.levels is not None:  # set only for random positions (``gcg_driver.step_spec``)
        return sorted_candidate_losses(
            graphdef, params, cache, ids_S, cand, layout, chunk=spec.chunk, levels=spec.levels,
            data_axes=spec.data_axes, **mm,
        )  # fmt: skip
    return candidate_losses(
        graphdef, params, cache, cand, layout, chunk=spec.chunk, data_axes=spec.data_axes, **mm
    )


def probe_candidate_losses(
    graphdef: nnx.GraphDef,
    params: Sequence[nnx.State],
    cache: Cache,
    draft: tuple,
    ids_S: jax.Array,
    cand_WxS: jax.Array,
    invalid_W: jax.Array,
    layout: Layout,
    key: jax.Array,
    *,
    spec: StepSpec,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Probe sampling (``gcg_probe``; nanoGCG 0.3.0): (loss [W], hit [W], rho, f). The draft
    (``(graphdef, params, cache)``, same token layout) scores all W candidates; the target scores
    a random probe set of ``spec.probe_size`` real candidates and the draft's f best valid ones
    (f from the Spearman agreement on the probe set); unscored candidates get +inf.
    ``invalid_W`` (duplicates, padding) never enters the filtered set."""
    mm = dict(use_mellowmax=spec.use_mellowmax, alpha=spec.mellowmax_alpha)
    d_graphdef, d_params, d_cache = draft
    w = spec.padded_width
    d_loss, _ = _all_losses(d_graphdef, d_params, d_cache, ids_S, cand_WxS, layout, spec, mm)
    n_p, n_pad = spec.probe_size, max(spec.probe_pad, spec.probe_size)
    perm = jax.random.permutation(jax.random.fold_in(key, 0x9E0B), spec.width)
    probe_idx = jnp.concatenate([perm[:n_p], jnp.full((n_pad - n_p,), perm[0])])

    def target(idx):
        return candidate_losses(
            graphdef, params, cache, cand_WxS[idx], layout, chunk=idx.shape[0],
            data_axes=spec.data_axes, **mm,
        )  # fmt: skip

    p_loss, p_hit = target(probe_idx)
    rho = spearman(p_loss[:n_p], d_loss[probe_idx[:n_p]])
    f = filtered_size(rho, spec.width, spec.probe_r)
    f_max = spec.filter_sizes[-1]
    _, filt_idx = jax.lax.top_k(-jnp.where(invalid_W, jnp.inf, d_loss), f_max)
    if len(spec.filter_sizes) == 1:  # mask over the largest set
        f_loss, f_hit = target(filt_idx)
    else:  # the smallest compiled size that holds f (padded to f_max with +inf)

        def branch(n):
            def run(idx):
                loss, hit = target(idx[:n])
                pad = f_max - n
                return (jnp.concatenate([loss, jnp.full((pad,), jnp.inf, loss.dtype)]),
                        jnp.concatenate([hit, jnp.zeros((pad,), bool)]))  # fmt: skip

            return run

        sizes = jnp.asarray(spec.filter_sizes)
        which = jnp.sum(sizes < f)
        f_loss, f_hit = jax.lax.switch(which, [branch(n) for n in spec.filter_sizes], filt_idx)
    keep = jnp.arange(f_max) < f
    loss = jnp.full((w,), jnp.inf, p_loss.dtype).at[probe_idx].min(p_loss)
    loss = loss.at[filt_idx].min(jnp.where(keep, f_loss, jnp.inf))
    hit = jnp.zeros((w,), bool).at[probe_idx].max(p_hit).at[filt_idx].max(keep & f_hit)
    return loss, hit, rho, f


def gcg_step(
    graphdef: nnx.GraphDef,
    params: Sequence[nnx.State],
    cache: Cache,
    ids_S: jax.Array,
    layout: Layout,
    allowed_V: jax.Array,
    key: jax.Array,
    *,
    spec: StepSpec,
    draft: tuple | None = None,
) -> dict[str, jax.Array]:
    """One GCG step for one behaviour: gradient, sampling, candidate losses, duplicate masking,
    top-M. Returns cur_loss (loss at ``ids_S``), top_ids [M, S], top_loss [M] (+inf = invalid),
    top_hit [M] (all target tokens argmax-correct). With ``spec.probe_size`` the losses come from
    probe sampling with ``draft`` = (graphdef, params, cache) of the draft model, and the output
    adds probe_rho (the Spearman agreement) and probe_filtered (f)."""
    mm = dict(use_mellowmax=spec.use_mellowmax, alpha=spec.mellowmax_alpha)
    cur_loss, grad = token_gradients(graphdef, params, cache, ids_S, layout, **mm)
    cand = sample_candidates(
        key, ids_S, grad, allowed_V, width=spec.padded_width, topk=spec.topk,
        n_replace=spec.n_replace, spread=spec.spread, spread_width=spec.width,
    )  # fmt: skip
    idx = jnp.arange(spec.padded_width)
    same = jnp.all(cand[:, None, :] == cand[None, :, :], axis=-1)
    dup = jnp.any(same & (idx[None, :] < idx[:, None]), axis=-1)
    dup |= jnp.all(cand == ids_S[None], axis=-1)
    invalid = dup | (idx >= spec.width)
    extra = {}
    if spec.probe_size:
        if draft is None:
            raise ValueError("StepSpec.probe_size is set but no draft model was given")
        loss, hit, rho, f = probe_candidate_losses(
            graphdef, params, cache, draft, ids_S, cand, invalid, layout, key, spec=spec
        )
        extra = {"probe_rho": rho, "probe_filtered": f}
    else:
        loss, hit = _all_losses(graphdef, params, cache, ids_S, cand, layout, spec, mm)
    loss = jnp.where(invalid | ~jnp.isfinite(loss), jnp.inf, loss)
    _, top = jax.lax.top_k(-loss, spec.top_m)
    return {"cur_loss": cur_loss, "top_ids": cand[top], "top_loss": loss[top], "top_hit": hit[top],
            **extra}  # fmt: skip


@functools.partial(jax.jit, static_argnames=("graphdef", "spec", "draft_graphdef"))
def batched_gcg_step(
    params, caches, ids_BxS, layouts, allowed_V, root_keys, step, draft_params=None,
    draft_caches=None, *, graphdef, spec, draft_graphdef=None,
) -> dict[str, jax.Array]:  # fmt: skip
    """``gcg_step`` for B behaviours (jitted): stacked batch-1 caches, suffixes [B, S], layouts
    and root keys (the step key is ``fold_in(root, step)``); outputs gain a leading B axis.
    One behaviour runs unvmapped, so run-time reuse levels (and probe sampling's compiled
    filtered-set sizes) stay one ``lax.switch`` branch. Probe sampling: the draft's params and
    its stacked batch-1 prefix caches (same token layout as the target's)."""

    def one(cache, ids, layout, root, d_cache):
        key = jax.random.fold_in(root, step)
        draft = None if draft_graphdef is None else (draft_graphdef, draft_params, d_cache)
        return gcg_step(
            graphdef, params, cache, ids, layout, allowed_V, key, spec=spec, draft=draft
        )

    if ids_BxS.shape[0] == 1:  # one behaviour: no vmap, so run-time reuse levels stay a branch
        squeeze = functools.partial(jax.tree.map, lambda x: x[0])
        d_cache = None if draft_caches is None else squeeze(draft_caches)
        out = one(squeeze(caches), ids_BxS[0], squeeze(layouts), root_keys[0], d_cache)
        return jax.tree.map(lambda x: x[None], out)
    if spec.levels is not None or len(spec.filter_sizes) > 1:
        raise ValueError(
            "StepSpec.levels and several probe filter sizes need one behaviour per step (see "
            "sorted_candidate_losses, probe_candidate_losses)"
        )
    return jax.vmap(one)(caches, ids_BxS, layouts, root_keys, draft_caches)


@functools.partial(jax.jit, static_argnames=("graphdef", "rest_len"))
def batched_prefix_cache(params, prefix_ids_BxP, prefix_mask_BxP, *, graphdef, rest_len) -> Cache:
    """``prefix_cache`` (jitted) of B left-padded prefixes with room for ``rest_len`` more."""
    return prefix_cache(graphdef, params, prefix_ids_BxP, prefix_mask_BxP, rest_len)


@functools.partial(jax.jit, static_argnames=("graphdef", "spec"))
def batched_candidate_losses(
    params, caches, cand_BxWxS, layouts, *, graphdef, spec
) -> tuple[jax.Array, jax.Array]:
    """(loss [B, W], early-stop flag [B, W]): ``candidate_losses`` of W given suffixes per
    behaviour in one chunk (jitted, vmapped over behaviours; the loss settings of ``spec``)."""

    def one(cache, cand, layout):
        return candidate_losses(
            graphdef, params, cache, cand, layout, chunk=cand.shape[0],
            use_mellowmax=spec.use_mellowmax, alpha=spec.mellowmax_alpha,
        )  # fmt: skip

    return jax.vmap(one)(caches, cand_BxWxS, layouts)


# ------------------------------------------------------------------------------ compile cache

_EXECUTABLES: dict = {}


def _signature(x):
    if isinstance(x, jax.Array):
        return (x.shape, x.dtype, x.sharding)
    return (np.shape(x), np.asarray(x).dtype, None)


def compile_cached(fn, args: tuple, static: dict) -> tuple[Callable, float]:
    """AOT-compiled ``fn`` (a jitted function of this module) for these argument
    shapes/dtypes/shardings and static arguments, cached per process; and the compile seconds
    (0.0 when the executable was cached)."""
    leaves, tree = jax.tree.flatten(args)
    key = (fn, tree, tuple(_signature(x) for x in leaves), tuple(sorted(static.items())))
    if key in _EXECUTABLES:
        return _EXECUTABLES[key], 0.0
    t0 = time.perf_counter()
    exe = fn.lower(*args, **static).compile()
    _EXECUTABLES[key] = exe
    return exe, time.perf_counter() - t0
