"""Tiny random-weight HF checkpoints built by the project itself (no torch, no downloads).

`build_tiny_checkpoint` trains a small byte-level BPE tokenizer with a chat template
(`tokenizer_build`), initialises a `Decoder` from a `ModelConfig`, and writes a standard Hugging
Face directory (config.json, model.safetensors, tokenizer files) through `hf.export.save_merged`.
The result loads with `load_pretrained` here and with transformers elsewhere. Used by the README
commands, the CPU demo, the benchmarks and tests.

`build_tiny_diffusion_checkpoint` writes a tiny masked-diffusion LM (DAT spec §5.5) in LLaDA's
or Dream's own layout (config.json field names and tensor names of that family), with a
`<|mdm_mask|>` token as the last vocabulary id (the tokenizer's `mask_token`) and a pad token
distinct from it.

    python -m mixat_jax.tiny_model --out /tmp/tiny --vocab_size 1024 --layers 2 --hidden 64
    python -m mixat_jax.tiny_model --out /tmp/tiny_llada --layout llada
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
from flax import nnx

from mixat_jax import cli as cli_lib
from mixat_jax.hf.export import save_merged
from mixat_jax.models import diffusion_config
from mixat_jax.models.config import ModelConfig
from mixat_jax.models.decoder import Decoder
from mixat_jax.tokenizer_build import build_bpe_tokenizer, default_corpus, save_tokenizer


def _tiny_config(
    tok, vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, **extra
) -> ModelConfig:
    """The shape and special tokens every tiny checkpoint shares (family fields in `extra`)."""
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
        **extra,
    )


def build_tiny_checkpoint(
    out_dir: str | Path,
    *,
    vocab_size: int = 1024,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    family: str = "llama3",
    corpus: list[str] | None = None,
    seed: int = 0,
    init_std: float = 0.02,
) -> Path:
    """Writes a tiny llama-family checkpoint directory and returns its path."""
    out = Path(out_dir)
    tok = build_bpe_tokenizer(corpus or default_corpus(200_000), vocab_size, family=family)
    eos = [tok.eos_token_id] + [
        i
        for i in tok.convert_tokens_to_ids(["<|eot_id|>"])
        if i is not None and i != tok.unk_token_id
    ]
    cfg = _tiny_config(
        tok, vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size,
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
    )  # fmt: skip
    model = Decoder(cfg, rngs=nnx.Rngs(seed))
    if init_std != 0.02:
        key = jax.random.key(seed + 1)
        for i, (_, var) in enumerate(nnx.iter_graph(model)):
            if isinstance(var, nnx.Param) and var.get_value().ndim >= 2:
                v = var.get_value()
                var.set_value(
                    jax.random.normal(jax.random.fold_in(key, i), v.shape, v.dtype) * init_std
                )
    save_merged(model, out)
    save_tokenizer(tok, out)
    return out


MASK_TOKEN = "<|mdm_mask|>"
DIFFUSION_LAYOUTS = {"llada": "llama3", "dream": "qwen2"}  # layout -> tokenizer family


def _randomize(model: Decoder, seed: int, init_std: float) -> None:
    """Every parameter = its neutral value (1 for RMSNorm scales, else 0) + init_std * N(0, 1)."""
    key = jax.random.key(seed + 1)
    for i, (path, var) in enumerate(nnx.iter_graph(model)):
        if isinstance(var, nnx.Param):
            v = var.get_value()
            neutral = 1.0 if path[-1] == "weight" else 0.0
            noise = jax.random.normal(jax.random.fold_in(key, i), v.shape, v.dtype)
            var.set_value(neutral + init_std * noise)


def build_tiny_diffusion_checkpoint(
    out_dir: str | Path,
    *,
    layout: str = "llada",
    vocab_size: int = 1024,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 4,
    intermediate_size: int | None = None,
    seed: int = 0,
    init_std: float = 0.02,
    corpus: list[str] | None = None,
) -> Path:
    """Writes a tiny random masked-diffusion checkpoint in LLaDA's or Dream's layout.

    The directory holds config.json (the family's own field names; `mask_token_id` = the
    tokenizer's `<|mdm_mask|>` = `vocab_size - 1`), model.safetensors (the family's tensor names;
    random RMSNorm scales and biases, not just matrices) and a BPE tokenizer (llama3 tokens for
    LLaDA, Qwen ChatML for Dream) whose pad token differs from the mask.
    """
    if layout not in DIFFUSION_LAYOUTS:
        raise ValueError(
            f"unknown diffusion layout {layout!r}: choose from {', '.join(DIFFUSION_LAYOUTS)}"
        )
    out = Path(out_dir)
    tok = build_bpe_tokenizer(
        corpus or default_corpus(200_000), vocab_size - 1, family=DIFFUSION_LAYOUTS[layout]
    )
    tok.add_special_tokens({"mask_token": MASK_TOKEN})
    dream = layout == "dream"
    cfg = _tiny_config(
        tok, vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size,
        eos_token_ids=(tok.eos_token_id,), model_type=layout, rms_norm_eps=1e-6 if dream else 1e-5,
        qkv_bias=dream, causal=False, mask_token_id=tok.mask_token_id, shift_logits=dream,
    )  # fmt: skip
    diffusion_config.check_mask_token(cfg)
    model = Decoder(cfg, rngs=nnx.Rngs(seed))
    _randomize(model, seed, init_std)
    save_merged(model, out)
    save_tokenizer(tok, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--vocab_size", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--layout",
        choices=("llama", *DIFFUSION_LAYOUTS),
        default="llama",
        help="llama: causal Llama-3 checkpoint; llada / dream: masked-diffusion LM in that layout",
    )
    a = p.parse_args(argv)
    shape = dict(
        vocab_size=a.vocab_size,
        hidden_size=a.hidden,
        num_layers=a.layers,
        num_heads=a.heads,
        num_kv_heads=a.kv_heads,
        seed=a.seed,
    )
    try:
        if a.layout == "llama":
            path = build_tiny_checkpoint(a.out, **shape)
        else:
            path = build_tiny_diffusion_checkpoint(a.out, layout=a.layout, **shape)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


def cli() -> None:
    """Console script ``mixat-tiny-model``; Ctrl-C and unwritable paths end in one line."""
    sys.exit(cli_lib.run_main(main))


if __name__ == "__main__":
    cli()
