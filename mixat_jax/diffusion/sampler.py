"""The masked-diffusion denoising sampler as ONE compiled `lax.scan` (DAT spec §5.3, §5.4, §5.1, §5.2).

`sample(graphdef, state, canvas_BxL, attn_mask_BxL, editable_BxL, key, *, cfg)` fills every
[MASK] of the editable span; `denoise(logits_fn, ...)` is the same loop over any `LogitsFn` (the
oracle models of the tests). Carry = (canvas, key, per-position path log-prob); scanned over the
`steps` steps.

Only the positions to fill (the editable [MASK]s, "fill" below) can ever be revealed, so the model
reads the whole [B, L] canvas but the LM head and everything vocabulary-sized after it (CFG
combination, suppression, Gumbel noise, softmax, confidence, log-probs) run on [B, T, V] at
`positions_BxT`: each row's fill positions in ascending order, padded (validity mask `valid_BxT`)
to the static width T = `fill_width` (DESIGN.md rule 4; at LLaDA-8B a [256, 96, 126464] fp32
array is 12 GB). `sample` takes T from the data on the host (the largest fill count of a row;
inpainting passes P); `denoise` defaults to T = L. Ranks and reveals work on [B, T] and are
gathered back into the canvas, with the results of the full-canvas computation: the Gumbel noise
of a position is the noise `jax.random.gumbel(key, (B, L, V))` has there (computed from the
threefry counters of those entries only), other random draws keep their [B, L] shapes, and the
stable rank order of the fill positions is the same in both layouts. (Up to fp32 rounding: XLA
may round a norm or softmax reduction differently for another array shape, so two candidates
whose confidences tie to the last bit can be revealed in the other order.) Per step:

1. block `blk = s // spb` (spb = steps / num_blocks; the editable span of each row is cut into
   `num_blocks` near-equal consecutive blocks) and its reveal count from the schedule:
   `k = n_mask // spb + (s_loc < n_mask % spb)` per row and block (LLaDA, §5.1);
2. AAPL global remasking (§5.4, off by default): every `global_remask_every` steps, a row that
   has 0 tokens to reveal re-masks up to `global_remask_count` random tokens it revealed in the
   current block and re-reveals them at this step (k grows by that number);
3. AAPL conditioning dropout (§5.4, off by default): r ~ U{1..L} random canvas positions are
   drawn per row, and the known conditioning tokens among them are [MASK]ed in the model input
   only;
4. logits of the input at the fill positions (Dream's shift realigned, §5.2: position p reads the
   raw logits at p − 1; the first canvas position is never a [MASK] to fill); with CFG
   (w = `cfg_scale` ≠ 0) one batched call also scores the input with the conditioning
   (non-editable known tokens) → [MASK] and
   combines `uncond + (w + 1)(cond − uncond)` (LLaDA's unsupervised CFG; both passes see the full
   canvas, only their outputs are gathered); `suppress_ids` and the [MASK] id itself get −inf;
5. x0 = argmax(logits) at T = 0, else argmax(logits / T + Gumbel) with the noise in fp32 (or
   fp64 with `jax_enable_x64`, as LLaDA; arXiv 2409.02908);
6. confidence (low_confidence: p(x0); random: U(0, 1); entropy: −H(p); margin: p1 − p2), −inf
   outside the still-masked editable positions of the current block; the k highest by rank
   comparison (static shapes) are revealed. `origin` (Dream) instead reveals each eligible
   position with probability 1 − t_{s+1}/t_s on the grid linspace(1, 1e-3, spb + 1) of the block,
   and all of them at the block's last step;
7. revealed positions take x0 and their log_softmax(logits)[x0] (≤ 0); the path log-likelihood
   is the sum over the final tokens' entries (a re-masked token's entry is replaced).

Returns `SampleOutput(canvas_BxL, logp_B, revealed_SxB)`. `sample` is jitted once per shape and
config (`sample_jitted`), follows its inputs' shardings (a batch sharded over the data axes gives
the single-device result) and validates its inputs on the host with one-line ValueErrors.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend.random import threefry2x32_p

from mixat_jax.diffusion.denoiser import (
    LogitsFn,
    align_logits,
    decoder_logits_fn,
    gather_positions,
    source_positions,
)
from mixat_jax.diffusion.ranks import random_ranks, top_k_mask

REMASKING_MODES = ("low_confidence", "random", "entropy", "margin", "origin")
GUMBEL_DTYPES = ("float32", "float64")
ORIGIN_EPS = 1e-3  # Dream's time grid linspace(1, eps, steps + 1)


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Static sampler settings (hashable: a static jit argument)."""

    mask_token_id: int
    steps: int = 32
    num_blocks: int = 1  # semi-autoregressive blocks over the editable span
    temperature: float = 0.0
    gumbel_dtype: str = "float32"  # "float64" needs jax_enable_x64
    remasking: str = "low_confidence"  # low_confidence | random | entropy | margin | origin
    cfg_scale: float = 0.0  # LLaDA unsupervised CFG: uncond = conditioning -> [MASK]
    suppress_ids: tuple[int, ...] = ()
    cond_dropout: bool = False  # AAPL conditioning dropout over the known tokens (spec §5.4)
    global_remask_every: int = 0  # AAPL global remasking (fires only when a row has 0 to reveal)
    global_remask_count: int = 8
    shift_logits: bool = False  # Dream: logits at i predict token i + 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "suppress_ids", tuple(int(i) for i in self.suppress_ids))
        if self.steps < 1 or self.num_blocks < 1:
            raise ValueError(
                f"steps={self.steps} and num_blocks={self.num_blocks} must both be >= 1"
            )
        if self.steps % self.num_blocks:
            raise ValueError(
                f"steps={self.steps} is not divisible by num_blocks={self.num_blocks}; "
                "every block needs the same number of steps"
            )
        if self.remasking not in REMASKING_MODES:
            raise ValueError(
                f"unknown remasking mode {self.remasking!r}; use one of {'|'.join(REMASKING_MODES)}"
            )
        if self.gumbel_dtype not in GUMBEL_DTYPES:
            raise ValueError(f"gumbel_dtype {self.gumbel_dtype!r} unknown; use float32|float64")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0; got {self.temperature}")
        if self.global_remask_every < 0 or self.global_remask_count < 1:
            raise ValueError(
                f"need global_remask_every >= 0 and global_remask_count >= 1; got "
                f"{self.global_remask_every}, {self.global_remask_count}"
            )

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    def replace(self, **kw: Any) -> SamplerConfig:
        return dataclasses.replace(self, **kw)

    @classmethod
    def for_model(cls, model_cfg, **overrides: Any) -> SamplerConfig:
        """Mask id and logit shift taken from a `ModelConfig` (LLaDA / Dream checkpoints)."""
        if model_cfg.mask_token_id is None and "mask_token_id" not in overrides:
            raise ValueError(
                "the model config has no mask_token_id (not a masked-diffusion LM); pass one"
            )
        base = {"mask_token_id": model_cfg.mask_token_id, "shift_logits": model_cfg.shift_logits}
        return cls(**{**base, **overrides})


class SampleOutput(NamedTuple):
    canvas_BxL: jax.Array  # int32, every editable [MASK] filled
    logp_B: jax.Array  # fp32 path log-likelihood of the revealed tokens (<= 0)
    revealed_SxB: jax.Array  # int32 number of tokens written per step and row


# ----------------------------------------------------------------------------- schedule
def block_ids(editable_BxL: jax.Array, num_blocks: int) -> jax.Array:
    """Block index of each editable position (its span cut into near-equal consecutive blocks),
    −1 elsewhere. Equal blocks of span/num_blocks when the span length divides."""
    order_BxL = jnp.cumsum(editable_BxL, axis=-1) - 1
    span_B = jnp.maximum(editable_BxL.sum(-1), 1)
    return jnp.where(editable_BxL, (order_BxL * num_blocks) // span_B[:, None], -1)


def reveal_schedule(fill_BxL: jax.Array, block_BxL: jax.Array, cfg: SamplerConfig) -> jax.Array:
    """Tokens to reveal per step and row, [S, B] (LLaDA: n // spb, first n % spb steps one more)."""
    spb = cfg.steps_per_block
    in_block_BxLxK = block_BxL[..., None] == jnp.arange(cfg.num_blocks)
    n_BxK = (fill_BxL[..., None] & in_block_BxLxK).sum(1)
    s_S = jnp.arange(cfg.steps)
    blk_S, s_loc_S = s_S // spb, s_S % spb
    n_SxB = n_BxK[:, blk_S].T
    return (n_SxB // spb + (s_loc_S[:, None] < n_SxB % spb)).astype(jnp.int32)


# ----------------------------------------------------------------------------- fill positions
def fill_positions(fill_BxL: jax.Array, width: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(positions_BxT, valid_BxT, slot_BxL) for T = `width`: each row's fill positions ascending
    (padded with its other positions, valid = False there), and the slot of each fill position
    (its index in positions_BxT; values at fill positions of slot >= T are never written)."""
    order_BxL = jnp.argsort(~fill_BxL, axis=-1, stable=True)  # fill positions first, ascending
    positions_BxT = order_BxL[:, :width].astype(jnp.int32)
    valid_BxT = jnp.arange(width) < fill_BxL.sum(-1, keepdims=True)
    slot_BxL = jnp.cumsum(fill_BxL, axis=-1, dtype=jnp.int32) - 1
    return positions_BxT, valid_BxT, slot_BxL


def scatter_back(values_BxT: jax.Array, slot_BxL: jax.Array) -> jax.Array:
    """The [B, T] values at their canvas positions ([B, L]; only the fill positions are
    meaningful): a gather through the slots, no scatter."""
    return jnp.take_along_axis(values_BxT, jnp.clip(slot_BxL, 0, values_BxT.shape[1] - 1), axis=1)


# ----------------------------------------------------------------------------- Gumbel at positions
def mul_add_u32(x: jax.Array, c: int, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The (high, low) uint32 words of x · c + y (x, y uint32, 0 <= c < 2**32), with no 64-bit ints
    (the 64-bit flat index of an entry without jax_enable_x64)."""
    u32 = jnp.uint32
    x, y = x.astype(u32), y.astype(u32)
    cl, ch = np.uint32(c & 0xFFFF), np.uint32(c >> 16)
    xl, xh = x & np.uint32(0xFFFF), x >> np.uint32(16)
    ll, lh, hl, hh = xl * cl, xl * ch, xh * cl, xh * ch
    mid = lh + hl
    mid_carry = (mid < lh).astype(u32)
    lo = ll + (mid << np.uint32(16))
    hi = hh + (mid >> np.uint32(16)) + (mid_carry << np.uint32(16)) + (lo < ll).astype(u32)
    lo_y = lo + y
    return hi + (lo_y < lo).astype(u32), lo_y


def _typed_key(key: jax.Array) -> jax.Array:
    return key if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)


def counter_gumbel_exact(key: jax.Array) -> bool:
    """Whether `gumbel_at` can compute only the entries it needs (threefry keys, partitionable
    counters, low-range Gumbel: each entry of `jax.random.gumbel` is a function of its index)."""
    return (
        str(jax.random.key_impl(_typed_key(key))) == "threefry2x32"
        and bool(jax.config.jax_threefry_partitionable)
        and not jax.config.jax_high_dynamic_range_gumbel
    )


def gumbel_at(
    key: jax.Array, length: int, vocab: int, positions_BxT: jax.Array, dtype: Any
) -> jax.Array:
    """`jax.random.gumbel(key, (B, length, vocab), dtype)` gathered at `positions_BxT` ([B, T, V]),
    without the [B, L, V] draw: the threefry bits of exactly those entries, turned into uniforms
    and Gumbels by jax.random's own recipe (checked bit for bit in the tests). Falls back to the
    full draw and a gather for other PRNG settings."""
    key = _typed_key(key)
    dt = jnp.dtype(dtype)
    b = positions_BxT.shape[0]
    if not counter_gumbel_exact(key):
        full = jax.random.gumbel(key, (b, length, vocab), dt)
        return jnp.take_along_axis(full, positions_BxT[..., None], axis=1)
    if b * length >= 2**32:
        raise ValueError(f"gumbel_at: B·L = {b * length} needs more than 32 bits")
    row_BxT = jnp.arange(b, dtype=jnp.uint32)[:, None] * np.uint32(length)
    row_BxT = row_BxT + positions_BxT.astype(jnp.uint32)
    shape = (*positions_BxT.shape, vocab)
    v_BxTxV = jnp.broadcast_to(jnp.arange(vocab, dtype=jnp.uint32), shape)
    hi, lo = mul_add_u32(jnp.broadcast_to(row_BxT[..., None], shape), vocab, v_BxTxV)
    k1, k2 = jax.random.key_data(key)
    bits1, bits2 = threefry2x32_p.bind(k1, k2, hi, lo)
    finfo = jnp.finfo(dt)
    if finfo.bits == 64:
        uint = jnp.uint64
        bits = (bits1.astype(uint) << np.uint64(32)) | bits2.astype(uint)
    elif finfo.bits == 32:
        uint = jnp.uint32
        bits = bits1 ^ bits2
    else:
        raise ValueError(f"gumbel_at supports float32 and float64, not {dt}")
    # jax.random.uniform(minval=tiny, maxval=1): random mantissa with exponent 0, shifted, scaled
    float_bits = jax.lax.shift_right_logical(bits, jnp.asarray(finfo.bits - finfo.nmant, uint))
    float_bits = float_bits | jnp.asarray(np.array(1.0, dt).view(uint), uint)
    floats = jax.lax.bitcast_convert_type(float_bits, dt) - jnp.asarray(1.0, dt)
    lo_v, hi_v = jnp.asarray(finfo.tiny, dt), jnp.asarray(1.0, dt)
    u = jax.lax.max(lo_v, floats * (hi_v - lo_v) + lo_v)
    return -jnp.log(-jnp.log(u))


# ----------------------------------------------------------------------------- one step's parts
def guided_logits(
    logits_fn: LogitsFn,
    x_in_BxL: jax.Array,
    attn_BxL: jax.Array,
    cond_BxL: jax.Array,
    cfg: SamplerConfig,
    positions_BxT: jax.Array | None = None,
) -> jax.Array:
    """Aligned fp32 logits (CFG-combined when cfg_scale ≠ 0), suppressed ids and [MASK] at −inf:
    [B, T, V] at `positions_BxT` (the model reads the whole canvas, the LM head only there), or
    [B, L, V] over the whole canvas when it is None (`logits_fn` called with two arguments)."""
    b = x_in_BxL.shape[0]

    def aligned(x_BxL, a_BxL, pos_BxT):
        if pos_BxT is None:
            return align_logits(logits_fn(x_BxL, a_BxL).astype(jnp.float32), cfg.shift_logits)
        src_BxT = source_positions(pos_BxT, cfg.shift_logits)
        return logits_fn(x_BxL, a_BxL, src_BxT).astype(jnp.float32)

    if cfg.cfg_scale != 0.0:
        uncond_BxL = jnp.where(cond_BxL, cfg.mask_token_id, x_in_BxL)
        pos2 = None if positions_BxT is None else jnp.concatenate([positions_BxT, positions_BxT])
        both = aligned(
            jnp.concatenate([x_in_BxL, uncond_BxL]), jnp.concatenate([attn_BxL, attn_BxL]), pos2
        )
        logits_BxTxV = combine_cfg(both[:b], both[b:], cfg.cfg_scale)
    else:
        logits_BxTxV = aligned(x_in_BxL, attn_BxL, positions_BxT)
    banned = jnp.asarray(sorted({*cfg.suppress_ids, cfg.mask_token_id}), jnp.int32)
    return logits_BxTxV.at[..., banned].set(-jnp.inf)


def combine_cfg(cond_BxLxV: jax.Array, uncond_BxLxV: jax.Array, w: float) -> jax.Array:
    """LLaDA's unsupervised classifier-free guidance: uncond + (w + 1)(cond − uncond)."""
    return uncond_BxLxV + (w + 1.0) * (cond_BxLxV - uncond_BxLxV)


def draw_tokens(
    logits_BxTxV: jax.Array,
    key: jax.Array,
    cfg: SamplerConfig,
    positions_BxT: jax.Array | None = None,
    length: int | None = None,
) -> jax.Array:
    """argmax at T = 0, else the Gumbel-max sample of softmax(logits / T) (fp32 or fp64 noise).
    With `positions_BxT` the logits are the canvas's at those positions and the noise is that of
    a full [B, length, V] draw there (`gumbel_at`)."""
    if cfg.temperature == 0.0:
        return jnp.argmax(logits_BxTxV, axis=-1).astype(jnp.int32)
    dt = jnp.dtype(cfg.gumbel_dtype)
    if positions_BxT is None:
        g = jax.random.gumbel(key, logits_BxTxV.shape, dt)
    else:
        g = gumbel_at(key, length, logits_BxTxV.shape[-1], positions_BxT, dt)
    noisy = logits_BxTxV.astype(dt) / jnp.asarray(cfg.temperature, dt) + g
    return jnp.argmax(noisy, axis=-1).astype(jnp.int32)


def confidence(
    logp_BxTxV: jax.Array, logp0_BxT: jax.Array, mode: str, *, uniform_BxT: jax.Array | None = None
) -> jax.Array:
    """Per-position confidence of the candidate tokens (higher = revealed first), from the
    log-probabilities (`logp0` = those of the candidates x0); `random` returns `uniform_BxT`."""
    if mode == "random":
        return uniform_BxT
    if mode == "low_confidence":
        return jnp.exp(logp0_BxT)
    probs = jnp.exp(logp_BxTxV)
    if mode == "entropy":
        return jnp.sum(jnp.where(probs > 0, probs * logp_BxTxV, 0.0), axis=-1)
    if mode == "margin":
        top2 = jax.lax.top_k(probs, 2)[0]
        return top2[..., 0] - top2[..., 1]
    raise ValueError(f"no confidence for remasking mode {mode!r}")


# ----------------------------------------------------------------------------- the loop
def denoise(
    logits_fn: LogitsFn,
    canvas_BxL: jax.Array,
    attn_mask_BxL: jax.Array,
    editable_BxL: jax.Array,
    key: jax.Array,
    *,
    cfg: SamplerConfig,
    fill_width: int | None = None,
) -> SampleOutput:
    """The pure scanned sampler over any `LogitsFn` (jit it with `logits_fn`, `cfg` and
    `fill_width` static). `logits_fn` is called as `logits_fn(canvas, attn, positions_BxT)`;
    `fill_width` = T, at least the largest number of [MASK]s to fill in one row (default L; a row
    with more keeps its excess masks, which `sample` rules out on the host)."""
    mask_id = cfg.mask_token_id
    canvas_BxL = jnp.asarray(canvas_BxL, jnp.int32)
    attn_BxL = jnp.asarray(attn_mask_BxL).astype(bool)
    editable_BxL = jnp.asarray(editable_BxL).astype(bool) & attn_BxL
    b, l = canvas_BxL.shape
    width = l if fill_width is None else int(fill_width)
    if not 1 <= width <= l:
        raise ValueError(f"fill_width={fill_width} must be in [1, L = {l}]")
    spb = cfg.steps_per_block
    fill_BxL = editable_BxL & (canvas_BxL == mask_id)  # the positions this call fills
    block_BxL = block_ids(editable_BxL, cfg.num_blocks)
    k_SxB = reveal_schedule(fill_BxL, block_BxL, cfg)
    cond_BxL = attn_BxL & ~editable_BxL  # conditioning: CFG's unconditional pass masks it
    known_BxL = cond_BxL & (canvas_BxL != mask_id)  # what conditioning dropout may hide
    t_grid = jnp.linspace(1.0, ORIGIN_EPS, spb + 1)
    pos_BxT, valid_BxT, slot_BxL = fill_positions(fill_BxL, width)
    block_BxT = gather_positions(block_BxL, pos_BxT)
    writable_BxL = fill_BxL & (slot_BxL < width)

    def step(carry, xs):
        x_BxL, key, logp_BxL = carry
        s, k_B = xs
        key, key_remask, key_drop_r, key_drop, key_noise, key_conf = jax.random.split(key, 6)
        blk, s_loc = s // spb, s % spb
        if cfg.global_remask_every:
            fire_B = (k_B == 0) & (s > 0) & (s % cfg.global_remask_every == 0)
            done_BxL = fill_BxL & (block_BxL == blk) & (x_BxL != mask_id)
            remask_BxL = (
                (random_ranks(key_remask, done_BxL) < cfg.global_remask_count)
                & done_BxL
                & fire_B[:, None]
            )
            x_BxL = jnp.where(remask_BxL, mask_id, x_BxL)
            logp_BxL = jnp.where(remask_BxL, 0.0, logp_BxL)
            k_B = k_B + remask_BxL.sum(-1).astype(jnp.int32)
        x_in_BxL = x_BxL
        if cfg.cond_dropout:
            r_B = jnp.minimum(jnp.floor(jax.random.uniform(key_drop_r, (b,)) * l), l - 1) + 1
            everywhere = jnp.ones((b, l), bool)
            drop_BxL = (random_ranks(key_drop, everywhere) < r_B[:, None]) & known_BxL
            x_in_BxL = jnp.where(drop_BxL, mask_id, x_BxL)
        logits_BxTxV = guided_logits(logits_fn, x_in_BxL, attn_BxL, cond_BxL, cfg, pos_BxT)
        x0_BxT = draw_tokens(logits_BxTxV, key_noise, cfg, pos_BxT, l)
        logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
        logp0_BxT = jnp.take_along_axis(logp_BxTxV, x0_BxT[..., None], axis=-1)[..., 0]
        x_BxT = gather_positions(x_BxL, pos_BxT)
        eligible_BxT = valid_BxT & (block_BxT == blk) & (x_BxT == mask_id)
        if cfg.remasking == "origin":
            p_reveal = 1.0 - t_grid[s_loc + 1] / t_grid[s_loc]
            coin_BxT = gather_positions(jax.random.uniform(key_conf, (b, l)), pos_BxT) < p_reveal
            reveal_BxT = eligible_BxT & (coin_BxT | (s_loc == spb - 1))
        else:
            u_BxT = None
            if cfg.remasking == "random":  # the [B, L] draw, as over the whole canvas
                u_BxT = gather_positions(jax.random.uniform(key_conf, (b, l)), pos_BxT)
            conf_BxT = confidence(logp_BxTxV, logp0_BxT, cfg.remasking, uniform_BxT=u_BxT)
            conf_BxT = jnp.where(eligible_BxT, conf_BxT, -jnp.inf)
            reveal_BxT = top_k_mask(conf_BxT, k_B) & eligible_BxT
        reveal_BxL = writable_BxL & scatter_back(reveal_BxT, slot_BxL)
        x_BxL = jnp.where(reveal_BxL, scatter_back(x0_BxT, slot_BxL), x_BxL)
        logp_BxL = jnp.where(reveal_BxL, scatter_back(logp0_BxT, slot_BxL), logp_BxL)
        return (x_BxL, key, logp_BxL), reveal_BxT.sum(-1).astype(jnp.int32)

    carry = (canvas_BxL, key, jnp.zeros((b, l), jnp.float32))
    (x_BxL, _, logp_BxL), revealed_SxB = jax.lax.scan(step, carry, (jnp.arange(cfg.steps), k_SxB))
    return SampleOutput(
        jax.lax.stop_gradient(x_BxL), jax.lax.stop_gradient(logp_BxL.sum(-1)), revealed_SxB
    )


# ----------------------------------------------------------------------------- the model entry
@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "fill_width"))
def sample_jitted(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    canvas_BxL: jax.Array,
    attn_mask_BxL: jax.Array,
    editable_BxL: jax.Array,
    key: jax.Array,
    *,
    cfg: SamplerConfig,
    fill_width: int | None = None,
) -> SampleOutput:
    """`denoise` over the merged decoder (LM head at the T fill positions only), compiled once per
    (shapes, graphdef, cfg, fill_width)."""
    logits_fn = decoder_logits_fn(graphdef, state)
    return denoise(
        logits_fn, canvas_BxL, attn_mask_BxL, editable_BxL, key, cfg=cfg, fill_width=fill_width
    )


def check_inputs(
    cfg: SamplerConfig,
    canvas_BxL,
    attn_mask_BxL,
    editable_BxL,
    *,
    vocab_size: int | None = None,
    pad_id: int | None = None,
    model_mask_id: int | None = None,
    model_shift_logits: bool | None = None,
    fill_width: int | None = None,
) -> int | None:
    """Host-side validation; raises a one-line ValueError naming the problem. Returns the largest
    number of [MASK]s to fill in one row (the smallest valid `fill_width`), or None when the data
    are not local (traced, or spread over hosts)."""
    if cfg.gumbel_dtype == "float64" and not jax.config.jax_enable_x64:
        raise ValueError(
            "gumbel_dtype='float64' needs jax_enable_x64 (jax.config.update('jax_enable_x64', True) "
            "or JAX_ENABLE_X64=1); use gumbel_dtype='float32' otherwise"
        )
    m = cfg.mask_token_id
    if vocab_size is not None:
        if not 0 <= m < vocab_size:
            raise ValueError(f"mask_token_id={m} is outside the vocabulary [0, {vocab_size})")
        bad = [i for i in cfg.suppress_ids if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"suppress_ids {bad} are outside the vocabulary [0, {vocab_size})")
    if pad_id is not None and pad_id == m:
        raise ValueError(f"mask_token_id={m} equals the pad id; padding must differ from [MASK]")
    if model_mask_id is not None and model_mask_id != m:
        raise ValueError(
            f"SamplerConfig.mask_token_id={m} but the model's mask_token_id={model_mask_id}"
        )
    if model_shift_logits is not None and model_shift_logits != cfg.shift_logits:
        raise ValueError(
            f"SamplerConfig.shift_logits={cfg.shift_logits} but the model's shift_logits="
            f"{model_shift_logits}; build the config with SamplerConfig.for_model(model.cfg)"
        )
    length = np.shape(canvas_BxL)[-1]
    if fill_width is not None and not 1 <= fill_width <= length:
        raise ValueError(f"fill_width={fill_width} must be in [1, L = {length}]")
    arrays = (canvas_BxL, attn_mask_BxL, editable_BxL)
    if any(isinstance(a, jax.core.Tracer) for a in arrays) or not all(
        a.is_fully_addressable for a in arrays if isinstance(a, jax.Array)
    ):
        return None  # traced in a caller's jit, or spread over hosts: data checks need local values
    canvas, attn, editable = (np.asarray(a) for a in arrays)
    if canvas.ndim != 2 or attn.shape != canvas.shape or editable.shape != canvas.shape:
        raise ValueError(
            f"canvas, attn_mask and editable must share one [B, L] shape; got "
            f"{canvas.shape}, {attn.shape}, {editable.shape}"
        )
    fill = editable.astype(bool) & attn.astype(bool) & (canvas == m)
    empty = np.flatnonzero(~fill.any(-1))
    if empty.size:
        raise ValueError(
            f"the editable span of row {int(empty[0])} contains no [MASK] (id {m}) to fill"
        )
    if cfg.shift_logits:
        first = np.argmax(attn.astype(bool), axis=-1)
        rows = np.flatnonzero(fill[np.arange(len(first)), first])
        if rows.size:
            raise ValueError(
                f"shift_logits: row {int(rows[0])} starts with a [MASK] to fill; the first canvas "
                "token must be known (put e.g. BOS before the mask block)"
            )
    counts = fill.sum(-1)
    if fill_width is not None and counts.max() > fill_width:
        row = int(np.argmax(counts))
        raise ValueError(
            f"row {row} has {int(counts[row])} [MASK]s to fill but fill_width={fill_width}; "
            "pass a fill_width of at least the largest count (or None)"
        )
    return int(counts.max())


def sample(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    canvas_BxL: jax.Array,
    attn_mask_BxL: jax.Array,
    editable_BxL: jax.Array,
    key: jax.Array,
    *,
    cfg: SamplerConfig,
    fill_width: int | None = None,
) -> SampleOutput:
    """Fills the [MASK]s of `editable_BxL` with a masked-diffusion `Decoder` (see module doc).
    `fill_width` (T, static: one compile per value) defaults to the largest number of [MASK]s to
    fill in one row, read from the data on the host (L when they are not local); pass it (e.g.
    the prompt length) to keep one compile across batches whose counts differ."""
    model_cfg = nnx.merge(graphdef, state).cfg
    most = check_inputs(
        cfg,
        canvas_BxL,
        attn_mask_BxL,
        editable_BxL,
        vocab_size=model_cfg.vocab_size,
        pad_id=model_cfg.pad_token_id,
        model_mask_id=model_cfg.mask_token_id,
        model_shift_logits=model_cfg.shift_logits,
        fill_width=fill_width,
    )
    if fill_width is None:
        fill_width = np.shape(canvas_BxL)[-1] if most is None else most
    return sample_jitted(
        graphdef,
        state,
        canvas_BxL,
        attn_mask_BxL,
        editable_BxL,
        key,
        cfg=cfg,
        fill_width=int(fill_width),
    )
