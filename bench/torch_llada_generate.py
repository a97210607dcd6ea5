"""A PyTorch masked-diffusion sampler in the shape of LLaDA's `generate` (DAT spec §5.1, §5.4).

    python bench/torch_llada_generate.py --model DIR --inputs IN.npz --out OUT.npz \
        [--steps 32] [--num_blocks 1] [--temperature 0] [--cfg_scale 0] \
        [--remasking low_confidence] [--suppress_ids 1,2,3] [--repeats 1] [--threads 2] [--seed 0]

The peer of `bench/diffusion_sampler_vs_torch.py`, written here from the spec (the reference
is ML-GSAI/LLaDA `generate.py`; no code is taken from it) and run as its own process so that
torch's OpenMP threads never share a process with XLA's. The model forward is the independent
torch LLaDA/Dream forward of `tests/diffusion_torch_reference.py` (fp32), on the checkpoint dir.

Loop (one Python iteration per denoising step, as the reference):

* semi-autoregressive blocks: the editable span of each row is cut into `num_blocks`
  consecutive blocks (equal when the span length divides; LLaDA's `block_length`), each
  denoised in `steps / num_blocks` steps;
* reveal schedule per row and block: `base = n_mask // spb`, the first `n_mask % spb` steps one
  more (LLaDA's `get_num_transfer_tokens`);
* logits of the whole canvas (key-padding mask from `attn`); with `cfg_scale` w != 0 one batched
  call also scores the canvas with its known conditioning tokens -> [MASK] and combines
  `uncond + (w + 1)(cond - uncond)`; `suppress_ids` get -inf (LLaDA's optional EOS suppression);
* x0 = argmax(logits) at T = 0, else argmax(logits + T * Gumbel) with the logits and the noise
  in float64 (LLaDA's `add_gumbel_noise`, written in log space: the same argmax as
  `exp(logits) / (-log u)^T`, without the overflow of exp);
* confidence: low_confidence = softmax prob of x0, random = U(0, 1); -inf outside the
  still-masked editable positions of the current block (LLaDA: -inf past the block end and at
  known positions);
* per row `torch.topk(confidence, k)` picks the positions to reveal (a Python loop over rows, as
  the reference), which take x0;
* also recorded (as the AAPL sampler does, spec §5.4): the path log-likelihood, the sum of
  log_softmax(logits)[x0] over the revealed tokens.

CLI: reads `canvas_BxL`, `attn_BxL`, `editable_BxL` (int/bool arrays) from `--inputs`, runs one
untimed warm-up forward then `--repeats` timed calls, writes the last call's `canvas_BxL` and
`logp_B` to `--out`, and prints one JSON line `{"seconds": [...], "seconds_per_call": median,
"load_seconds": ..., "threads": ...}`. Library use: `denoise(forward_fn, canvas, attn, editable,
...)` and the LLaDA-signature wrapper `generate(forward_fn, prompt_BxP, ...)`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ForwardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids, mask) -> logits


def reveal_counts(n_mask_B: torch.Tensor, spb: int) -> torch.Tensor:
    """[B, spb] tokens to reveal per step of one block: n // spb, first n % spb steps one more."""
    base_B = n_mask_B // spb
    rem_B = n_mask_B % spb
    step_S = torch.arange(spb)
    return base_B[:, None] + (step_S[None, :] < rem_B[:, None]).long()


def block_index(editable_BxL: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Block of each editable position (its span cut into consecutive near-equal blocks), -1
    elsewhere."""
    order_BxL = editable_BxL.long().cumsum(-1) - 1
    span_B = editable_BxL.long().sum(-1).clamp(min=1)
    return torch.where(editable_BxL, order_BxL * num_blocks // span_B[:, None], -1)


def draw_x0(logits_BxLxV: torch.Tensor, temperature: float, gen: torch.Generator | None):
    """argmax at T = 0; else float64 Gumbel-max sampling of softmax(logits / T)."""
    if temperature == 0.0:
        return logits_BxLxV.argmax(-1)
    u = torch.rand(logits_BxLxV.shape, dtype=torch.float64, generator=gen)
    gumbel = -torch.log(-torch.log(u))
    return (logits_BxLxV.double() + temperature * gumbel).argmax(-1)


@torch.inference_mode()
def denoise(
    forward_fn: ForwardFn,
    canvas_BxL,
    attn_BxL,
    editable_BxL,
    *,
    mask_id: int,
    steps: int = 32,
    num_blocks: int = 1,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    suppress_ids: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fills the [MASK]s of the editable span; returns (canvas_BxL, path logp_B)."""
    if steps % num_blocks:
        raise ValueError(f"steps={steps} must be divisible by num_blocks={num_blocks}")
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"remasking {remasking!r}: use low_confidence or random")
    x_BxL = torch.as_tensor(np.asarray(canvas_BxL), dtype=torch.long).clone()
    attn_BxL = torch.as_tensor(np.asarray(attn_BxL)).bool()
    editable_BxL = torch.as_tensor(np.asarray(editable_BxL)).bool() & attn_BxL
    b, _ = x_BxL.shape
    spb = steps // num_blocks
    fill_BxL = editable_BxL & (x_BxL == mask_id)
    cond_BxL = attn_BxL & ~editable_BxL  # what the unconditional CFG pass masks
    block_BxL = block_index(editable_BxL, num_blocks)
    banned = torch.tensor(sorted(set(suppress_ids)), dtype=torch.long)
    logp_B = torch.zeros(b, dtype=torch.float32)
    for blk in range(num_blocks):
        in_block_BxL = block_BxL == blk
        k_BxS = reveal_counts((fill_BxL & in_block_BxL).sum(-1), spb)
        for s in range(spb):
            masked_BxL = x_BxL == mask_id
            if cfg_scale != 0.0:
                uncond_BxL = torch.where(cond_BxL, mask_id, x_BxL)
                both = forward_fn(torch.cat([x_BxL, uncond_BxL]), torch.cat([attn_BxL, attn_BxL]))
                cond_logits, uncond_logits = both[:b].float(), both[b:].float()
                logits_BxLxV = uncond_logits + (cfg_scale + 1.0) * (cond_logits - uncond_logits)
            else:
                logits_BxLxV = forward_fn(x_BxL, attn_BxL).float()
            if len(banned):
                logits_BxLxV[..., banned] = float("-inf")
            x0_BxL = draw_x0(logits_BxLxV, temperature, generator)
            logp_all_BxLxV = F.log_softmax(logits_BxLxV, dim=-1)
            logp0_BxL = logp_all_BxLxV.gather(-1, x0_BxL[..., None])[..., 0]
            if remasking == "low_confidence":
                conf_BxL = logp0_BxL.exp()  # softmax probability of x0
            else:
                conf_BxL = torch.rand(x0_BxL.shape, generator=generator)
            eligible_BxL = masked_BxL & fill_BxL & in_block_BxL
            conf_BxL = torch.where(eligible_BxL, conf_BxL, float("-inf"))
            reveal_BxL = torch.zeros_like(eligible_BxL)
            for row in range(b):
                k = int(k_BxS[row, s])
                if k:
                    reveal_BxL[row, torch.topk(conf_BxL[row], k).indices] = True
            reveal_BxL &= eligible_BxL
            x_BxL = torch.where(reveal_BxL, x0_BxL, x_BxL)
            logp_B += torch.where(reveal_BxL, logp0_BxL, 0.0).sum(-1)
    return x_BxL, logp_B


def generate(
    forward_fn: ForwardFn,
    prompt_BxP,
    attn_mask_BxP=None,
    *,
    mask_id: int,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    **kw,
) -> torch.Tensor:
    """LLaDA's `generate` signature: `gen_length` [MASK]s appended to the prompt and filled in
    `gen_length / block_length` semi-autoregressive blocks (right-padded prompts: pass the mask)."""
    if gen_length % block_length:
        raise ValueError(f"gen_length={gen_length} must be a multiple of block_length")
    prompt = torch.as_tensor(np.asarray(prompt_BxP), dtype=torch.long)
    b, p = prompt.shape
    attn = torch.ones_like(prompt, dtype=torch.bool)
    if attn_mask_BxP is not None:
        attn = torch.as_tensor(np.asarray(attn_mask_BxP)).bool()
    canvas = torch.cat([prompt, torch.full((b, gen_length), mask_id)], dim=1)
    attn = torch.cat([attn, torch.ones((b, gen_length), dtype=torch.bool)], dim=1)
    editable = torch.zeros_like(attn)
    editable[:, p:] = True
    out, _ = denoise(
        forward_fn, canvas, attn, editable, mask_id=mask_id, steps=steps,
        num_blocks=gen_length // block_length, **kw,
    )  # fmt: skip
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--inputs", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--num_blocks", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--cfg_scale", type=float, default=0.0)
    p.add_argument("--remasking", default="low_confidence")
    p.add_argument("--suppress_ids", default="", help="comma-separated ids set to -inf")
    p.add_argument("--mask_id", type=int, default=None, help="default: config.json")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.diffusion_torch_reference import forward, load_checkpoint

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    state, config = load_checkpoint(a.model)
    load_seconds = time.perf_counter() - t0
    mask_id = a.mask_id if a.mask_id is not None else config.get("mask_token_id")
    if mask_id is None:
        print("error: the checkpoint config has no mask_token_id; pass --mask_id", file=sys.stderr)
        return 2
    inputs = np.load(a.inputs)
    suppress = tuple(int(i) for i in a.suppress_ids.split(",") if i.strip())

    def forward_fn(ids_BxL, mask_BxL):
        return forward(state, config, ids_BxL, mask_BxL)

    def call(seed: int):
        gen = torch.Generator().manual_seed(seed)
        return denoise(
            forward_fn, inputs["canvas_BxL"], inputs["attn_BxL"], inputs["editable_BxL"],
            mask_id=int(mask_id), steps=a.steps, num_blocks=a.num_blocks,
            temperature=a.temperature, cfg_scale=a.cfg_scale, remasking=a.remasking,
            suppress_ids=suppress, generator=gen,
        )  # fmt: skip

    with torch.inference_mode():  # warm-up: one forward (OpenMP pool, allocator); no compile
        forward_fn(
            torch.as_tensor(inputs["canvas_BxL"]).long(), torch.as_tensor(inputs["attn_BxL"])
        )
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        canvas_BxL, logp_B = call(a.seed)
        times.append(time.perf_counter() - t0)
    np.savez(a.out, canvas_BxL=canvas_BxL.numpy(), logp_B=logp_B.numpy())
    print(json.dumps({"seconds": times, "seconds_per_call": statistics.median(times),
                      "load_seconds": load_seconds, "threads": a.threads,
                      "torch": torch.__version__}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
