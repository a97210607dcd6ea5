"""Shared pieces of the masked-diffusion tests: a character-level tokenizer, tiny models, and the
sampler tests' canvases with their invariant checks (DAT spec §5.5)."""

from __future__ import annotations

import numpy as np
import transformers
from flax import nnx
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from mixat_jax.models.config import tiny_config
from mixat_jax.models.decoder import Decoder

SPECIALS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]", "[MASK]")  # ids 0..4
CANVAS_V, CANVAS_MASK, CANVAS_PAD = 64, 63, 0  # the sampler tests' vocabulary
PAD, BOS, EOS, UNK, MASK = range(5)
ANSWER_PREFIX = "\nAnswer: "


def char_tokenizer(chars: str) -> transformers.PreTrainedTokenizerFast:
    """One token per character of `chars` (+ the answer prefix's), BOS prepended on encode."""
    alphabet = sorted(set(chars) | set(ANSWER_PREFIX))
    vocab = {t: i for i, t in enumerate([*SPECIALS, *alphabet])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", pair="[BOS] $A [BOS] $B", special_tokens=[("[BOS]", BOS)]
    )
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        mask_token="[MASK]",
    )
    return tok


def tiny_diffusion_model(vocab_size: int = 32, seed: int = 0, **kw) -> Decoder:
    cfg = tiny_config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        causal=False,
        mask_token_id=MASK,
        pad_token_id=PAD,
        max_position_embeddings=64,
    )
    return Decoder(cfg.replace(**kw), rngs=nnx.Rngs(seed))


# ----------------------------------------------------------------------------- sampler canvases
def make_canvas(b=8, l=16, seed=0):
    """Rows with right and left padding; the editable span holds masks and one known token."""
    rng = np.random.RandomState(seed)
    canvas = rng.randint(3, CANVAS_MASK, size=(b, l)).astype(np.int32)
    attn = np.ones((b, l), bool)
    editable = np.zeros((b, l), bool)
    for i in range(b):
        pad = i % 3
        if i % 2:  # left padded: [pad | span | answer]
            attn[i, :pad] = False
            canvas[i, :pad] = CANVAS_PAD
            span = slice(pad, pad + 7)
        else:  # right padded: [answer | span | pad]
            attn[i, l - pad :] = False
            canvas[i, l - pad :] = CANVAS_PAD
            span = slice(3, 10)
        editable[i, span] = True
        canvas[i, span] = CANVAS_MASK
        if i % 4 == 0:
            canvas[i, span.start + 2] = 5  # an editable position that is already known
    canvas[0, l - 2] = CANVAS_MASK  # a non-editable mask stays a mask (conditioning)
    return canvas, attn, editable


def schedule_reference(canvas, attn, editable, cfg):
    """[S, B] reveal counts from the spec's recipe, in NumPy."""
    b, _ = canvas.shape
    spb = cfg.steps_per_block
    out = np.zeros((cfg.steps, b), np.int64)
    for i in range(b):
        span = np.flatnonzero(editable[i] & attn[i])
        fill = canvas[i, span] == cfg.mask_token_id
        blocks = np.arange(len(span)) * cfg.num_blocks // len(span)
        for s in range(cfg.steps):
            n = int(fill[blocks == s // spb].sum())
            out[s, i] = n // spb + (s % spb < n % spb)
    return out


def check_invariants(out, canvas, attn, editable, cfg, exact_counts=True):
    """Spec §5.5: fixed tokens never change, the span ends unmasked, suppressed ids never appear,
    the path log-likelihood is finite and <= 0, and each step reveals the scheduled count."""
    got = np.asarray(out.canvas_BxL)
    fixed = ~(editable & attn) | (canvas != CANVAS_MASK)
    np.testing.assert_array_equal(got[fixed], canvas[fixed])  # non-editable never changes
    assert not np.any(got[editable & attn] == CANVAS_MASK)  # nothing left masked in the span
    assert not np.isin(got[editable & (canvas == CANVAS_MASK)], cfg.suppress_ids).any()
    logp = np.asarray(out.logp_B)
    assert np.all(np.isfinite(logp)) and np.all(logp <= 0)
    revealed = np.asarray(out.revealed_SxB)
    want = schedule_reference(canvas, attn, editable, cfg)
    if exact_counts:
        np.testing.assert_array_equal(revealed, want)
    else:  # Dream's origin: random counts, every block complete at its last step
        spb = cfg.steps_per_block
        np.testing.assert_array_equal(
            revealed.reshape(cfg.num_blocks, spb, -1).sum(1),
            want.reshape(cfg.num_blocks, spb, -1).sum(1),
        )


# ------------------------------------------------------------------------ full-canvas reference
def full_canvas_denoise(logits_fn, canvas_BxL, attn_mask_BxL, editable_BxL, key, *, cfg):
    """The sampler as it was before it restricted the LM head to the fill positions: logits,
    Gumbel noise, softmax and ranks over the whole [B, L, V] canvas (`logits_fn(canvas, attn)`
    returns [B, L, V]). The reference `denoise` must reproduce exactly."""
    import jax
    import jax.numpy as jnp

    from mixat_jax.diffusion.denoiser import align_logits
    from mixat_jax.diffusion.ranks import random_ranks, top_k_mask
    from mixat_jax.diffusion.sampler import (
        ORIGIN_EPS,
        SampleOutput,
        block_ids,
        combine_cfg,
        reveal_schedule,
    )

    mask_id = cfg.mask_token_id
    canvas_BxL = jnp.asarray(canvas_BxL, jnp.int32)
    attn_BxL = jnp.asarray(attn_mask_BxL).astype(bool)
    editable_BxL = jnp.asarray(editable_BxL).astype(bool) & attn_BxL
    b, l = canvas_BxL.shape
    spb = cfg.steps_per_block
    fill_BxL = editable_BxL & (canvas_BxL == mask_id)
    block_BxL = block_ids(editable_BxL, cfg.num_blocks)
    k_SxB = reveal_schedule(fill_BxL, block_BxL, cfg)
    cond_BxL = attn_BxL & ~editable_BxL
    known_BxL = cond_BxL & (canvas_BxL != mask_id)
    t_grid = jnp.linspace(1.0, ORIGIN_EPS, spb + 1)
    banned = jnp.asarray(sorted({*cfg.suppress_ids, mask_id}), jnp.int32)

    def logits_of(x_in_BxL):
        if cfg.cfg_scale != 0.0:
            uncond_BxL = jnp.where(cond_BxL, mask_id, x_in_BxL)
            both = logits_fn(
                jnp.concatenate([x_in_BxL, uncond_BxL]), jnp.concatenate([attn_BxL] * 2)
            )
            both = align_logits(both.astype(jnp.float32), cfg.shift_logits)
            out = combine_cfg(both[:b], both[b:], cfg.cfg_scale)
        else:
            out = align_logits(logits_fn(x_in_BxL, attn_BxL).astype(jnp.float32), cfg.shift_logits)
        return out.at[..., banned].set(-jnp.inf)

    def step(carry, xs):
        x_BxL, key, logp_BxL = carry
        s, k_B = xs
        key, key_remask, key_drop_r, key_drop, key_noise, key_conf = jax.random.split(key, 6)
        blk, s_loc = s // spb, s % spb
        in_block_BxL = block_BxL == blk
        if cfg.global_remask_every:
            fire_B = (k_B == 0) & (s > 0) & (s % cfg.global_remask_every == 0)
            done_BxL = fill_BxL & in_block_BxL & (x_BxL != mask_id)
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
            drop_BxL = (random_ranks(key_drop, jnp.ones((b, l), bool)) < r_B[:, None]) & known_BxL
            x_in_BxL = jnp.where(drop_BxL, mask_id, x_BxL)
        logits_BxLxV = logits_of(x_in_BxL)
        if cfg.temperature == 0.0:
            x0_BxL = jnp.argmax(logits_BxLxV, axis=-1).astype(jnp.int32)
        else:
            dt = jnp.dtype(cfg.gumbel_dtype)
            g = jax.random.gumbel(key_noise, logits_BxLxV.shape, dt)
            noisy = logits_BxLxV.astype(dt) / jnp.asarray(cfg.temperature, dt) + g
            x0_BxL = jnp.argmax(noisy, axis=-1).astype(jnp.int32)
        logp_BxLxV = jax.nn.log_softmax(logits_BxLxV, axis=-1)
        logp0_BxL = jnp.take_along_axis(logp_BxLxV, x0_BxL[..., None], axis=-1)[..., 0]
        eligible_BxL = fill_BxL & in_block_BxL & (x_BxL == mask_id)
        if cfg.remasking == "origin":
            p_reveal = 1.0 - t_grid[s_loc + 1] / t_grid[s_loc]
            coin_BxL = jax.random.uniform(key_conf, (b, l)) < p_reveal
            reveal_BxL = eligible_BxL & (coin_BxL | (s_loc == spb - 1))
        else:
            probs = jnp.exp(logp_BxLxV)
            conf_BxL = {
                "random": lambda: jax.random.uniform(key_conf, (b, l)),
                "low_confidence": lambda: jnp.exp(logp0_BxL),
                "entropy": lambda: jnp.sum(jnp.where(probs > 0, probs * logp_BxLxV, 0.0), -1),
                "margin": lambda: jnp.subtract(*jnp.moveaxis(jax.lax.top_k(probs, 2)[0], -1, 0)),
            }[cfg.remasking]()
            conf_BxL = jnp.where(eligible_BxL, conf_BxL, -jnp.inf)
            reveal_BxL = top_k_mask(conf_BxL, k_B) & eligible_BxL
        x_BxL = jnp.where(reveal_BxL, x0_BxL, x_BxL)
        logp_BxL = jnp.where(reveal_BxL, logp0_BxL, logp_BxL)
        return (x_BxL, key, logp_BxL), reveal_BxL.sum(-1).astype(jnp.int32)

    carry = (canvas_BxL, key, jnp.zeros((b, l), jnp.float32))
    (x_BxL, _, logp_BxL), revealed_SxB = jax.lax.scan(step, carry, (jnp.arange(cfg.steps), k_SxB))
    return SampleOutput(x_BxL, logp_BxL.sum(-1), revealed_SxB)


def max_fill(canvas, attn, editable, mask_id):
    """The largest number of [MASK]s to fill in one row (the tightest `fill_width`)."""
    return int(
        ((np.asarray(editable) & np.asarray(attn)) & (np.asarray(canvas) == mask_id)).sum(-1).max()
    )
