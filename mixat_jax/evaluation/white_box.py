"""White-box evaluation attacks on the JAX target model: GCG and the continuous embedding attack
as evaluation attacks, and the target cross-entropy AutoDAN's fitness needs.

* `TargetCE` is AutoDAN's fitness (spec mixat.md §8.1; HarmBench AutoDAN scores candidates by the
  target model's loss on the target string): each prompt is rendered with the chat template as
  `ChatRenderer.example(prompt, target)` and the token-mean CE of the target tokens (the
  response tokens without the end-of-turn tokens the template appends) is computed in batches
  with the decoder (logits only at target positions).
* `continuous_completions` runs the continuous attack of spec mixat.md §5
  (`attacks.continuous.continuous_attack`: signed-gradient PGD in the per-token L2 ball of radius
  eps·ē on every prompt position) on `[prompt | target]` rows, then generates greedily from the
  perturbed prompt embeddings with `sampling.generate_tokens`: prompts are left-padded so that
  each ends at position P-1 and δ is moved from the attack's right-padded layout to that
  left-padded layout. Evaluation differs from training in two deliberate ways: no LoRA dropout
  (the evaluated model is deterministic) and the target mask excludes the end-of-turn tokens
  (an attack that also pushes towards ending the turn right after "Sure, here is ..." would
  suppress the harmful continuation it is meant to elicit). `ContinuousAttack` gives these as
  test cases that carry their completions.
* `GCGAttack` is HarmBench-style GCG (spec mixat.md §6.4, `attacks.gcg_driver.run_gcg_batch`):
  the test case is the request with the optimised string after one space.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixat_jax import lora as lora_lib
from mixat_jax.attacks.continuous import continuous_attack
from mixat_jax.attacks.direct import behavior_with_context
from mixat_jax.attacks.gcg_driver import run_gcg_batch
from mixat_jax.attacks.gcg_presets import GCGConfig
from mixat_jax.attacks.llm_interface import TestCase
from mixat_jax.objectives import TokenRows, mean_embedding_norm, sequence_logprobs
from mixat_jax.sampling import generate_tokens, left_pad


def _bucket(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def target_span(renderer: Any, prompt: str, target: str) -> tuple[list[int], int, int]:
    """(ids of the rendered `[prompt | target]` without trailing end-of-turn tokens, prompt
    length, number of target tokens)."""
    tokenizer = renderer.tokenizer
    if not target or not target.strip():
        raise ValueError("the target string is empty; give every behaviour a target")
    try:
        ex = renderer.example(prompt, target)
        ids, p_len = list(ex.ids), ex.prompt_len
        resp = ids[p_len:]
    except ValueError:  # the tokenizer merges across the prompt/response boundary
        ids = renderer.prompt_ids(prompt)
        p_len = len(ids)
        resp = list(tokenizer(target, add_special_tokens=False)["input_ids"])
        ids = ids + resp
    n_t = len(tokenizer(target, add_special_tokens=False)["input_ids"])
    n_t = max(1, min(n_t, len(resp)))
    want = target.strip()
    if tokenizer.decode(resp[:n_t], skip_special_tokens=True).strip() != want:
        for k in range(1, len(resp) + 1):  # in-context tokenisation differs: find the span
            if tokenizer.decode(resp[:k], skip_special_tokens=True).strip() == want:
                n_t = k
                break
    return ids[: p_len + n_t], p_len, n_t


def span_rows(spans: Sequence[tuple[list[int], int, int]], length: int, pad_id: int) -> TokenRows:
    """Right-padded ``TokenRows`` (numpy) of ``target_span`` rows: prompt = the first ``p_len``
    tokens, target = the next ``n_t``."""
    b = len(spans)
    ids = np.full((b, length), pad_id, np.int32)
    mask, prompt, target = (np.zeros((b, length), bool) for _ in range(3))
    for i, (row, p_len, n_t) in enumerate(spans):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = True
        prompt[i, :p_len] = True
        target[i, p_len : p_len + n_t] = True
    return TokenRows(ids, mask, prompt, target)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_targets"))
def _row_ce(graphdef, state, rows: TokenRows, *, max_targets: int) -> jax.Array:
    model = nnx.merge(graphdef, state)
    logp, weight, _ = sequence_logprobs(
        model, model.embed(rows.ids_BxL), rows.mask_BxL, rows.ids_BxL, rows.target_BxL,
        max_targets=max_targets,
    )  # fmt: skip
    w = weight.astype(jnp.float32)
    return -jnp.sum(logp * w, axis=-1) / jnp.maximum(jnp.sum(w, axis=-1), 1.0)


class TargetCE:
    """`fitness_fn(prompts, target) -> np.ndarray` of per-prompt token-mean target CE (lower is
    better) on a `sampling.TextGenerator`'s model; rows are padded to fixed batch/length buckets."""

    def __init__(self, generator: Any, *, batch_size: int | None = None) -> None:
        self.generator = generator
        self.renderer = generator.renderer
        self.batch_size = batch_size or generator.batch_size
        self.length_multiple = getattr(generator, "length_multiple", 32)
        self.pad_id = int(generator.pad_id)
        self.calls = 0

    def rows(self, prompts: Sequence[str], target: str) -> list[tuple[list[int], int, int]]:
        return [target_span(self.renderer, p, target) for p in prompts]

    def __call__(self, prompts: Sequence[str], target: str) -> np.ndarray:
        self.calls += 1
        spans = self.rows(prompts, target)
        out: list[float] = []
        for start in range(0, len(spans), self.batch_size):
            chunk = spans[start : start + self.batch_size]
            n = len(chunk)
            chunk = chunk + [chunk[-1]] * (self.batch_size - n)
            length = _bucket(max(len(ids) for ids, _, _ in chunk), self.length_multiple)
            t = _bucket(max(n_t for _, _, n_t in chunk), 8)
            rows = span_rows(chunk, length, self.pad_id)
            ce = _row_ce(
                self.generator.graphdef, self.generator.state, rows._replace(prompt_BxL=None),
                max_targets=t,
            )  # fmt: skip
            out += np.asarray(ce, np.float64)[:n].tolist()
        return np.asarray(out, np.float64)


# ------------------------------------------------------------------------ continuous attack


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"))
def _attack(graphdef, lora, frozen, rows: TokenRows, valid, key, eps_abs, *, cfg):
    return continuous_attack(
        graphdef, lora, frozen, rows, key, cfg=cfg, eps_abs=eps_abs, row_valid_B=valid
    )


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _perturbed_embeddings(graphdef, state, ids_BxP, delta_BxPxD) -> jax.Array:
    model = nnx.merge(graphdef, state)
    return model.embed(ids_BxP).astype(jnp.float32) + delta_BxPxD


def left_align_delta(delta_BxLxD: np.ndarray, prompt_lens: Sequence[int], p: int) -> np.ndarray:
    """Move each row's prompt perturbation δ[i, :n_i] (right-padded attack layout, prompt at
    0..n_i-1) to positions p-n_i..p-1 (left-padded generation layout)."""
    b, _, d = delta_BxLxD.shape
    out = np.zeros((b, p, d), np.float32)
    for i, n in enumerate(prompt_lens):
        out[i, p - n :] = delta_BxLxD[i, :n]
    return out


def continuous_completions(
    generator: Any,
    behaviors: Sequence[Any],
    cfg: Any,
    *,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Attack each behaviour's `[request | target]` and generate greedily from the perturbed
    prompt. Returns dicts {behavior_id, request, completion, meta}."""
    model, renderer, tok = generator.model, generator.renderer, generator.tokenizer
    graphdef, lora, frozen = lora_lib.split(model)
    e_bar = float(mean_embedding_norm(model.embedding_matrix))
    eps_abs = jnp.float32(cfg.eps * e_bar)
    multiple = getattr(generator, "length_multiple", 32)
    pad = int(generator.pad_id)
    out: list[dict[str, Any]] = []
    for start in range(0, len(behaviors), batch_size):
        chunk = list(behaviors[start : start + batch_size])
        n = len(chunk)
        requests = [behavior_with_context(b) for b in chunk]
        spans = [target_span(renderer, r, b.target) for r, b in zip(requests, chunk, strict=True)]
        spans += [spans[-1]] * (batch_size - n)
        length = _bucket(max(len(ids) for ids, _, _ in spans), multiple)
        rows = span_rows(spans, length, pad)
        valid = np.arange(batch_size) < n
        key = jax.random.fold_in(jax.random.key(seed), start)
        delta, diag = _attack(
            graphdef, lora, frozen, jax.tree.map(jnp.asarray, rows), jnp.asarray(valid), key,
            eps_abs, cfg=cfg,
        )  # fmt: skip
        p_lens = [p_len for _, p_len, _ in spans]
        p = _bucket(max(p_lens), multiple)
        left_ids, left_mask = left_pad([row[:pl] for row, pl, _ in spans], pad, p)
        delta_left = left_align_delta(np.asarray(delta, np.float32), p_lens, p)
        emb = _perturbed_embeddings(
            generator.graphdef, generator.state, jnp.asarray(left_ids), jnp.asarray(delta_left)
        )
        toks, lens = generate_tokens(
            generator.graphdef,
            generator.state,
            jnp.asarray(left_ids),
            jnp.asarray(left_mask),
            jax.random.fold_in(key, 1),
            generator.stop_ids,
            jnp.float32(0.0),
            jnp.float32(1.0),
            jnp.int32(pad),
            emb,
            max_new_tokens=int(max_new_tokens),
        )
        toks, lens = np.asarray(toks), np.asarray(lens)
        norms = np.linalg.norm(np.asarray(delta, np.float32), axis=-1)
        meta_common = {
            "eps_abs": float(diag["eps_abs"]),
            "batch_loss_before": float(diag["loss_before"]),
            "batch_loss_after": float(diag["loss_after"]),
            "iters": int(cfg.iters),
        }
        for i, (b, req) in enumerate(zip(chunk, requests, strict=True)):
            text = tok.decode(toks[i, : lens[i]].tolist(), skip_special_tokens=True)
            meta = dict(meta_common, delta_norm_max=float(norms[i, : p_lens[i]].max(initial=0.0)))
            out.append({"behavior_id": b.id, "request": req, "completion": text, "meta": meta})
    return out


class ContinuousAttack:
    """The continuous embedding attack as an evaluation attack: one test case per behaviour, the
    request, carrying the completion generated from its perturbed prompt (`meta`: the radius,
    the batch's loss before/after, the realised max ‖δ‖, the iterations)."""

    name = "Continuous"

    def __init__(self, generator: Any, cfg: Any, *, max_new_tokens: int, batch_size: int) -> None:
        self.generator, self.cfg = generator, cfg
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def generate_test_cases(
        self, behaviors: Sequence[Any], *, seed: int = 0
    ) -> dict[str, list[TestCase]]:
        rows = continuous_completions(
            self.generator,
            list(behaviors),
            self.cfg,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            seed=seed,
        )
        return {
            r["behavior_id"]: [TestCase(r["request"], completion=r["completion"], meta=r["meta"])]
            for r in rows
        }


# ------------------------------------------------------------------------------------- GCG


GCG_TEST_CASES: tuple[str, ...] = ("final", "best")


def gcg_test_case(request: str, suffix: str) -> str:
    """`request + " " + suffix`: the `{optim_str}` slot appended after one space
    (`ChatRenderer.prompt_text_with_slot`; HarmBench's `behavior + ' ' + adv_string`)."""
    return f"{request} {suffix}"


class GCGAttack:
    """HarmBench-style GCG on the target (spec mixat.md §6.4): the test case is the request with
    the optimised string after one space. `test_case="final"` (default, HarmBench) keeps the last
    step's string, `"best"` the lowest-loss one; the behaviours of one call run as one batched
    GCG. Progress lines `[evaluate] <label> <behaviour>: step k/n ...` go to `stream`."""

    name = "GCG"

    def __init__(
        self,
        generator: Any,
        cfg: GCGConfig,
        *,
        test_case: str = "final",
        label: str = "GCG",
        stream: TextIO | None = None,
    ) -> None:
        if test_case not in GCG_TEST_CASES:
            raise ValueError(f"test_case must be one of {GCG_TEST_CASES}, got {test_case!r}")
        self.generator, self.cfg, self.which, self.label = generator, cfg, test_case, label
        self.stream = stream

    def generate_test_cases(
        self, behaviors: Sequence[Any], *, seed: int = 0
    ) -> dict[str, list[TestCase]]:
        cfg = self.cfg
        requests = [behavior_with_context(b) for b in behaviors]
        every = max(1, cfg.num_steps // 10)

        def progress(r: Any) -> None:
            if r.step % every == 0 or r.step == r.num_steps:
                print(
                    f"[evaluate] {self.label} {behaviors[r.behavior_index].id}: step "
                    f"{r.step}/{r.num_steps} loss {r.loss:.4f} best {r.best_loss:.4f}",
                    file=self.stream or sys.stderr,
                    flush=True,
                )

        results = run_gcg_batch(
            self.generator.model,
            self.generator.tokenizer,
            requests,
            [b.target for b in behaviors],
            cfg,
            seed=seed,
            progress=progress,
        )
        out: dict[str, list[TestCase]] = {}
        for b, req, res in zip(behaviors, requests, results, strict=True):
            final = res.final_test_case or gcg_test_case(req, res.final_string)
            best = res.best_test_case or gcg_test_case(req, res.best_string)
            meta = {
                "best_loss": float(res.best_loss),
                "final_loss": float(res.losses[-1]) if res.losses else float("nan"),
                "best_string": res.best_string,
                "final_string": res.final_string,
                "steps": res.num_steps,
                "stopped_early": bool(res.stopped_early),
                "test_case_from": self.which,
            }
            out[b.id] = [TestCase(final if self.which == "final" else best, meta=meta)]
        return out
