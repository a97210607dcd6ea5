"""Per-family key tables: Hugging Face tensor names <-> mixat_jax parameter paths.

Each rule maps an HF regex (with the layer index as group 1 where the tensor is per-layer) to the
NNX path of the (stacked) parameter and a `transpose` flag (HF `nn.Linear` stores [out, in]; our
kernels are [in, out]). Llama, Mistral and Qwen2 share names; Qwen2 adds q/k/v biases, which the
bias rules cover. Dream (DAT spec §5.2) uses the Qwen2 names. LLaDA (spec §5.1) has its own:
`model.transformer.{wte, ln_f, ff_out}` and per block `attn_norm`, `ff_norm`, `q/k/v_proj`,
`attn_out` (-> o_proj), `ff_proj` (-> gate_proj: LLaDA computes
`ff_out(silu(ff_proj(x)) * up_proj(x))`), `up_proj`, `ff_out` (-> down_proj).
`rules_for(model_type)` gives a family's table. PEFT adapters use
`base_model.model.<hf name minus .weight>.lora_{A,B}.weight`.
"""

from __future__ import annotations

import dataclasses
import functools
import re


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # regex over HF names; group 1 = layer index for stacked params
    path: tuple[str, ...]  # NNX state path
    transpose: bool
    stacked: bool


_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _rules() -> tuple[Rule, ...]:
    rules = [
        Rule(r"model\.embed_tokens\.weight", ("embed_tokens",), False, False),
        Rule(r"model\.norm\.weight", ("norm", "weight"), False, False),
        Rule(r"lm_head\.weight", ("lm_head",), True, False),
    ]
    for norm in ("input_layernorm", "post_attention_layernorm"):
        rules.append(
            Rule(rf"model\.layers\.(\d+)\.{norm}\.weight", ("layers", norm, "weight"), False, True)
        )
    for group, names in (("self_attn", _ATTN), ("mlp", _MLP)):
        for n in names:
            base = rf"model\.layers\.(\d+)\.{group}\.{n}"
            rules.append(Rule(base + r"\.weight", ("layers", n, "kernel"), True, True))
            rules.append(Rule(base + r"\.bias", ("layers", n, "bias"), False, True))
    return tuple(rules)


# LLaDA block tensor -> our linear / norm (LLaDALlamaBlock naming).
_LLADA_BLOCK = (
    ("attn_norm", ("input_layernorm", "weight"), False),
    ("ff_norm", ("post_attention_layernorm", "weight"), False),
    ("q_proj", ("q_proj", "kernel"), True),
    ("k_proj", ("k_proj", "kernel"), True),
    ("v_proj", ("v_proj", "kernel"), True),
    ("attn_out", ("o_proj", "kernel"), True),
    ("ff_proj", ("gate_proj", "kernel"), True),  # the SiLU-gated branch
    ("up_proj", ("up_proj", "kernel"), True),
    ("ff_out", ("down_proj", "kernel"), True),
)


def _llada_rules() -> tuple[Rule, ...]:
    top = r"model\.transformer\."
    rules = [
        Rule(top + r"wte\.weight", ("embed_tokens",), False, False),
        Rule(top + r"ln_f\.weight", ("norm", "weight"), False, False),
        Rule(top + r"ff_out\.weight", ("lm_head",), True, False),
    ]
    block = top + r"blocks\.(\d+)\."
    for name, path, transpose in _LLADA_BLOCK:
        rules.append(Rule(block + name + r"\.weight", ("layers", *path), transpose, True))
    for n in ("q_proj", "k_proj", "v_proj"):  # include_qkv_bias=true
        rules.append(Rule(block + n + r"\.bias", ("layers", n, "bias"), False, True))
    return tuple(rules)


RULES = _rules()
LLADA_RULES = _llada_rules()
FAMILY_TABLES = {
    "llama": RULES,
    "mistral": RULES,
    "qwen2": RULES,
    "dream": RULES,
    "llada": LLADA_RULES,
}


@functools.cache
def _compiled(rules: tuple[Rule, ...]) -> tuple[tuple[re.Pattern, Rule], ...]:
    return tuple((re.compile(r.hf + r"$"), r) for r in rules)


def rules_for(model_type: str) -> tuple[Rule, ...]:
    """The key table of a model family (`ModelConfig.model_type`)."""
    if model_type not in FAMILY_TABLES:
        raise ValueError(
            f"no tensor-name table for model_type {model_type!r}; known: {', '.join(FAMILY_TABLES)}"
        )
    return FAMILY_TABLES[model_type]


def match(hf_name: str, rules: tuple[Rule, ...] = RULES) -> tuple[Rule, int | None] | None:
    for rx, rule in _compiled(rules):
        m = rx.match(hf_name)
        if m:
            return rule, (int(m.group(1)) if rule.stacked else None)
    return None


def hf_name(rule: Rule, layer: int | None) -> str:
    """Inverse of `match`: the HF tensor name for a rule (and layer)."""
    name = rule.hf.replace(r"\.", ".")
    return name.replace(r"(\d+)", str(layer)) if layer is not None else name


def linear_group(name: str) -> str:
    return "self_attn" if name in _ATTN else "mlp"


def peft_key(layer: int, linear: str, which: str) -> str:
    """PEFT adapter tensor name for LoRA factor `which` in {"A", "B"}."""
    return (
        f"base_model.model.model.layers.{layer}.{linear_group(linear)}.{linear}.lora_{which}.weight"
    )


PEFT_RX = re.compile(
    r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$"
)
