"""The denoiser a masked-diffusion LM exposes to its objectives and its sampler (DAT spec §5.1–§5.3).

A `LogitsFn` maps a (partially masked) canvas to raw model logits:
`logits_fn(canvas_BxL, attn_mask_BxL) -> logits_BxLxV`. `decoder_logits_fn` builds one from an NNX
`Decoder` split into `(graphdef, *states)` (bidirectional when `cfg.causal=False`); tests pass
plain functions (e.g. a context-independent oracle). `align_logits` applies Dream's shifted
prediction (§5.2): the logits at i predict token i + 1, so position i reads the logits of i − 1
(`concat([logits[:, :1], logits[:, :-1]])`); the first canvas position must never be a [MASK].
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]


def align_logits(logits_BxLxV: jax.Array, shift_logits: bool) -> jax.Array:
    """Logits whose position i predicts token i (Dream's shift undone when `shift_logits`)."""
    if not shift_logits:
        return logits_BxLxV
    return jnp.concatenate([logits_BxLxV[:, :1], logits_BxLxV[:, :-1]], axis=1)


def decoder_logits_fn(
    graphdef: nnx.GraphDef, *states: nnx.State, dropout_key: jax.Array | None = None
) -> LogitsFn:
    """A `LogitsFn` over the merged decoder (fp32 logits); `dropout_key` enables LoRA dropout."""
    model = nnx.merge(graphdef, *states)

    def logits_fn(canvas_BxL: jax.Array, attn_mask_BxL: jax.Array) -> jax.Array:
        emb_BxLxD = model.embed(canvas_BxL)
        return model.apply_embeddings(emb_BxLxD, attn_mask_BxL, dropout_key=dropout_key)

    return logits_fn
