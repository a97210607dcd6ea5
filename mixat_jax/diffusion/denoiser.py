"""The denoiser a masked-diffusion LM exposes to its objectives and its sampler (DAT spec §5.1–§5.3).

A `LogitsFn` maps a (partially masked) canvas to raw model logits:
`logits_fn(canvas_BxL, attn_mask_BxL) -> logits_BxLxV` over the whole canvas (the objectives), or
`logits_fn(canvas_BxL, attn_mask_BxL, positions_BxT) -> logits_BxTxV` at the given positions only
(the sampler: the model still reads the whole canvas, but the LM head and everything
vocabulary-sized after it see only the T positions it can reveal; DESIGN.md rule 4).
`decoder_logits_fn` builds one from an NNX `Decoder` split into `(graphdef, *states)`
(bidirectional when `cfg.causal=False`; positions → `forward(..., logits_at_BxT=...)`); tests pass
plain functions (e.g. a context-independent oracle), and `at_positions` turns a full-canvas
function into one that takes positions (full logits, then a gather). `align_logits` applies
Dream's shifted prediction (§5.2): the logits at i predict token i + 1, so position i reads the
logits of i − 1 (`concat([logits[:, :1], logits[:, :-1]])`); `source_positions` is the same
realignment for gathered logits (position p reads the raw logits at max(p − 1, 0)). The first
canvas position must never be a [MASK].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx


class LogitsFn(Protocol):
    """`(canvas_BxL, attn_mask_BxL[, positions_BxT]) -> fp32-able logits`, [B, L, V] without
    positions, [B, T, V] (the logits at `positions_BxT`, int32 canvas indices) with them."""

    def __call__(
        self, canvas_BxL: jax.Array, attn_mask_BxL: jax.Array, positions_BxT: jax.Array | None = ...
    ) -> jax.Array: ...


def align_logits(logits_BxLxV: jax.Array, shift_logits: bool) -> jax.Array:
    """Logits whose position i predicts token i (Dream's shift undone when `shift_logits`)."""
    if not shift_logits:
        return logits_BxLxV
    return jnp.concatenate([logits_BxLxV[:, :1], logits_BxLxV[:, :-1]], axis=1)


def source_positions(positions_BxT: jax.Array, shift_logits: bool) -> jax.Array:
    """The raw-logit positions that predict the tokens at `positions_BxT`:
    `align_logits(full, shift)[b, p] == full[b, source_positions(p, shift)]`."""
    if not shift_logits:
        return positions_BxT
    return jnp.maximum(positions_BxT - 1, 0)


def gather_positions(values_BxLx: jax.Array, positions_BxT: jax.Array) -> jax.Array:
    """`values[b, positions[b, t]]` along axis 1 ([B, L, ...] -> [B, T, ...])."""
    idx = positions_BxT.reshape(positions_BxT.shape + (1,) * (values_BxLx.ndim - 2))
    return jnp.take_along_axis(values_BxLx, idx, axis=1)


def at_positions(full_fn: Callable[[jax.Array, jax.Array], jax.Array]) -> LogitsFn:
    """A `LogitsFn` from a full-canvas logits function: all [B, L, V] logits, then gathered at the
    positions (the reference the position-restricted path must equal; no memory saving)."""

    def logits_fn(
        canvas_BxL: jax.Array, attn_mask_BxL: jax.Array, positions_BxT: jax.Array | None = None
    ) -> jax.Array:
        logits_BxLxV = full_fn(canvas_BxL, attn_mask_BxL)
        if positions_BxT is None:
            return logits_BxLxV
        return gather_positions(logits_BxLxV, positions_BxT)

    return logits_fn


def decoder_logits_fn(
    graphdef: nnx.GraphDef, *states: nnx.State, dropout_key: jax.Array | None = None
) -> LogitsFn:
    """A `LogitsFn` over the merged decoder (fp32 logits); `dropout_key` enables LoRA dropout.
    With `positions_BxT` the LM head runs only there (`forward(..., logits_at_BxT=...)`)."""
    model = nnx.merge(graphdef, *states)

    def logits_fn(
        canvas_BxL: jax.Array, attn_mask_BxL: jax.Array, positions_BxT: jax.Array | None = None
    ) -> jax.Array:
        emb_BxLxD = model.embed(canvas_BxL)
        return model.apply_embeddings(
            emb_BxLxD, attn_mask_BxL, dropout_key=dropout_key, logits_at_BxT=positions_BxT
        )

    return logits_fn
