"""lm-evaluation-harness model class over the jitted decoder (issue #13, "ARC-Easy/Challenge and
MMLU through lm-evaluation-harness"; spec mixat.md §8.2, dat.md §4.4: utility is the harness's
own 0-shot numbers).

`MixatLM` subclasses `lm_eval.api.model.LM` and is registered as ``mixat_jax`` once this module
is imported (then ``simple_evaluate(model="mixat_jax", model_args="pretrained=DIR,adapter=DIR")``
works too; the entry point `mixat_jax.lm_eval` passes an instance):
  * `loglikelihood`: sum of log p(continuation tokens | context) and whether every continuation
    token is the argmax, batched and jitted (`continuation_scores`). Tokenization follows the
    harness's causal HF model: trailing context whitespace moves to the continuation, context +
    continuation is encoded whole and split at the encoded context's length; an empty context is
    the prefix token (BOS, else EOS); the sequence keeps its last ``max_length + 1`` tokens.
  * `loglikelihood_rolling`: the harness's disjoint rolling windows, each scored as above.
  * `generate_until`: greedy (or sampled, ``do_sample``) continuation of the raw context by the
    project's jitted sampler (`TextGenerator.generate_ids`), cut at the first stop string.
Model + adapter load through `TextGenerator.from_pretrained` (hf/load.py `load_pretrained`).
lm-eval is an optional dependency (``pip install 'lm-eval>=0.4.9'``); only the entry point and
tests import this module.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval import evaluator
from lm_eval import utils as harness_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.tasks import TaskManager
from tqdm import tqdm

from mixat_jax.models.decoder import Decoder
from mixat_jax.sampling import TextGenerator


@functools.partial(jax.jit, static_argnames=("graphdef",))
def continuation_scores(
    graphdef, state, ids_BxL, mask_BxL, at_BxT, targets_BxT, tmask_BxT
) -> tuple[jax.Array, jax.Array]:
    """(sum of log p(targets_BxT at positions at_BxT) over tmask_BxT, all-argmax) per row."""
    model: Decoder = nnx.merge(graphdef, state)
    logits_BxTxV = model.apply_embeddings(model.embed(ids_BxL), mask_BxL, logits_at_BxT=at_BxT)
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    tok_BxT = jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    greedy_BxT = jnp.argmax(logp_BxTxV, axis=-1) == targets_BxT
    return (
        jnp.sum(jnp.where(tmask_BxT, tok_BxT, 0.0), axis=-1),
        jnp.all(greedy_BxT | ~tmask_BxT, axis=-1),
    )


def task_manager(tasks: Sequence[str], include_path: str | None) -> Any:
    """The harness's TaskManager for `tasks`: `include_path` alone when it has every task
    (indexing the harness's own YAMLs takes ~20 s), else with the defaults; a one-line
    ValueError naming unknown tasks."""
    manager = None
    if include_path:
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if any(not manager.match_tasks([t]) for t in tasks):
            manager = None
    manager = manager or TaskManager(include_path=include_path or None)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise ValueError(f"unknown harness task(s) {unknown}; check the task names / include_path")
    return manager


def evaluate_tasks(
    lm: LM,
    tasks: Sequence[str],
    *,
    manager: Any,
    num_fewshot: int = 0,
    limit: int | None = None,
    seed: int = 1234,
) -> dict[str, Any]:
    """The harness's results dict of `tasks` on `lm` (the one call `python -m mixat_jax.lm_eval`
    and the evaluation pipeline's lm-eval stage share)."""
    return evaluator.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        fewshot_random_seed=seed,
    )


def _bucket(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


@register_model("mixat_jax")
class MixatLM(LM):
    """The harness's view of a mixat_jax decoder (+ LoRA adapter); see the module docstring."""

    def __init__(
        self,
        pretrained: str | None = None,
        adapter: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 8,
        max_length: int | str = 2048,
        max_gen_toks: int | str = 256,
        generator: TextGenerator | None = None,
        **harness_extras: Any,  # the harness also passes device, max_batch_size (unused here)
    ) -> None:
        super().__init__()
        if batch_size in (None, "auto"):  # the harness passes None; "auto" is not searched here
            batch_size = 8
        bs, self.max_length, self.max_gen_toks = int(batch_size), int(max_length), int(max_gen_toks)
        if bs < 1 or self.max_length < 2 or self.max_gen_toks < 1:
            raise ValueError(
                f"batch_size={bs}, max_length={self.max_length}, max_gen_toks="
                f"{self.max_gen_toks}: need batch_size >= 1, max_length >= 2, max_gen_toks >= 1"
            )
        if generator is None:
            if not pretrained:
                raise ValueError("the mixat_jax harness model needs pretrained=DIR (the model)")
            generator = TextGenerator.from_pretrained(
                pretrained, adapter=adapter or None, dtype=dtype or None, batch_size=bs,
                max_prompt_tokens=self.max_length,
            )  # fmt: skip
        self.gen = generator
        self.gen.batch_size = bs
        self.gen.max_prompt_tokens = self.max_length
        self.tokenizer = generator.tokenizer

    # ------------------------------------------------------------------ tokenization
    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos if bos is not None else self.tokenizer.eos_token_id)

    def tok_encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        bos = self.tokenizer.bos_token
        if add_special_tokens and bos and text.startswith(bos):
            add_special_tokens = False  # the text already carries BOS
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context tokens, continuation tokens) the way the harness's causal HF model splits."""
        if context == "":
            cont = self.tok_encode(continuation, add_special_tokens=False)
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx) :]

    # ------------------------------------------------------------------ scoring
    def score_tokens(
        self, pairs: Sequence[tuple[list[int], list[int]]], disable_tqdm: bool = True
    ) -> list[tuple[float, bool]]:
        """(sum log p(cont | ctx), cont is greedy) per (ctx tokens, cont tokens) pair; the
        sequence keeps its last ``max_length + 1`` tokens (the harness's truncation)."""
        rows = []
        for ctx, cont in pairs:
            if not cont:
                raise ValueError("a continuation tokenises to nothing; nothing to score")
            full = (list(ctx) + list(cont))[-(self.max_length + 1) :]
            n = min(len(cont), len(full) - 1)
            rows.append((full[:-1], full[-n:]))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        bs = self.gen.batch_size
        g = self.gen
        for start in tqdm(
            range(0, len(order), bs), desc="loglikelihood batches", disable=disable_tqdm
        ):
            idx = order[start : start + bs]
            chunk = [rows[i] for i in idx] + [rows[idx[-1]]] * (bs - len(idx))
            length = _bucket(max(len(inp) for inp, _ in chunk), g.length_multiple)
            t = _bucket(max(len(tg) for _, tg in chunk), 8)
            ids = np.full((bs, length), g.pad_id, np.int32)
            mask = np.zeros((bs, length), bool)
            at = np.zeros((bs, t), np.int32)
            targets = np.zeros((bs, t), np.int32)
            tmask = np.zeros((bs, t), bool)
            for r, (inp, tg) in enumerate(chunk):
                ids[r, : len(inp)] = inp
                mask[r, : len(inp)] = True
                at[r, : len(tg)] = np.arange(len(inp) - len(tg), len(inp))
                targets[r, : len(tg)] = tg
                tmask[r, : len(tg)] = True
            lp, greedy = continuation_scores(g.graphdef, g.state, ids, mask, at, targets, tmask)
            lp, greedy = np.asarray(lp), np.asarray(greedy)
            for r, i in enumerate(idx):
                out[i] = (float(lp[r]), bool(greedy[r]))
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*req.args) for req in requests]
        return self.score_tokens(pairs, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for k, req in enumerate(requests):
            (text,) = req.args[:1]
            for w in harness_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text, add_special_tokens=False),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            ):
                windows.append(harness_utils.make_disjoint_window(w))
                owner.append(k)
        scores = self.score_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for k, (lp, _) in zip(owner, scores, strict=True):
            totals[k] += lp
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests with equal generation settings run as one batched `generate_ids` call."""
        groups: dict[tuple, list[int]] = {}
        settings = []
        for k, req in enumerate(requests):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = (until,) if isinstance(until, str) else tuple(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            sample = bool(kwargs.get("do_sample", False))
            temperature = float(kwargs.get("temperature", 1.0)) if sample else 0.0
            top_p = float(kwargs.get("top_p") or 1.0)
            ids = self.tok_encode(context)[-max(1, self.max_length - max_new) :]
            settings.append((ids, until))
            groups.setdefault((max_new, temperature, top_p), []).append(k)
        out = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for (max_new, temperature, top_p), idx in groups.items():
            toks = self.gen.generate_ids(
                [settings[k][0] for k in idx],
                max_new_tokens=max_new,
                temperature=temperature,
                top_p=top_p,
            )
            for k, t in zip(idx, toks, strict=True):
                text = self.tokenizer.decode(t, skip_special_tokens=True)
                cuts = [text.index(s) for s in settings[k][1] if s and s in text]
                out[k] = text[: min(cuts)] if cuts else text
            bar.update(len(idx))
        bar.close()
        return out
