"""Dynamic-k selection with static shapes by rank comparison (DAT spec §5.3 "Ranks").

JAX has no top-k with a per-row k, so every position gets its rank (0 = first) from a stable
double argsort and a row selects `rank < k_row`. Ties keep position order (stable sort), which is
what a NumPy `argsort(kind="stable")` reference gives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def descending_ranks(score_XxL: jax.Array) -> jax.Array:
    """Rank of each position by descending score along the last axis (ties: lower index first)."""
    return jnp.argsort(jnp.argsort(-score_XxL, axis=-1, stable=True), axis=-1, stable=True)


def top_k_mask(score_XxL: jax.Array, k_X: jax.Array) -> jax.Array:
    """True at the k_X highest-scoring positions of each row (k may differ per row)."""
    return descending_ranks(score_XxL) < k_X[..., None]


def random_ranks(key: jax.Array, candidates_XxL: jax.Array) -> jax.Array:
    """A uniformly random order of the candidate positions (ranks 0..n−1), the others after them."""
    u_XxL = jax.random.uniform(key, candidates_XxL.shape)
    u_XxL = jnp.where(candidates_XxL, u_XxL, 2.0)
    return jnp.argsort(jnp.argsort(u_XxL, axis=-1), axis=-1)
