"""C-AdvUL terms on top of the token cross entropies: soft cutoffs, log(1 - p) (MixAT spec §4).

The cross entropies themselves (HF causal-LM token means, gathered targets) are
``mixat_jax.objectives`` (shared with the attacks). The cutoffs are soft floors on the sub-batch
mean (spec §4, §11.6): piecewise linear, value and gradient both reproduced by ``jnp.where`` —
slope 1 above the cutoff, ``slope`` (1e-3) below.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mixat_jax.objectives import token_mean

AWAY_CUTOFF = -5.0
TOWARD_CUTOFF = 0.5
CUTOFF_SLOPE = 1e-3
AWAY_LOSS_TYPES = ("negative_cross_entropy", "log_1_minus_p")


# ------------------------------------------------------------------------------ cutoffs
def cutoff_loss(x: jax.Array, cutoff: float, slope: float = CUTOFF_SLOPE) -> jax.Array:
    """Soft floor: ``x`` if ``x >= cutoff`` else ``cutoff + slope · x`` (spec §4)."""
    return jnp.where(x >= cutoff, x, cutoff + slope * x)


def floor_away(z: jax.Array, cutoff: float = AWAY_CUTOFF, slope: float = CUTOFF_SLOPE):
    """Away term on ``z = -CE_harm`` (spec §4): ``where(z >= -5, z, -5 + 1e-3·z)``."""
    return cutoff_loss(z, cutoff, slope)


def floor_toward(c: jax.Array, cutoff: float = TOWARD_CUTOFF, slope: float = CUTOFF_SLOPE):
    """Toward term on ``c = CE_safe`` (spec §4): ``where(c >= 0.5, c, 0.5 + 1e-3·c)``."""
    return cutoff_loss(c, cutoff, slope)


# ------------------------------------------------------------------------------ log(1 - p) away
def log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x <= 0, numerically stable (Mächler 2012)."""
    x = jnp.minimum(x, -1e-7)
    return jnp.where(x > -jnp.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def log_1_minus_p_loss(
    logp_BxT: jax.Array, weight_BxT: jax.Array, cutoff: float = AWAY_CUTOFF
) -> jax.Array:
    """Unused reference option (spec §4): token mean of -log(1 - p); tokens with log p < cutoff
    contribute 0 (they still count in the denominator)."""
    per_token = jnp.where(logp_BxT < cutoff, 0.0, -log1mexp(logp_BxT))
    return token_mean(per_token, weight_BxT)
