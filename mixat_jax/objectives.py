"""Low-level objectives shared by the attacks and training (MixAT spec §1, §4, §5, §11.15, §12).

Everything that scores target tokens of a batch of chat rows lives here, below both
``attacks/`` (the continuous attack's objective) and ``training/`` (C-AdvUL's cross entropies):

* :class:`TokenRows` — a batch of right-padded token rows ``[B, L]`` (ids, attention mask, the
  prompt positions an embedding attack perturbs, the target (label) positions); the record the
  training batches, the continuous attack and white-box evaluation pass around.
* Cross entropy with Hugging Face causal-LM semantics (spec §1): the logit at position t - 1
  predicts token t wherever ``target[t]`` is set, and a loss is the SUM over all target tokens of
  the whole (sub-)batch divided by their NUMBER (a token mean, not a mean of per-row means).
  Rows flagged invalid (``row_valid_B``) contribute nothing; no target tokens gives 0.
* Memory (DESIGN.md rule 4): :func:`sequence_logprobs` can gather the hidden states at the (at
  most ``max_targets``) predicting positions before the LM head, so a 128k vocabulary never
  materialises ``[B, L, V]`` logits for short targets.
* Input embeddings ``E[ids] (+ δ)`` in fp32 (spec §11.15) and ē = mean_v ‖E_v‖ (spec §1), the
  unit of the continuous attack's radius.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class TokenRows(NamedTuple):
    """A batch of right-padded token rows (a pytree; every field ``[B, L]``).

    ``ids_BxL`` token ids (int32); ``mask_BxL`` attention mask (True on real tokens);
    ``prompt_BxL`` the prompt positions (what the continuous attack perturbs: BOS, system prompt,
    chat template, instruction, assistant header — spec §11.4), None for rows nobody attacks
    (utility rows); ``target_BxL`` the label tokens (response + end of turn).
    """

    ids_BxL: jax.Array
    mask_BxL: jax.Array
    prompt_BxL: jax.Array | None
    target_BxL: jax.Array

    def check_shapes(self, who: str) -> None:
        """One-line ``ValueError`` naming ``who`` if a mask's shape differs from the ids'."""
        want = tuple(self.ids_BxL.shape)
        for name in ("mask_BxL", "prompt_BxL", "target_BxL"):
            arr = getattr(self, name)
            if arr is not None and tuple(arr.shape) != want:
                raise ValueError(f"{who}: {name} has shape {tuple(arr.shape)}, ids {want}")


# ------------------------------------------------------------------------------ embeddings
def mean_embedding_norm(E_VxD: jax.Array) -> jax.Array:
    """ē = mean over the whole vocabulary of the row L2 norms (fp32 scalar; spec §1)."""
    return jnp.mean(jnp.linalg.norm(E_VxD.astype(jnp.float32), axis=-1))


def input_embeddings(
    model,
    ids_BxL: jax.Array,
    delta_BxLxD: jax.Array | None = None,
    m_in_BxL: jax.Array | None = None,
) -> jax.Array:
    """``E[ids]`` (+ ``δ`` on the positions ``m_in``), in fp32 (spec §11.15)."""
    emb = model.embed(ids_BxL).astype(jnp.float32)
    if delta_BxLxD is None:
        return emb
    return emb + delta_BxLxD * m_in_BxL[..., None].astype(jnp.float32)


# ------------------------------------------------------------------------------ token log-probs
def token_logprobs(logits_BxTxV: jax.Array, labels_BxT: jax.Array) -> jax.Array:
    """log p(label) per position, in fp32 (logsumexp over V; no full log_softmax kept)."""
    logits = logits_BxTxV.astype(jnp.float32)
    picked_BxT = jnp.take_along_axis(logits, labels_BxT[..., None].astype(jnp.int32), axis=-1)
    return picked_BxT[..., 0] - jax.nn.logsumexp(logits, axis=-1)


def shifted_targets(
    ids_BxL: jax.Array, target_mask_BxL: jax.Array, row_valid_B: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """(labels_BxL-1, weight_BxL-1): the logit at t predicts ids[t + 1] where it is a target."""
    weight = target_mask_BxL[:, 1:].astype(bool)
    if row_valid_B is not None:
        weight = weight & row_valid_B.astype(bool)[:, None]
    return ids_BxL[:, 1:], weight


def token_mean(values_BxT: jax.Array, weight_BxT: jax.Array) -> jax.Array:
    """sum(values · weight) / sum(weight); 0 when there are no weighted tokens."""
    w = weight_BxT.astype(jnp.float32)
    count = jnp.sum(w)
    return jnp.sum(values_BxT * w) / jnp.maximum(count, 1.0)


def gathered_ce(logits_BxTxV: jax.Array, labels_BxT: jax.Array, weight_BxT: jax.Array) -> jax.Array:
    """Token-mean CE of already aligned logits/labels (e.g. logits gathered at target positions)."""
    return token_mean(-token_logprobs(logits_BxTxV, labels_BxT), weight_BxT)


def masked_ce(
    logits_BxLxV: jax.Array,
    ids_BxL: jax.Array,
    target_mask_BxL: jax.Array,
    row_valid_B: jax.Array | None = None,
) -> jax.Array:
    """HF-style shifted CE: token mean over the target tokens of the (valid rows of the) batch."""
    if logits_BxLxV.shape[:2] != ids_BxL.shape or ids_BxL.shape != target_mask_BxL.shape:
        raise ValueError(
            f"masked_ce needs logits [B, L, V] and ids/target_mask [B, L]; got "
            f"{logits_BxLxV.shape}, {ids_BxL.shape}, {target_mask_BxL.shape}"
        )
    labels, weight = shifted_targets(ids_BxL, target_mask_BxL, row_valid_B)
    return gathered_ce(logits_BxLxV[:, :-1], labels, weight)


# ------------------------------------------------------------------------------ gathered targets
def target_positions(
    ids_BxL: jax.Array,
    target_mask_BxL: jax.Array,
    row_valid_B: jax.Array | None,
    max_targets: int,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The first ``max_targets`` predicting positions of every row, in order.

    Returns ``(pred_pos_BxT, labels_BxT, weight_BxT, num_dropped)``: the logit at ``pred_pos``
    predicts ``labels``; ``weight`` is False on padding slots; ``num_dropped`` counts target
    tokens beyond the budget (they are not in the loss — log it, size the budget so it stays 0).
    """
    labels_all, weight_all = shifted_targets(ids_BxL, target_mask_BxL, row_valid_B)
    n = labels_all.shape[1]
    t = min(int(max_targets), n)
    if t < 1:
        raise ValueError(f"max_targets must be >= 1; got {max_targets}")
    idx = jnp.arange(n, dtype=jnp.int32)
    order_key_BxN = jnp.where(weight_all, idx, idx + n)  # targets first, each group in order
    pred_pos_BxT = jnp.argsort(order_key_BxN, axis=-1, stable=True)[:, :t].astype(jnp.int32)
    labels_BxT = jnp.take_along_axis(labels_all, pred_pos_BxT, axis=1)
    weight_BxT = jnp.take_along_axis(weight_all, pred_pos_BxT, axis=1)
    num_dropped = jnp.sum(weight_all) - jnp.sum(weight_BxT)
    return pred_pos_BxT, labels_BxT, weight_BxT, num_dropped


def sequence_logprobs(
    model,
    emb_BxLxD: jax.Array,
    mask_BxL: jax.Array,
    ids_BxL: jax.Array,
    target_mask_BxL: jax.Array,
    row_valid_B: jax.Array | None = None,
    *,
    dropout_key: jax.Array | None = None,
    max_targets: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Runs ``model.forward`` on embeddings; (logp_BxT, weight_BxT, num_dropped) of the targets.

    ``max_targets=None``: logits at every position (exact for any number of targets);
    an int: logits only at the first ``max_targets`` predicting positions of each row.
    """
    if max_targets is None:
        logits, _ = model.forward(emb_BxLxD, mask_BxL, dropout_key=dropout_key)
        labels, weight = shifted_targets(ids_BxL, target_mask_BxL, row_valid_B)
        return token_logprobs(logits[:, :-1], labels), weight, jnp.zeros((), jnp.int32)
    pos, labels, weight, dropped = target_positions(
        ids_BxL, target_mask_BxL, row_valid_B, max_targets
    )
    logits, _ = model.forward(emb_BxLxD, mask_BxL, logits_at_BxT=pos, dropout_key=dropout_key)
    return token_logprobs(logits, labels), weight, dropped.astype(jnp.int32)


def sequence_ce(model, emb_BxLxD, mask_BxL, ids_BxL, target_mask_BxL, row_valid_B=None, **kw):
    """Token-mean CE of the targets given input embeddings; see :func:`sequence_logprobs`."""
    logp, weight, _ = sequence_logprobs(
        model, emb_BxLxD, mask_BxL, ids_BxL, target_mask_BxL, row_valid_B, **kw
    )
    return token_mean(-logp, weight)
