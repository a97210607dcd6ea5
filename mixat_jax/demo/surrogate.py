"""The DAT demo's diffusion surrogate: a tiny LLaDA-style masked-diffusion LM of the synthetic
world's request/response distribution q(x, y) (DAT spec dat.md §1.3, §2.2 step 1, §5.5).

DAT samples prompts x ~ p_diff(x | y) by inpainting the prompt in front of a harmful response y.
The surrogate here learns the world's (request, response) pairs of
`training.synthetic.surrogate_corpus` — every topic asked in many more phrasings than adversarial
training sees, never a held-out phrasing — laid out exactly like the inpainting canvas of
`diffusion.inpaint` (`[prompt span: P tokens] [BOS] "\\nAnswer: " response`), the request
right-aligned in the span behind space tokens (decoded and stripped away, so the P positions are
always filled with ordinary tokens: the sampler suppresses BOS/EOS/PAD). Two phases of
`training.diffusion_lm.train_diffusion_lm`: (1) the masked-diffusion pre-training loss (every
token maskable: the joint q(x, y), so the answer tokens the sampler's conditioning dropout
re-masks are in-distribution), saved; (2) re-read and fine-tuned with the SFT form on the prompt
span only (the conditional q(x | y) that inpainting samples). Phase 1 is skipped when the output
directory already holds it for the same spec (`demo_surrogate_pretrain.json`).

Tokenizer: the demo base's BPE (trained on the world's text) plus `<|mdm_mask|>` as id 1024, so
vocab 1025; a 4-layer bidirectional decoder (d=128) saved in LLaDA's layout. The repository
ships it in `mixat_jax/demo/assets/surrogate`; this command regenerates it bit-for-bit on CPU:

    python -m mixat_jax.demo.surrogate --out mixat_jax/demo/assets/surrogate
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path

import numpy as np
from flax import nnx
from transformers import AutoTokenizer

from mixat_jax.demo.base import shipped_base_dir
from mixat_jax.hf.export import save_merged
from mixat_jax.hf.load import load_pretrained
from mixat_jax.models import diffusion_config
from mixat_jax.models.config import ModelConfig
from mixat_jax.models.decoder import Decoder
from mixat_jax.tiny_model import MASK_TOKEN
from mixat_jax.tokenizer_build import save_tokenizer
from mixat_jax.training.diffusion_lm import DiffusionData, train_diffusion_lm
from mixat_jax.training.synthetic import surrogate_corpus

SURROGATE_SPEC = dict(
    hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=4,
    head_dim=32, prompt_length=32, canvas_length=64, steps=1500, batch_size=64, lr=3e-3,
    sft_steps=300, sft_lr=1e-3, world_seed=0, answer_prefix="\nAnswer: ", filler=" ",
)  # fmt: skip
PRETRAIN_MARKER = "demo_surrogate_pretrain.json"


def shipped_surrogate_dir() -> Path | None:
    """The packaged surrogate checkpoint, if present."""
    d = Path(str(resources.files("mixat_jax.demo") / "assets" / "surrogate"))
    return d if (d / "config.json").exists() else None


def surrogate_tokenizer(base_dir: str | Path):
    """The base model's tokenizer with `<|mdm_mask|>` appended (id = the base vocabulary size)."""
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    if MASK_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"mask_token": MASK_TOKEN})
    return tok


def encode_pairs(
    tok, pairs: list[tuple[str, str]], *, prompt_length: int, length: int, answer_prefix: str,
    filler: str,
) -> DiffusionData:  # fmt: skip
    """Canvas-shaped rows: [filler.. request (P)] [BOS answer_prefix response] [pad..]."""
    (fill_id,) = tok(filler, add_special_tokens=False)["input_ids"]
    ids_NxL = np.full((len(pairs), length), tok.pad_token_id, np.int32)
    attn_NxL = np.zeros((len(pairs), length), bool)
    for i, (request, response) in enumerate(pairs):
        req = tok(request, add_special_tokens=False)["input_ids"]
        ans = tok(answer_prefix + response, add_special_tokens=True)["input_ids"]
        if len(req) > prompt_length or prompt_length + len(ans) > length:
            raise ValueError(
                f"pair {i} ({request!r}) does not fit a {prompt_length}-token prompt span in a "
                f"{length}-token canvas; raise prompt_length / canvas_length"
            )
        row = [fill_id] * (prompt_length - len(req)) + req + ans
        ids_NxL[i, : len(row)] = row
        attn_NxL[i, : len(row)] = True
    return DiffusionData(ids_NxL, attn_NxL, attn_NxL.copy())


def build_surrogate(
    out_dir: str | Path,
    *,
    base_dir: str | Path | None = None,
    steps: int | None = None,
    seed: int = 0,
    log=None,
) -> Path:
    """Trains the surrogate on `surrogate_corpus` and writes an HF LLaDA-layout directory."""
    spec = dict(SURROGATE_SPEC)
    if steps is not None:  # phase 1 steps; phase 2 keeps the default ratio (1/5)
        spec["steps"] = int(steps)
        spec["sft_steps"] = max(1, int(steps) // 5)
    base_dir = base_dir or shipped_base_dir()
    if base_dir is None:
        raise ValueError("no demo base model to take the tokenizer from; pass base_dir")
    tok = surrogate_tokenizer(base_dir)
    data = encode_pairs(
        tok, surrogate_corpus(spec["world_seed"]), prompt_length=spec["prompt_length"],
        length=spec["canvas_length"], answer_prefix=spec["answer_prefix"], filler=spec["filler"],
    )  # fmt: skip
    cfg = ModelConfig(
        vocab_size=len(tok),
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_layers=spec["num_layers"],
        num_heads=spec["num_heads"],
        num_kv_heads=spec["num_kv_heads"],
        head_dim=spec["head_dim"],
        model_type="llada",
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_ids=(tok.eos_token_id,),
        pad_token_id=tok.pad_token_id,
        causal=False,
        mask_token_id=tok.mask_token_id,
    )
    diffusion_config.check_mask_token(cfg)
    out = Path(out_dir)
    phase1 = {k: spec[k] for k in spec if not k.startswith("sft_")}
    marker = out / PRETRAIN_MARKER
    if not (marker.exists() and json.loads(marker.read_text())["spec"] == {**phase1, "seed": seed}):
        # Phase 1: the joint q(x, y) (pre-training form: every token maskable).
        model = Decoder(cfg, rngs=nnx.Rngs(seed))
        model, losses = train_diffusion_lm(
            model, data, steps=spec["steps"], lr=spec["lr"], batch_size=spec["batch_size"],
            seed=seed, log_every=max(1, spec["steps"] // 10), log=log,
        )  # fmt: skip
        save_merged(model, out)
        save_tokenizer(tok, out)
        marker.write_text(json.dumps({"spec": {**phase1, "seed": seed},
                                      "final_loss_mean50": float(np.mean(losses[-50:]))}) + "\n")  # fmt: skip
    # Phase 2: the conditional q(x | y) itself (SFT form: only the prompt span is masked), from
    # phase 1's saved weights (re-read, so a resumed build computes exactly the same).
    model, _ = load_pretrained(out, dtype="float32", kind="diffusion")
    prompt_NxL = np.zeros_like(data.maskable_NxL)
    prompt_NxL[:, : spec["prompt_length"]] = True
    model, sft_losses = train_diffusion_lm(
        model, data._replace(maskable_NxL=prompt_NxL), steps=spec["sft_steps"],
        lr=spec["sft_lr"], batch_size=spec["batch_size"], sft=True, seed=seed + 1,
        log_every=max(1, spec["sft_steps"] // 5), log=log,
    )  # fmt: skip
    save_merged(model, out)
    save_tokenizer(tok, out)
    pre = json.loads(marker.read_text())
    (out / "demo_surrogate.json").write_text(
        json.dumps(
            {**spec, "seed": seed, "num_pairs": len(data.ids_NxL),
             "pretrain_final_loss_mean50": pre["final_loss_mean50"],
             "sft_final_loss_mean50": float(np.mean(sft_losses[-50:]))}, indent=2,
        ) + "\n"
    )  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build the DAT demo's diffusion surrogate.")
    p.add_argument("--out", required=True)
    p.add_argument("--base", default=None, help="demo base directory (its tokenizer)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(build_surrogate(a.out, base_dir=a.base, steps=a.steps, seed=a.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
