"""Decoder building blocks: RMSNorm, rotary embeddings, a LoRA-capable stacked Linear, attention.

Numerics follow the Hugging Face Llama/Mistral/Qwen2 implementations (RMSNorm and softmax in fp32,
`rotate_half` RoPE, Llama-3 frequency scaling) so that fp32 logits match them to ~1e-5.
All parameters of one decoder block are *stacked* along a leading layer axis `N` and the decoder
runs the blocks with `lax.scan`; inside the scan each module sees its per-layer slice.

Shape legend: B batch, L query length, S key length (cache slots), D model, H heads, K kv heads,
G = H // K query groups, Dh head dim, F mlp, R LoRA rank, N layers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mixat_jax.models.config import LoraConfig, ModelConfig

NEG_INF = float(jnp.finfo(jnp.float32).min)


def dtype_from_name(name: str) -> jnp.dtype:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


class RMSNorm(nnx.Module):
    """HF-style RMSNorm: normalise in fp32, cast back, then multiply by the weight."""

    def __init__(self, stack: tuple[int, ...], dim: int, eps: float, dtype: jnp.dtype):
        axes = ("layers",) * len(stack) + ("norm",)
        self.weight = nnx.Param(jnp.ones((*stack, dim), dtype), axes=axes)
        self.eps = eps

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        h = x_BxLxD.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * h.astype(x_BxLxD.dtype)


class Linear(nnx.Module):
    """y = x W (+ b) (+ scale · dropout(x) A B). Kernel is [in, out] (HF weight transposed).

    LoRA factors are `nnx.LoRAParam` (A: [in, R], B: [R, out]); they are added by `add_lora`
    after the base weights are loaded, so a frozen base never carries adapter state.
    """

    def __init__(
        self,
        stack: tuple[int, ...],
        d_in: int,
        d_out: int,
        axes: tuple[str | None, str | None],
        *,
        use_bias: bool,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        init = jax.nn.initializers.normal(0.02)
        lead = ("layers",) * len(stack)
        self.kernel = nnx.Param(init(rngs.params(), (*stack, d_in, d_out), dtype), axes=lead + axes)
        self.bias = (
            nnx.Param(jnp.zeros((*stack, d_out), dtype), axes=lead + (axes[1],))
            if use_bias
            else None
        )
        self.lora_a = nnx.data(None)  # data slots: LoRAParams may be attached later
        self.lora_b = nnx.data(None)
        self.lora_scale = 0.0
        self.lora_dropout = 0.0
        self.axes = axes

    def add_lora(self, cfg: LoraConfig, key: jax.Array) -> None:
        *stack, d_in, d_out = self.kernel.shape
        lead = ("layers",) * len(stack)
        bound = 1.0 / math.sqrt(d_in)  # PEFT: kaiming_uniform(a=sqrt(5)) on A, zeros on B
        a = jax.random.uniform(key, (*stack, d_in, cfg.r), jnp.float32, -bound, bound)
        self.lora_a = nnx.LoRAParam(a, axes=lead + (self.axes[0], None))
        self.lora_b = nnx.LoRAParam(
            jnp.zeros((*stack, cfg.r, d_out), jnp.float32), axes=lead + (None, self.axes[1])
        )
        self.lora_scale = cfg.scale
        self.lora_dropout = cfg.dropout

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        y = jnp.einsum("...i,io->...o", x, self.kernel[...])
        if self.bias is not None:
            y = y + self.bias[...]
        if self.lora_a is not None:
            h = x
            if dropout_key is not None and self.lora_dropout > 0.0:
                keep = dropout_mask(dropout_key, 1.0 - self.lora_dropout, x.shape)
                h = jnp.where(keep, x / (1.0 - self.lora_dropout), 0).astype(x.dtype)
            a = self.lora_a[...].astype(x.dtype)
            b = self.lora_b[...].astype(x.dtype)
            y = y + lora_matmul(h, a, b) * jnp.asarray(self.lora_scale, x.dtype)
        return y


def split_keys(key: jax.Array, n: int) -> jax.Array:
    """``n`` keys from one key ([n]) or from per-row keys ([B] -> [n, B], row by row)."""
    if key.ndim == 0:
        return jax.random.split(key, n)
    return jnp.swapaxes(jax.vmap(lambda k: jax.random.split(k, n))(key), 0, 1)


def dropout_mask(key: jax.Array, keep_prob: float, shape: tuple[int, ...]) -> jax.Array:
    """Bernoulli keep-mask of ``shape``; per-row keys ([B] = shape[0]) give each row its own
    mask (the same mask whatever else is in the batch)."""
    if key.ndim == 0:
        return jax.random.bernoulli(key, keep_prob, shape)
    if key.shape != shape[:1]:
        raise ValueError(f"per-row dropout keys {key.shape} do not match the batch {shape[:1]}")
    return jax.vmap(lambda k: jax.random.bernoulli(k, keep_prob, shape[1:]))(key)


@jax.custom_vjp
def lora_matmul(h: jax.Array, a_IxR: jax.Array, b_RxO: jax.Array) -> jax.Array:
    """``(h @ a) @ b`` with a hand-written VJP (same values as autodiff).

    Autodiff's ``db`` contracts the ``[..., O]`` cotangent over the token axes; XLA:CPU then
    fuses the whole upstream elementwise backward (SiLU, dropout, residual adds) into a
    *transposing* copy of that cotangent, which runs at a fraction of memory bandwidth and cost
    more than the matmuls of the LoRA MLP. The explicit VJP contracts 2-D operands directly.
    """
    return (h @ a_IxR) @ b_RxO


def _lora_matmul_fwd(h, a, b):
    ha = h @ a
    return ha @ b, (h, a, b, ha)


def _lora_matmul_bwd(res, g):
    h, a, b, ha = res
    g2 = g.reshape(-1, g.shape[-1])
    ha2 = ha.reshape(-1, ha.shape[-1])
    h2 = h.reshape(-1, h.shape[-1])
    db = jnp.einsum("to,tr->or", g2, ha2).T
    g_ha = g2 @ b.T
    da = jnp.einsum("tr,ti->ri", g_ha, h2).T
    dh = (g_ha @ a.T).reshape(h.shape)
    return dh, da, db


lora_matmul.defvjp(_lora_matmul_fwd, _lora_matmul_bwd)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies [Dh/2], with Llama-3 wavelength-dependent scaling when configured."""
    dh = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
    sc = cfg.rope_scaling
    if sc is None:
        return inv
    old = sc.original_max_position_embeddings
    low_wavelen = old / sc.low_freq_factor
    high_wavelen = old / sc.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / sc.factor, inv)
    smooth = (old / wavelen - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor)
    smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def rope_tables(cfg: ModelConfig, positions_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, L, Dh] in fp32 for explicit (padding-aware) positions."""
    freqs = positions_BxL.astype(jnp.float32)[..., None] * rope_inv_freq(cfg)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_BxLxHxDh: jax.Array, cos_BxLxDh: jax.Array, sin_BxLxDh: jax.Array) -> jax.Array:
    half = x_BxLxHxDh.shape[-1] // 2
    x1, x2 = x_BxLxHxDh[..., :half], x_BxLxHxDh[..., half:]
    rot = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos_BxLxDh[:, :, None, :], sin_BxLxDh[:, :, None, :]
    out = x_BxLxHxDh.astype(jnp.float32) * cos + rot.astype(jnp.float32) * sin
    return out.astype(x_BxLxHxDh.dtype)


def attend(
    q_BxLxHxDh: jax.Array,
    k_BxSxKxDh: jax.Array,
    v_BxSxKxDh: jax.Array,
    allowed_BxLxS: jax.Array,
) -> jax.Array:
    """Grouped-query attention with an explicit boolean mask; softmax in fp32."""
    b, l, h, dh = q_BxLxHxDh.shape
    k = k_BxSxKxDh.shape[2]
    q = q_BxLxHxDh.reshape(b, l, k, h // k, dh)
    scores = jnp.einsum(
        "blkgd,bskd->bkgls", q, k_BxSxKxDh, preferred_element_type=jnp.float32
    ) / math.sqrt(dh)
    scores = jnp.where(allowed_BxLxS[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxKxDh.dtype)
    out = jnp.einsum("bkgls,bskd->blkgd", probs, v_BxSxKxDh)
    return out.reshape(b, l, h * dh)


def attend_with_prefix(
    q_BxLxHxDh: jax.Array,
    pk_SxKxDh: jax.Array,
    pv_SxKxDh: jax.Array,
    k_BxLxKxDh: jax.Array,
    v_BxLxKxDh: jax.Array,
    allowed_prefix_BxLxS: jax.Array,
    allowed_self_BxLxL: jax.Array,
) -> jax.Array:
    """Attention over a prefix shared by the whole batch (never broadcast) plus the batch's own keys.

    Used for GCG candidates: one cached [behaviour prefix] and C different suffixes; the prefix
    K/V stay [S, K, Dh] instead of being copied C times per layer.
    """
    b, l, h, dh = q_BxLxHxDh.shape
    kh = pk_SxKxDh.shape[1]
    q = q_BxLxHxDh.reshape(b, l, kh, h // kh, dh)
    scale = 1.0 / math.sqrt(dh)
    s_pre = jnp.einsum("blkgd,skd->bkgls", q, pk_SxKxDh, preferred_element_type=jnp.float32)
    s_own = jnp.einsum("blkgd,bskd->bkgls", q, k_BxLxKxDh, preferred_element_type=jnp.float32)
    s_pre = jnp.where(allowed_prefix_BxLxS[:, None, None], s_pre * scale, NEG_INF)
    s_own = jnp.where(allowed_self_BxLxL[:, None, None], s_own * scale, NEG_INF)
    probs = jax.nn.softmax(jnp.concatenate([s_pre, s_own], axis=-1), axis=-1)
    p_pre = probs[..., : s_pre.shape[-1]].astype(pv_SxKxDh.dtype)
    p_own = probs[..., s_pre.shape[-1] :].astype(v_BxLxKxDh.dtype)
    out = jnp.einsum("bkgls,skd->blkgd", p_pre, pv_SxKxDh)
    out = out + jnp.einsum("bkgls,bskd->blkgd", p_own, v_BxLxKxDh)
    return out.reshape(b, l, h * dh)
