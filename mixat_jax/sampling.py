"""Batched, jitted text generation with a KV cache (greedy, temperature, top-k, top-p;
EOS/end-of-turn stop).

`generate_tokens` is a pure function of (graphdef, state, left-padded prompt ids): one prefill
pass writes the prompt into the cache, then a `lax.while_loop` decodes one token per step and
stops as soon as every row has emitted a stop token. `TextGenerator` wraps it for the attacks,
judges and evaluation (the interface in WORKSPACE.md): it renders chat prompts, buckets prompt
lengths and batch sizes (few compiles), and decodes completions. Also provides next-token
log-probabilities (classifier judges) and continuation log-likelihoods (multiple-choice utility).

Random streams (issue #17): `generate_tokens` takes one key for the batch or one key per row; a
row key is folded with the decoding step, so a row's samples depend only on its own key and its
logits, not on the other rows of its batch. `TextGenerator.generate(..., seeds=[...])` gives
every prompt its own seed (the evaluation derives it from the record's identity, so a resumed or
re-batched run draws the same samples).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixat_jax.chat import ChatRenderer, pad_token_id
from mixat_jax.hf.load import load_pretrained
from mixat_jax.models.decoder import Decoder


def sample_logits(logits_BxV: jax.Array, key: jax.Array, temperature, top_p, top_k=0) -> jax.Array:
    """Greedy when temperature == 0, else sampling at `temperature` from the `top_k` most likely
    tokens (0 = all; HF order: top-k first, then top-p) restricted to the nucleus `top_p`.
    `key`: one key for the batch, or one key per row (shape [B])."""
    greedy = jnp.argmax(logits_BxV, axis=-1)
    t = jnp.maximum(jnp.asarray(temperature, jnp.float32), 1e-6)
    logits = logits_BxV / t
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    rank = jnp.arange(sorted_logits.shape[-1])
    k = jnp.asarray(top_k, jnp.int32)
    sorted_logits = jnp.where((k <= 0) | (rank < k), sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
    sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)
    if key.ndim == 0:
        choice = jax.random.categorical(key, sorted_logits, axis=-1)
    else:
        choice = jax.vmap(jax.random.categorical)(key, sorted_logits)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
    return jnp.where(temperature > 0, sampled, greedy)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def generate_tokens(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    ids_BxP: jax.Array,
    mask_BxP: jax.Array,
    key: jax.Array,
    stop_ids: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    pad_id: jax.Array,
    emb_BxPxD: jax.Array | None = None,
    top_k: jax.Array | int = 0,
    *,
    max_new_tokens: int,
) -> tuple[jax.Array, jax.Array]:
    """Returns (tokens [B, T] with `pad_id` after the stop token, lengths [B] excluding it).

    Prompts must be LEFT-padded so that position P-1 is real for every row. `emb_BxPxD`, if given,
    replaces the prompt's token embeddings (e.g. a continuous-attack perturbed prompt). `key`:
    one key (split per step) or one key per row (shape [B]; step t samples with fold_in(key, t)).
    """
    model: Decoder = nnx.merge(graphdef, state)
    b, p = ids_BxP.shape
    cache = model.init_cache(b, p + max_new_tokens)
    last = jnp.full((b, 1), p - 1, jnp.int32)
    emb = model.embed(ids_BxP) if emb_BxPxD is None else emb_BxPxD
    logits, cache = model.forward(emb, mask_BxP, cache=cache, logits_at_BxT=last)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    done = jnp.zeros((b,), bool)
    lengths = jnp.zeros((b,), jnp.int32)

    def cond(carry):
        t, _, _, _, done, _, _ = carry
        return (t < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        t, cache, logits, out, done, lengths, key = carry
        if key.ndim == 0:
            key, sub = jax.random.split(key)
        else:
            sub = jax.vmap(jax.random.fold_in, in_axes=(0, None))(key, t)
        tok = sample_logits(logits[:, 0], sub, temperature, top_p, top_k).astype(jnp.int32)
        is_stop = jnp.isin(tok, stop_ids)
        tok = jnp.where(done, pad_id, tok)
        out = out.at[:, t].set(jnp.where(is_stop | done, pad_id, tok))
        lengths = lengths + (~done & ~is_stop)
        done = done | is_stop
        logits, cache = model.forward(
            model.embed(tok[:, None]), jnp.ones((b, 1), bool), cache=cache, cache_index=p + t
        )
        return t + 1, cache, logits, out, done, lengths, key

    carry = (jnp.int32(0), cache, logits, out, done, lengths, key)
    _, _, _, out, _, lengths, _ = jax.lax.while_loop(cond, body, carry)
    return out, lengths


def _bucket(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def left_pad(
    seqs: Sequence[Sequence[int]], pad_id: int, length: int
) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(seqs), length), pad_id, np.int32)
    mask = np.zeros((len(seqs), length), bool)
    for i, s in enumerate(seqs):
        if len(s) > length:
            raise ValueError(f"prompt of {len(s)} tokens exceeds the length budget {length}")
        if len(s):
            ids[i, length - len(s) :] = s
            mask[i, length - len(s) :] = True
    return ids, mask


class TextGenerator:
    """Batched generation over a (possibly LoRA-adapted) decoder and its tokenizer."""

    def __init__(
        self,
        model: Decoder,
        tokenizer,
        *,
        batch_size: int = 8,
        length_multiple: int = 32,
        system_prompt: str | None = None,
        max_prompt_tokens: int = 2048,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.renderer = ChatRenderer(tokenizer, system_prompt=system_prompt)
        self.batch_size = batch_size
        self.length_multiple = length_multiple
        self.max_prompt_tokens = max_prompt_tokens
        self.graphdef, self.state = nnx.split(model)
        self.pad_id = pad_token_id(tokenizer)
        self.stop_ids = jnp.asarray(self.renderer.stop_ids() or [-1], jnp.int32)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, adapter=None, dtype=None, mesh=None, **kw):
        model, tok = load_pretrained(path, adapter=adapter, dtype=dtype, mesh=mesh, kind="causal")
        return cls(model, tok, **kw)

    def refresh(self, model: Decoder | None = None) -> None:
        """Re-reads parameters (e.g. after training updated the LoRA state)."""
        self.model = model or self.model
        self.graphdef, self.state = nnx.split(self.model)

    def encode_prompts(self, prompts: Sequence[str], chat: bool = True) -> list[list[int]]:
        if chat:
            return [self.renderer.prompt_ids(p) for p in prompts]
        return [self.tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]

    def generate_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        seeds: Sequence[int] | None = None,
    ) -> list[list[int]]:
        """`seeds` (one per prompt): each row samples from its own key, so its tokens do not
        depend on the batch it lands in; else one key per batch derived from `seed`."""
        if seeds is not None and len(seeds) != len(prompt_ids):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompt_ids)} prompts; pass one each")
        results: list[list[int]] = []
        key = jax.random.key(seed)
        for start in range(0, len(prompt_ids), self.batch_size):
            chunk = list(prompt_ids[start : start + self.batch_size])
            n = len(chunk)
            if seeds is None:
                keys = jax.random.fold_in(key, start)
            else:
                row_seeds = list(seeds[start : start + n])
                row_seeds += [row_seeds[-1]] * (self.batch_size - n)
                keys = jax.vmap(jax.random.key)(jnp.asarray(row_seeds, jnp.uint32))
            longest = max(len(c) for c in chunk)
            if longest > self.max_prompt_tokens:
                raise ValueError(
                    f"prompt of {longest} tokens exceeds max_prompt_tokens={self.max_prompt_tokens}"
                )
            chunk += [chunk[-1]] * (self.batch_size - n)
            ids, mask = left_pad(chunk, self.pad_id, _bucket(longest, self.length_multiple))
            toks, lens = generate_tokens(
                self.graphdef,
                self.state,
                jnp.asarray(ids),
                jnp.asarray(mask),
                keys,
                self.stop_ids,
                jnp.float32(temperature),
                jnp.float32(top_p),
                jnp.int32(self.pad_id),
                top_k=jnp.int32(top_k),
                max_new_tokens=int(max_new_tokens),
            )
            toks, lens = np.asarray(toks), np.asarray(lens)
            results += [toks[i, : lens[i]].tolist() for i in range(n)]
        return results

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        seeds: Sequence[int] | None = None,
        chat: bool = True,
    ) -> list[str]:
        ids = self.encode_prompts(prompts, chat=chat)
        outs = self.generate_ids(
            ids,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            seeds=seeds,
        )
        return [self.tokenizer.decode(o, skip_special_tokens=True) for o in outs]

    # ---------------------------------------------------------------- scoring
    def _score_batch(self, seqs: list[list[int]], positions: list[list[int]]) -> list[np.ndarray]:
        """Log-softmax rows at the requested positions (right-padded forward, no cache)."""
        out = []
        for start in range(0, len(seqs), self.batch_size):
            chunk = seqs[start : start + self.batch_size]
            pos = positions[start : start + self.batch_size]
            n = len(chunk)
            chunk = chunk + [chunk[-1]] * (self.batch_size - n)
            pos = pos + [pos[-1]] * (self.batch_size - n)
            length = _bucket(max(len(c) for c in chunk), self.length_multiple)
            t = _bucket(max(len(p) for p in pos), 8)
            ids = np.full((len(chunk), length), self.pad_id, np.int32)
            mask = np.zeros((len(chunk), length), bool)
            at = np.zeros((len(chunk), t), np.int32)
            for i, (c, p) in enumerate(zip(chunk, pos, strict=True)):
                ids[i, : len(c)] = c
                mask[i, : len(c)] = True
                at[i, : len(p)] = p
            lp = np.asarray(_logprobs_at(self.graphdef, self.state, ids, mask, at))
            out += [lp[i, : len(pos[i])] for i in range(n)]
        return out

    def next_token_logprobs(
        self, prompts: Sequence[str], candidates: Sequence[str]
    ) -> list[dict[str, float]]:
        """For raw-text prompts: log p(first token of each candidate string) at the next position."""
        cand_ids = {}
        for c in candidates:
            ids = self.tokenizer(c, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"candidate {c!r} tokenises to nothing")
            cand_ids[c] = ids[0]
        seqs = self.encode_prompts(prompts, chat=False)
        rows = self._score_batch(seqs, [[len(s) - 1] for s in seqs])
        return [{c: float(r[0, i]) for c, i in cand_ids.items()} for r in rows]

    def loglik(self, contexts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        """Sum of log p(continuation tokens | context), contexts as raw text."""
        seqs, pos, targets = [], [], []
        for ctx, cont in zip(contexts, continuations, strict=True):
            c = self.tokenizer(ctx, add_special_tokens=True)["input_ids"]
            full = self.tokenizer(ctx + cont, add_special_tokens=True)["input_ids"]
            k = len(c)
            while k > 0 and full[:k] != c[:k]:
                k -= 1
            k = max(k, 1)
            seqs.append(full)
            pos.append(list(range(k - 1, len(full) - 1)))
            targets.append(full[k:])
        rows = self._score_batch(seqs, pos)
        return [
            float(sum(r[j, t] for j, t in enumerate(tg)))
            for r, tg in zip(rows, targets, strict=True)
        ]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _logprobs_at(graphdef, state, ids_BxL, mask_BxL, at_BxT) -> jax.Array:
    model: Decoder = nnx.merge(graphdef, state)
    logits = model.apply_embeddings(model.embed(ids_BxL), mask_BxL, logits_at_BxT=at_BxT)
    return jax.nn.log_softmax(logits, axis=-1)
