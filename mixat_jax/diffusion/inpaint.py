"""Prompt inpainting with a masked-diffusion LM: DAT Stage A step 1 (DAT spec §2.2, §5.4).

For each response y and sample j the canvas is `[MASK] × P` followed by
`tokenizer(answer_prefix + y, add_special_tokens=True)` (so LLaDA's BOS sits right after the mask
block); for Dream-style models (`shift_logits`) a BOS (or, for tokenizers without one such as
Qwen's, the EOS `<|endoftext|>` document separator) is put before the mask block, since their
first canvas token must be known. Rows (responses × samples) are right-padded with the pad id
(≠ [MASK]) to one canvas length (P + the longest answer, rounded up to a multiple of 16 and
capped at `max_position_embeddings`) and cut into batches of one fixed size (the last batch is
filled with copies of its last row), so `sample` compiles once per call. The editable span is the
mask block (the sampler's LM head runs only at its P positions: `fill_width=P`); the P inpainted
tokens are decoded without special tokens and stripped.

Default sampler (`default_sampler`) = the Lüdke/AAPL settings (§5.4): steps = P, T = 0,
low-confidence remasking, conditioning dropout, global remasking every 8 steps. The tokenizer's
BOS/EOS/PAD ids are always added to `suppress_ids`. Batch b uses `fold_in(key(seed), b)`: the
same seed and arguments give the same prompts.

Lower level (DAT Stage A's work units, `dat.stage_a`): `prepare_sampler` (suppressed ids, pad
id, lead token, prefix check), `encode_answers`, `canvas_length` (one length for a whole run)
and `inpaint_rows` (ONE sampler call over exactly the given rows with the given key);
`inpaint_prompts` is built from them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from mixat_jax import mesh as mesh_lib
from mixat_jax.diffusion.sampler import SamplerConfig, sample
from mixat_jax.models.config import ModelConfig

LENGTH_MULTIPLE = 16


@dataclasses.dataclass(frozen=True)
class InpaintedPrompt:
    prompt: str
    log_likelihood: float  # the sampler's path log-probability of the P prompt tokens
    token_ids: tuple[int, ...]


def default_sampler(model_cfg: ModelConfig, prompt_length: int, **overrides: Any) -> SamplerConfig:
    """The AAPL inpainting sampler for a P-token prompt (spec §5.4), with overrides."""
    aapl = dict(
        steps=prompt_length,
        temperature=0.0,
        remasking="low_confidence",
        cond_dropout=True,
        global_remask_every=8,
        global_remask_count=8,
    )
    return SamplerConfig.for_model(model_cfg, **{**aapl, **overrides})


def special_ids(tokenizer) -> tuple[int, ...]:
    """BOS/EOS/PAD ids of the tokenizer (those it has)."""
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return tuple(sorted({int(i) for i in ids if i is not None}))


def pad_id_for(tokenizer, mask_id: int) -> int:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    if int(pad) == mask_id:
        raise ValueError(f"the tokenizer's pad id {pad} equals the [MASK] id; they must differ")
    return int(pad)


def check_prefix(tokenizer, answer_prefix: str) -> None:
    ids = tokenizer(answer_prefix, add_special_tokens=False)["input_ids"]
    unk = tokenizer.unk_token_id
    if (answer_prefix and not ids) or (unk is not None and unk in ids):
        raise ValueError(
            f"the tokenizer cannot encode the answer prefix {answer_prefix!r} (got ids {ids}, "
            f"unk id {unk}); pass an answer_prefix its vocabulary covers"
        )


def build_canvas(
    answers: Sequence[Sequence[int]],
    *,
    prompt_length: int,
    mask_id: int,
    pad_id: int,
    lead: Sequence[int],
    length: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded [lead | MASK × P | answer | pad] rows: (canvas, attn_mask, editable)."""
    n = len(answers)
    canvas = np.full((n, length), pad_id, np.int32)
    attn = np.zeros((n, length), bool)
    editable = np.zeros((n, length), bool)
    start = len(lead)
    for i, ans in enumerate(answers):
        row = [*lead, *([mask_id] * prompt_length), *ans]
        canvas[i, : len(row)] = row
        attn[i, : len(row)] = True
        editable[i, start : start + prompt_length] = True
    return canvas, attn, editable


def prepare_sampler(
    model_cfg: ModelConfig,
    tokenizer,
    *,
    prompt_length: int,
    sampler: SamplerConfig | None = None,
    answer_prefix: str = "\nAnswer: ",
) -> tuple[SamplerConfig, int, list[int]]:
    """(sampler with the tokenizer's BOS/EOS/PAD suppressed, pad id, lead tokens before the mask
    block); checks that the tokenizer encodes `answer_prefix` (one-line ValueErrors)."""
    sampler = sampler or default_sampler(model_cfg, prompt_length)
    sampler = sampler.replace(
        suppress_ids=tuple(sorted({*sampler.suppress_ids, *special_ids(tokenizer)}))
    )
    pad_id = pad_id_for(tokenizer, sampler.mask_token_id)
    check_prefix(tokenizer, answer_prefix)
    lead: list[int] = []
    if sampler.shift_logits:
        lead_id = tokenizer.bos_token_id
        lead_id = tokenizer.eos_token_id if lead_id is None else lead_id
        if lead_id is None:
            raise ValueError(
                "shift_logits (Dream-style) models need a known token before the mask block, "
                "but the tokenizer has neither a bos_token nor an eos_token"
            )
        lead = [int(lead_id)]
    return sampler, pad_id, lead


def encode_answers(tokenizer, responses: Sequence[str], answer_prefix: str) -> list[list[int]]:
    """Token ids of `answer_prefix + response` (with the tokenizer's special tokens)."""
    return [tokenizer(answer_prefix + r, add_special_tokens=True)["input_ids"] for r in responses]


def canvas_length(
    answers: Sequence[Sequence[int]], *, prompt_length: int, lead: Sequence[int], max_canvas: int
) -> int:
    """P + the longest answer (+ lead), rounded up to a multiple of 16 and capped at
    `max_canvas`; a one-line ValueError when an answer does not fit."""
    for i, ans in enumerate(answers):
        need = len(lead) + prompt_length + len(ans)
        if need > max_canvas:
            raise ValueError(
                f"response {i} needs a canvas of {need} tokens ({len(lead) + prompt_length} "
                f"prompt + {len(ans)} answer) but the model's max canvas is {max_canvas} "
                "(max_position_embeddings)"
            )
    longest = len(lead) + prompt_length + max(len(a) for a in answers)
    return min(-(-longest // LENGTH_MULTIPLE) * LENGTH_MULTIPLE, max_canvas)


def inpaint_rows(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokenizer,
    answers: Sequence[Sequence[int]],
    key: jax.Array,
    *,
    prompt_length: int,
    sampler: SamplerConfig,
    pad_id: int,
    lead: Sequence[int],
    length: int,
    mesh=None,
) -> list[InpaintedPrompt]:
    """ONE sampler call over exactly these rows (one per answer, in order; the caller fixes the
    batch size and the canvas `length`, so a row's result depends only on the key, the batch and
    its position in it): the inpainted prompt of every row. `state` is placed by the caller."""
    canvas, attn, editable = build_canvas(
        answers,
        prompt_length=prompt_length,
        mask_id=sampler.mask_token_id,
        pad_id=pad_id,
        lead=lead,
        length=length,
    )
    batch = {"canvas": canvas, "attn": attn, "editable": editable}
    if mesh is not None:
        batch = mesh_lib.shard_batch(batch, mesh)
    result = sample(
        graphdef,
        state,
        batch["canvas"],
        batch["attn"],
        batch["editable"],
        key,
        cfg=sampler,
        fill_width=prompt_length,  # every row fills the P masks: one compile, LM head at P
    )
    start = len(lead)
    filled = np.asarray(result.canvas_BxL)[:, start : start + prompt_length]
    logp = np.asarray(result.logp_B)
    out = []
    for r in range(len(answers)):
        ids = tuple(int(t) for t in filled[r])
        text = tokenizer.decode(list(ids), skip_special_tokens=True).strip()
        out.append(InpaintedPrompt(text, float(logp[r]), ids))
    return out


def inpaint_prompts(
    model,
    tokenizer,
    responses: list[str],
    *,
    prompt_length: int = 32,
    num_samples: int = 1,
    sampler: SamplerConfig | None = None,
    seed: int = 0,
    answer_prefix: str = "\nAnswer: ",
    batch_size: int = 64,
    mesh=None,
) -> list[list[InpaintedPrompt]]:
    """`num_samples` inpainted prompts per response, in order: result[i][j] for responses[i]."""
    if prompt_length < 1 or num_samples < 1 or batch_size < 1:
        raise ValueError(
            f"prompt_length, num_samples and batch_size must be >= 1; got "
            f"{prompt_length}, {num_samples}, {batch_size}"
        )
    if not responses:
        return []
    model_cfg: ModelConfig = model.cfg
    sampler, pad_id, lead = prepare_sampler(
        model_cfg, tokenizer, prompt_length=prompt_length, sampler=sampler,
        answer_prefix=answer_prefix,
    )  # fmt: skip
    answers = encode_answers(tokenizer, responses, answer_prefix)
    length = canvas_length(
        answers, prompt_length=prompt_length, lead=lead,
        max_canvas=model_cfg.max_position_embeddings,
    )  # fmt: skip

    rows = [(i, j) for i in range(len(responses)) for j in range(num_samples)]
    devices = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    b = min(batch_size, len(rows))
    b = -(-b // devices) * devices
    graphdef, state = nnx.split(model)
    if mesh is not None:
        state = jax.device_put(state, mesh_lib.state_shardings(state, mesh))
    key = jax.random.key(seed)
    out: list[list[InpaintedPrompt]] = [[] for _ in responses]
    for n_batch, first in enumerate(range(0, len(rows), b)):
        chunk = rows[first : first + b]
        chunk = chunk + [chunk[-1]] * (b - len(chunk))
        filled = inpaint_rows(
            graphdef, state, tokenizer, [answers[i] for i, _ in chunk],
            jax.random.fold_in(key, n_batch), prompt_length=prompt_length, sampler=sampler,
            pad_id=pad_id, lead=lead, length=length, mesh=mesh,
        )  # fmt: skip
        for r in range(min(b, len(rows) - first)):
            out[rows[first + r][0]].append(filled[r])
    return out
