"""GCG probe sampling: the pure pieces and the draft model (Zhao et al. 2024, "Accelerating
Greedy Coordinate Gradient and General Prompt Optimization via Probe Sampling",
arXiv:2403.01251; nanoGCG 0.3.0 ``ProbeSamplingConfig(draft_model, draft_tokenizer, r=8,
sampling_factor=16)``; issue #14).

Per GCG step (``gcg.probe_candidate_losses`` runs it inside the compiled step): a draft model
scores every one of the W candidates; the target scores a random probe set of
``P = W // sampling_factor``; ``rho`` = Spearman rank correlation of the two on the probe set
(average ranks for ties, as ``scipy.stats.spearmanr``), ``alpha = (1 + rho) / 2``; the target
then scores the draft's ``f = max(1, min(floor((1 - alpha) * W / r), W))`` best candidates and the
step takes the best of all target-scored candidates. f is data dependent; the compiled step
evaluates a static set: a mask over ``F = max(1, floor(W / r))`` (f's largest value, alpha = 0)
or, with ``probe_filter="switch"``, the smallest of a few compiled sizes that holds f.

Here: ``spearman`` and ``filtered_size`` (traceable), ``filter_plan`` (the static sizes), and the
draft: ``resolve_draft`` (a model directory, ``@target``, or either truncated to its first N
layers) with the shared-tokenizer check ``check_same_tokenizer``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "check_same_tokenizer",
    "filter_plan",
    "filtered_size",
    "resolve_draft",
    "spearman",
    "truncated_copy",
]

TARGET_DRAFT = "@target"


def spearman(a_P: jax.Array, b_P: jax.Array) -> jax.Array:
    """Spearman rank correlation of two vectors (average ranks for ties); 0 where a side is
    constant (scipy gives nan there and nanoGCG would then fail; 0 = no agreement either way)."""

    def ranks(x):
        less = jnp.sum(x[None, :] < x[:, None], axis=1)
        same = jnp.sum(x[None, :] == x[:, None], axis=1)
        r = less.astype(jnp.float32) + (same.astype(jnp.float32) + 1.0) / 2.0
        return r - r.mean()

    ra, rb = ranks(a_P.astype(jnp.float32)), ranks(b_P.astype(jnp.float32))
    den = jnp.sqrt(jnp.sum(ra * ra) * jnp.sum(rb * rb))
    return jnp.where(den > 0, jnp.sum(ra * rb) / jnp.where(den > 0, den, 1.0), 0.0)


def filtered_size(rho: jax.Array, width: int, r: float) -> jax.Array:
    """nanoGCG's filtered-set size ``max(1, min(int((1 - alpha) * W / r), W))`` with
    ``alpha = (1 + rho) / 2`` (int32 scalar)."""
    alpha = (1.0 + rho) / 2.0
    f = jnp.floor((1.0 - alpha) * width / r).astype(jnp.int32)
    return jnp.clip(f, 1, width)


def filter_plan(width: int, r: float, n_sizes: int, granule: int = 1) -> tuple[int, ...]:
    """Static filtered-set sizes: the largest is F = max(1, floor(width / r)) rounded up to
    ``granule`` (the data devices); ``n_sizes`` evenly spaced sizes up to it (one size = mask)."""
    f_max = max(1, int(width // r))
    g = max(1, granule)
    n = max(1, min(n_sizes, f_max))
    sizes = {-(-f_max * k // n) for k in range(1, n + 1)}  # ceil(F * k / n)
    return tuple(sorted({-(-x // g) * g for x in sizes}))


def check_same_tokenizer(target_tok, draft_tok, draft_vocab: int, where: str) -> None:
    """One-line ValueError unless the draft tokenises exactly like the target (same vocabulary
    and ids) and its embedding table holds every id."""
    if draft_tok is not target_tok and draft_tok.get_vocab() != target_tok.get_vocab():
        raise ValueError(
            f"probe-sampling draft {where} has a different tokenizer from the target (vocab/ids "
            "differ); use a draft that shares the target's tokenizer"
        )
    if draft_vocab < len(target_tok):
        raise ValueError(
            f"probe-sampling draft {where} has {draft_vocab} embedding rows < the tokenizer's "
            f"{len(target_tok)} ids; use a draft built for this tokenizer"
        )


def truncated_copy(model, n_layers: int):
    """The decoder ``model`` with only its first ``n_layers`` blocks (same embeddings, final norm
    and head; LoRA factors kept): a draft that shares the target's tokenizer by construction."""
    total = int(model.cfg.num_layers)
    if not 1 <= n_layers <= total:
        raise ValueError(
            f"probe_draft_layers={n_layers} must be in 1..{total} (the draft's layers)"
        )
    if n_layers == total:
        return model
    cfg = model.cfg.replace(num_layers=n_layers)
    graphdef, state = nnx.split(model)
    lora = model.lora_config()

    def build():
        m = type(model)(cfg, rngs=nnx.Rngs(0))
        if lora is not None:
            m.add_lora(lora)
        return m

    new_def, _ = nnx.split(nnx.eval_shape(build))
    flat = nnx.to_flat_state(state)
    cut = [(k, v.replace(v[...][:n_layers]) if "layers" in k[:1] else v) for k, v in flat]
    del graphdef
    return nnx.merge(new_def, nnx.from_flat_state(cut))


_LOADED: dict = {}


def resolve_draft(cfg, model, tokenizer, given: tuple | None = None, mesh=None):
    """(draft model, draft tokenizer) of ``cfg`` (a ``GCGConfig``) or None when probe sampling is
    off. ``given`` = (model, tokenizer) is used as is; otherwise ``cfg.probe_draft``: a local
    model directory / GGUF file (loaded once per process, dtype and mesh) or ``"@target"`` (the
    attacked model itself, e.g. the current LoRA-adapted model in training). Then
    ``cfg.probe_draft_layers`` > 0 keeps only the draft's first N layers. The draft must share
    the target's tokenizer (one-line ValueError otherwise)."""
    if not cfg.probe_draft:
        if given is not None:
            raise ValueError("a probe-sampling draft was given but probe_draft is empty; set it")
        return None
    if given is not None:
        draft, draft_tok = given
    elif cfg.probe_draft == TARGET_DRAFT:
        draft, draft_tok = model, tokenizer
    else:
        key = (cfg.probe_draft, model.cfg.dtype, mesh)
        if key not in _LOADED:
            from mixat_jax.hf.load import load_pretrained  # lazy: only probe sampling loads a draft

            _LOADED[key] = load_pretrained(
                cfg.probe_draft, dtype=model.cfg.dtype, mesh=mesh, kind="causal"
            )
        draft, draft_tok = _LOADED[key]
    where = "(given)" if given is not None else repr(cfg.probe_draft)
    check_same_tokenizer(tokenizer, draft_tok, int(draft.cfg.vocab_size), where)
    if cfg.probe_draft_layers:
        draft = truncated_copy(draft, int(cfg.probe_draft_layers))
    return draft, draft_tok
