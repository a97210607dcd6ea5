"""Masked-diffusion objectives: the training loss and LLaDA's Monte-Carlo likelihood (DAT spec §5.1).

`masked_diffusion_loss` — the absorbing-state forward process with a linear schedule: per row
t ~ U(0, 1], p_mask = (1 − eps)·t + eps; every eligible token (maskable and attended) becomes
[MASK] independently with probability p_mask; cross-entropy on the masked positions, each
weighted by 1/p_mask. Pre-training normalisation: the sum divided by the number of eligible
tokens (= B·L for unpadded, fully maskable batches, LLaDA's `/ (B·L)`). SFT (`sft=True`): the
prompt is simply not maskable (so never masked) and each row's sum is divided by its answer
length (its eligible count), then averaged over rows (LLaDA's SFT guideline).

`mc_log_likelihood` — the low-variance estimator of log p(x | y): for each Monte-Carlo sample
draw l ∈ {1..L_x} (stratified across an MC chunk of size m: l_j = ((round(k + j·L_x/m) − 1) mod
L_x) + 1 with k ~ U{1..L_x}, LLaDA's linspace trick), mask exactly l of the target (x) positions
uniformly without replacement, keep y visible, and weight the masked-token CE by L_x / l. The
estimate is minus the mean over `num_mc` samples; chunks run through `lax.map`, so memory is one
chunk's [B·m, L, V] logits. Both are pure and jittable; `shift_logits` realigns Dream's logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mixat_jax.diffusion.denoiser import LogitsFn, align_logits
from mixat_jax.diffusion.ranks import random_ranks


def token_nll(logits_BxLxV: jax.Array, ids_BxL: jax.Array) -> jax.Array:
    """−log softmax(logits)[ids] per position, fp32."""
    logp_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp_BxLxV, ids_BxL[..., None], axis=-1)[..., 0]


def masked_diffusion_loss(
    logits_fn: LogitsFn,
    ids_BxL: jax.Array,
    attn_mask_BxL: jax.Array,
    maskable_BxL: jax.Array,
    key: jax.Array,
    *,
    mask_token_id: int,
    shift_logits: bool = False,
    sft: bool = False,
    eps: float = 1e-3,
) -> jax.Array:
    """Scalar masked-diffusion loss (an upper bound on the NLL of the maskable tokens)."""
    ids_BxL = ids_BxL.astype(jnp.int32)
    b, l = ids_BxL.shape
    eligible_BxL = maskable_BxL.astype(bool) & attn_mask_BxL.astype(bool)
    key_t, key_mask = jax.random.split(key)
    t_B = 1.0 - jax.random.uniform(key_t, (b,))  # (0, 1]
    p_mask_B = (1.0 - eps) * t_B + eps
    masked_BxL = (jax.random.uniform(key_mask, (b, l)) < p_mask_B[:, None]) & eligible_BxL
    noisy_BxL = jnp.where(masked_BxL, mask_token_id, ids_BxL)
    logits_BxLxV = align_logits(logits_fn(noisy_BxL, attn_mask_BxL), shift_logits)
    weighted_BxL = jnp.where(masked_BxL, token_nll(logits_BxLxV, ids_BxL) / p_mask_B[:, None], 0.0)
    if sft:
        answer_len_B = eligible_BxL.sum(-1)
        per_row_B = weighted_BxL.sum(-1) / jnp.maximum(answer_len_B, 1)
        rows = jnp.maximum((answer_len_B > 0).sum(), 1)
        return per_row_B.sum() / rows
    return weighted_BxL.sum() / jnp.maximum(eligible_BxL.sum(), 1)


def stratified_mask_counts(key: jax.Array, target_len_B: jax.Array, m: int) -> jax.Array:
    """[B, m] masked counts l ∈ {1..L_b}, stratified over the m samples (LLaDA's linspace)."""
    n_B = jnp.maximum(target_len_B, 1).astype(jnp.float32)
    k_B = jnp.minimum(jnp.floor(jax.random.uniform(key, n_B.shape) * n_B) + 1.0, n_B)
    spread_BxM = jnp.round(k_B[:, None] + jnp.arange(m)[None, :] * n_B[:, None] / m)
    return (jnp.mod(spread_BxM - 1.0, n_B[:, None]) + 1.0).astype(jnp.int32)


def mc_log_likelihood(
    logits_fn: LogitsFn,
    ids_BxL: jax.Array,
    attn_mask_BxL: jax.Array,
    target_BxL: jax.Array,
    key: jax.Array,
    *,
    mask_token_id: int,
    num_mc: int = 128,
    mc_batch: int = 16,
    shift_logits: bool = False,
) -> jax.Array:
    """Estimate of log p(ids[target] | ids[~target]) per row, [B] fp32 (0 for empty targets)."""
    if num_mc < 1 or mc_batch < 1 or num_mc % mc_batch:
        raise ValueError(
            f"num_mc={num_mc} must be a positive multiple of mc_batch={mc_batch} (MC chunk size)"
        )
    ids_BxL = ids_BxL.astype(jnp.int32)
    attn_BxL = attn_mask_BxL.astype(bool)
    b, l = ids_BxL.shape
    m = mc_batch
    target_BxL = target_BxL.astype(bool) & attn_BxL
    target_len_B = target_BxL.sum(-1)
    target_BxMxL = jnp.broadcast_to(target_BxL[:, None], (b, m, l))
    ids_BxMxL = jnp.broadcast_to(ids_BxL[:, None], (b, m, l))

    def chunk(c: jax.Array) -> jax.Array:
        key_l, key_perm = jax.random.split(jax.random.fold_in(key, c))
        count_BxM = stratified_mask_counts(key_l, target_len_B, m)
        ranks_BxMxL = random_ranks(key_perm, target_BxMxL)
        masked_BxMxL = (ranks_BxMxL < count_BxM[..., None]) & target_BxMxL
        noisy = jnp.where(masked_BxMxL, mask_token_id, ids_BxMxL).reshape(b * m, l)
        attn = jnp.broadcast_to(attn_BxL[:, None], (b, m, l)).reshape(b * m, l)
        logits = align_logits(logits_fn(noisy, attn), shift_logits)
        nll_BxMxL = token_nll(logits, ids_BxMxL.reshape(b * m, l)).reshape(b, m, l)
        nll_BxM = jnp.where(masked_BxMxL, nll_BxMxL, 0.0).sum(-1)
        weight_BxM = jnp.maximum(target_len_B, 1)[:, None] / count_BxM
        return (nll_BxM * weight_BxM).mean(-1)

    nll_CxB = jax.lax.map(chunk, jnp.arange(num_mc // m))
    return -nll_CxB.mean(0)
