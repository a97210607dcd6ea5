"""Independent torch forward of the masked-diffusion LMs (DAT spec §5.1 LLaDA, §5.2 Dream).

Written from the spec and the families' published structure, not from `mixat_jax`: it reads a
checkpoint directory itself (`config.json` + `*.safetensors` through `safetensors.torch`) and
runs a plain pre-norm transformer with

* bidirectional attention and a key-padding mask (spec §5.1 "Padding": pass an attention mask),
  grouped K/V heads repeated to the query heads, softmax in fp32;
* RoPE with the Llama half rotation (`rotate_half`); LLaDA rotates by slot index 0..L-1 as its
  modelling code does, Dream by `cumsum(mask) - 1` as its sampler does (equal for the real
  tokens of right- and left-padded rows, since RoPE scores depend on position differences only);
* RMSNorm (fp32 statistics, then the weight);
* SwiGLU: LLaDA `ff_out(silu(ff_proj(h)) * up_proj(h))`, Dream `down(silu(gate(h)) * up(h))`;
* LLaDA names `model.transformer.{wte, blocks.i.*, ln_f, ff_out}` (LM head = wte when
  `weight_tying`), optional q/k/v biases (`include_qkv_bias`); Dream = Qwen2 names with q/k/v
  biases. Logits are returned unshifted (Dream's shift is the sampler's business).

Public API (also used by bench scripts): `load_checkpoint(dir) -> (state_dict, config)`,
`forward(state_dict, config, ids_BxL, mask_BxL) -> logits_BxLxV` (torch, fp32),
`reference_logits(dir, ids_BxL, mask_BxL) -> np.ndarray`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file


def load_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors of the checkpoint (fp32) and its parsed config.json."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        state.update({k: v.float() for k, v in load_file(str(f)).items()})
    return state, config


def _rms_norm(x_BxLxD: torch.Tensor, w_D: torch.Tensor, eps: float) -> torch.Tensor:
    x = x_BxLxD.float()
    return w_D * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate(x_BxHxLxDh: torch.Tensor, pos_BxL: torch.Tensor, theta: float) -> torch.Tensor:
    dh = x_BxHxLxDh.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dh, 2, dtype=torch.float32) / dh))
    freqs_BxLxF = pos_BxL.float()[..., None] * inv_freq
    emb = torch.cat([freqs_BxLxF, freqs_BxLxF], dim=-1)[:, None]  # [B, 1, L, Dh]
    x1, x2 = x_BxHxLxDh[..., : dh // 2], x_BxHxLxDh[..., dh // 2 :]
    rotated = torch.cat([-x2, x1], dim=-1)
    return x_BxHxLxDh * emb.cos() + rotated * emb.sin()


def _attention(
    h_BxLxD: torch.Tensor,
    w: dict[str, torch.Tensor | None],
    n_heads: int,
    n_kv: int,
    key_mask_BxL: torch.Tensor,
    pos_BxL: torch.Tensor,
    theta: float,
) -> torch.Tensor:
    b, l, _ = h_BxLxD.shape
    q = F.linear(h_BxLxD, w["q"], w["q_bias"])
    dh = q.shape[-1] // n_heads
    q = q.view(b, l, n_heads, dh).transpose(1, 2)
    k = F.linear(h_BxLxD, w["k"], w["k_bias"]).view(b, l, n_kv, dh).transpose(1, 2)
    v = F.linear(h_BxLxD, w["v"], w["v_bias"]).view(b, l, n_kv, dh).transpose(1, 2)
    q, k = _rotate(q, pos_BxL, theta), _rotate(k, pos_BxL, theta)
    k = k.repeat_interleave(n_heads // n_kv, dim=1)
    v = v.repeat_interleave(n_heads // n_kv, dim=1)
    scores_BxHxLxL = q @ k.transpose(-1, -2) / math.sqrt(dh)
    scores_BxHxLxL = scores_BxHxLxL.masked_fill(~key_mask_BxL[:, None, None, :], float("-inf"))
    out = torch.softmax(scores_BxHxLxL, dim=-1) @ v
    return F.linear(out.transpose(1, 2).reshape(b, l, n_heads * dh), w["o"])


def _llada(state, config, ids_BxL, mask_BxL) -> torch.Tensor:
    top = "model.transformer."
    n_heads = config["n_heads"]
    n_kv = config.get("n_kv_heads") or n_heads
    eps, theta = config["rms_norm_eps"], config["rope_theta"]
    b, l = ids_BxL.shape
    pos_BxL = torch.arange(l).expand(b, l)  # LLaDA's RoPE: slot index
    x = F.embedding(ids_BxL, state[top + "wte.weight"])
    for i in range(config["n_layers"]):
        p = f"{top}blocks.{i}."
        attn = {
            "q": state[p + "q_proj.weight"],
            "k": state[p + "k_proj.weight"],
            "v": state[p + "v_proj.weight"],
            "o": state[p + "attn_out.weight"],
            "q_bias": state.get(p + "q_proj.bias"),
            "k_bias": state.get(p + "k_proj.bias"),
            "v_bias": state.get(p + "v_proj.bias"),
        }
        h = _rms_norm(x, state[p + "attn_norm.weight"], eps)
        x = x + _attention(h, attn, n_heads, n_kv, mask_BxL, pos_BxL, theta)
        h = _rms_norm(x, state[p + "ff_norm.weight"], eps)
        gated = F.silu(F.linear(h, state[p + "ff_proj.weight"])) * F.linear(
            h, state[p + "up_proj.weight"]
        )
        x = x + F.linear(gated, state[p + "ff_out.weight"])
    x = _rms_norm(x, state[top + "ln_f.weight"], eps)
    head = state[top + "wte.weight"] if config.get("weight_tying") else state[top + "ff_out.weight"]
    return F.linear(x, head)


def _dream(state, config, ids_BxL, mask_BxL) -> torch.Tensor:
    n_heads = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_heads
    eps, theta = config.get("rms_norm_eps", 1e-6), config.get("rope_theta", 10000.0)
    pos_BxL = (mask_BxL.long().cumsum(-1) - 1).clamp(min=0)  # Dream's sampler positions
    x = F.embedding(ids_BxL, state["model.embed_tokens.weight"])
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        attn = {n: state[f"{p}self_attn.{n}_proj.weight"] for n in ("q", "k", "v", "o")} | {
            f"{n}_bias": state[f"{p}self_attn.{n}_proj.bias"] for n in ("q", "k", "v")
        }
        h = _rms_norm(x, state[p + "input_layernorm.weight"], eps)
        x = x + _attention(h, attn, n_heads, n_kv, mask_BxL, pos_BxL, theta)
        h = _rms_norm(x, state[p + "post_attention_layernorm.weight"], eps)
        gated = F.silu(F.linear(h, state[p + "mlp.gate_proj.weight"])) * F.linear(
            h, state[p + "mlp.up_proj.weight"]
        )
        x = x + F.linear(gated, state[p + "mlp.down_proj.weight"])
    x = _rms_norm(x, state["model.norm.weight"], eps)
    head = (
        state["model.embed_tokens.weight"]
        if config.get("tie_word_embeddings")
        else state["lm_head.weight"]
    )
    return F.linear(x, head)


@torch.no_grad()
def forward(state: dict[str, torch.Tensor], config: dict, ids_BxL, mask_BxL) -> torch.Tensor:
    """fp32 logits [B, L, V] of a LLaDA- or Dream-layout checkpoint (pad query rows undefined)."""
    ids = torch.as_tensor(np.asarray(ids_BxL), dtype=torch.long)
    mask = torch.as_tensor(np.asarray(mask_BxL)).bool()
    family = str(config.get("model_type")).lower()
    if family == "llada":
        return _llada(state, config, ids, mask)
    if family == "dream":
        return _dream(state, config, ids, mask)
    raise ValueError(f"reference forward knows llada and Dream, not {config.get('model_type')!r}")


def reference_logits(directory: str | Path, ids_BxL, mask_BxL) -> np.ndarray:
    state, config = load_checkpoint(directory)
    return forward(state, config, ids_BxL, mask_BxL).numpy()
