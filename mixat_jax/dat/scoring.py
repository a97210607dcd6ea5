"""Scoring Stage A candidates with the target model and the judge (DAT spec §2.2 step 4).

* Target loss `L_tgt(x) = CE(y | chat(x))`: the inpainted prompt x is the user message of the
  target model's chat template and the target y the assistant response, exactly as a training
  row (`ChatRenderer.example`; the response tokens plus the end-of-turn tokens the template
  writes after them are the labels); the per-row token-mean CE, teacher forced, in ONE jitted
  call per work unit (rows padded to the unit's batch size, lengths to multiples of 64, the LM
  head only at the label positions).
* Greedy completion of up to `max_new_tokens` tokens (`sampling.generate_tokens`, KV cache,
  stop at EOS / end of turn) in fixed-size batches of `gen_batch_size` rows.
* `judge_scores`: the configured judge against the ORIGINAL behaviour (spec §2.2 step 4), as a
  score in [0, 1]: StrongREJECT's rubric score (0 for an unparsable or empty answer); 1 / 0 for
  the label of the HarmBench classifier and the refusal / keyword judges.

Inputs are sharded over the batch axes of `mesh` (a process-local mesh: every process scores its
own units); a row's result depends only on the rows of its unit, never on other units.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixat_jax import mesh as mesh_lib
from mixat_jax.chat import ChatRenderer, pad_token_id
from mixat_jax.judges.base import HARMFUL
from mixat_jax.objectives import sequence_logprobs
from mixat_jax.sampling import generate_tokens, left_pad

LENGTH_MULTIPLE = 64  # few distinct shapes: one compile each
TARGET_MULTIPLE = 16


def bucket(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_targets"))
def row_target_ce(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    ids_BxL: jax.Array,
    mask_BxL: jax.Array,
    target_BxL: jax.Array,
    *,
    max_targets: int,
) -> jax.Array:
    """Per-row token-mean CE of the target tokens, [B] fp32 (HF shift: logit t predicts t + 1)."""
    model = nnx.merge(graphdef, state)
    logp_BxT, weight_BxT, _ = sequence_logprobs(
        model, model.embed(ids_BxL), mask_BxL, ids_BxL, target_BxL, max_targets=max_targets
    )
    w_BxT = weight_BxT.astype(jnp.float32)
    return -jnp.sum(logp_BxT * w_BxT, axis=-1) / jnp.maximum(jnp.sum(w_BxT, axis=-1), 1.0)


def pack_loss_rows(
    rows: Sequence[tuple[list[int], list[bool]]], batch_rows: int, pad_id: int
) -> tuple[dict[str, np.ndarray], int]:
    """(ids, target-label) rows -> one right-padded ``batch_rows`` batch (the last row repeated
    to fill it; length bucketed by LENGTH_MULTIPLE) and the bucketed target count for
    ``row_target_ce(max_targets=...)``."""
    rows = list(rows) + [rows[-1]] * (batch_rows - len(rows))
    length = bucket(max(len(ids) for ids, _ in rows), LENGTH_MULTIPLE)
    max_targets = min(bucket(max(sum(m) for _, m in rows), TARGET_MULTIPLE), length - 1)
    ids_BxL = np.full((batch_rows, length), pad_id, np.int32)
    mask_BxL = np.zeros((batch_rows, length), bool)
    target_BxL = np.zeros((batch_rows, length), bool)
    for i, (row, labels) in enumerate(rows):
        ids_BxL[i, : len(row)] = row
        mask_BxL[i, : len(row)] = True
        target_BxL[i, : len(row)] = labels
    return {"ids": ids_BxL, "mask": mask_BxL, "target": target_BxL}, max_targets


class TargetScorer:
    """Target loss and greedy completions of inpainted prompts on a causal chat model."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_new_tokens: int,
        gen_batch_size: int,
        system_prompt: str | None = None,
        mesh: Any = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.renderer = ChatRenderer(tokenizer, system_prompt=system_prompt)
        self.max_new_tokens = int(max_new_tokens)
        self.gen_batch_size = int(gen_batch_size)
        self.mesh = mesh
        self.graphdef, self.state = nnx.split(model)
        if mesh is not None:
            self.state = jax.device_put(self.state, mesh_lib.state_shardings(self.state, mesh))
        self.pad_id = pad_token_id(tokenizer)
        self.stop_ids = jnp.asarray(self.renderer.stop_ids() or [-1], jnp.int32)

    def _place(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        if self.mesh is None:
            return {k: jnp.asarray(v) for k, v in batch.items()}
        return mesh_lib.shard_batch(batch, self.mesh)

    # ---------------------------------------------------------------- target loss
    def loss_row(self, prompt: str, target: str) -> tuple[list[int], list[bool]]:
        """(ids, label mask) of the training-style row `[chat(prompt) | target + end of turn]`."""
        try:
            ex = self.renderer.example(prompt, target)
            return list(ex.ids), list(ex.response_mask)
        except ValueError:  # the tokenizer merges across the prompt/response boundary
            ids = self.renderer.prompt_ids(prompt)
            resp = list(self.tokenizer(target, add_special_tokens=False)["input_ids"])
            return ids + resp, [False] * len(ids) + [True] * len(resp)

    def target_losses(
        self, prompts: Sequence[str], targets: Sequence[str], batch_rows: int
    ) -> np.ndarray:
        """Token-mean target CE of each (prompt, target), one call of `batch_rows` rows."""
        n = len(prompts)
        if not 1 <= n <= batch_rows:
            raise ValueError(f"target_losses: {n} rows for a batch of {batch_rows}")
        rows = [self.loss_row(p, t) for p, t in zip(prompts, targets, strict=True)]
        batch, max_targets = pack_loss_rows(rows, batch_rows, self.pad_id)
        b = self._place(batch)
        ce = row_target_ce(self.graphdef, self.state, b["ids"], b["mask"], b["target"],
                           max_targets=max_targets)  # fmt: skip
        return np.asarray(ce, np.float64)[:n]

    # ---------------------------------------------------------------- greedy completions
    def completions(self, prompts: Sequence[str]) -> list[str]:
        """Greedy chat completions of the prompts, in batches of `gen_batch_size` rows."""
        encoded = [self.renderer.prompt_ids(p) for p in prompts]
        out: list[str] = []
        key = jax.random.key(0)  # unused at temperature 0
        for start in range(0, len(encoded), self.gen_batch_size):
            chunk = encoded[start : start + self.gen_batch_size]
            n = len(chunk)
            chunk = chunk + [chunk[-1]] * (self.gen_batch_size - n)
            ids, mask = left_pad(chunk, self.pad_id, bucket(max(map(len, chunk)), LENGTH_MULTIPLE))
            b = self._place({"ids": ids, "mask": mask})
            toks, lens = generate_tokens(
                self.graphdef, self.state, b["ids"], b["mask"], key, self.stop_ids,
                jnp.float32(0.0), jnp.float32(1.0), jnp.int32(self.pad_id),
                max_new_tokens=self.max_new_tokens,
            )  # fmt: skip
            toks, lens = np.asarray(toks), np.asarray(lens)
            out += [
                self.tokenizer.decode(toks[i, : lens[i]].tolist(), skip_special_tokens=True)
                for i in range(n)
            ]
        return out


def judge_scores(judge: Any, behaviors: Sequence[Any], completions: Sequence[str]) -> list[float]:
    """Judge score in [0, 1] per completion (see module doc)."""
    scores = []
    for j in judge.judge(list(behaviors), list(completions)):
        if "score" in j.meta:
            s = float(j.meta["score"])
        else:
            s = 1.0 if j.label == HARMFUL else 0.0
        scores.append(min(1.0, max(0.0, s)))
    return scores
