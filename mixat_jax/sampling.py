"""Batched, jitted text generation with a KV cache (greedy, temperature, top-p; EOS/end-of-turn stop).

`generate_tokens` is a pure function of (graphdef, state, left-padded prompt ids): one prefill
pass writes the prompt into the cache, then a `lax.while_loop` decodes one token per step and
stops as soon as every row has emitted a stop token. `TextGenerator` wraps it for the attacks,
judges and evaluation (the interface in WORKSPACE.md): it renders chat prompts, buckets prompt
lengths and batch sizes (few compiles), and decodes completions. Also provides next-token
log-probabilities (classifier judges) and continuation log-likelihoods (multiple-choice utility).
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


def sample_logits(logits_BxV: jax.Array, key: jax.Array, temperature, top_p) -> jax.Array:
    """Greedy when temperature == 0, else nucleus sampling at `temperature`/`top_p`."""
    greedy = jnp.argmax(logits_BxV, axis=-1)
    t = jnp.maximum(jnp.asarray(temperature, jnp.float32), 1e-6)
    logits = logits_BxV / t
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
    sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)
    choice = jax.random.categorical(key, sorted_logits, axis=-1)
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
    *,
    max_new_tokens: int,
) -> tuple[jax.Array, jax.Array]:
    """Returns (tokens [B, T] with `pad_id` after the stop token, lengths [B] excluding it).

    Prompts must be LEFT-padded so that position P-1 is real for every row. `emb_BxPxD`, if given,
    replaces the prompt's token embeddings (e.g. a continuous-attack perturbed prompt).
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
        key, sub = jax.random.split(key)
        tok = sample_logits(logits[:, 0], sub, temperature, top_p).astype(jnp.int32)
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
        seed: int = 0,
    ) -> list[list[int]]:
        results: list[list[int]] = []
        key = jax.random.key(seed)
        for start in range(0, len(prompt_ids), self.batch_size):
            chunk = list(prompt_ids[start : start + self.batch_size])
            n = len(chunk)
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
                jax.random.fold_in(key, start),
                self.stop_ids,
                jnp.float32(temperature),
                jnp.float32(top_p),
                jnp.int32(self.pad_id),
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
        seed: int = 0,
        chat: bool = True,
    ) -> list[str]:
        ids = self.encode_prompts(prompts, chat=chat)
        outs = self.generate_ids(
            ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
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
