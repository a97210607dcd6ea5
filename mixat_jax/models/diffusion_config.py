"""Masked-diffusion LM configs: LLaDA's and Dream's `config.json` vocabulary <-> `ModelConfig` fields
(DAT spec §5.1 LLaDA, §5.2 Dream, §5.5 tiny models). `ModelConfig.from_hf` / `to_hf` dispatch here
by `model_type`; this module builds field dicts and checks configs (duck-typed), so it does not
import `config` back.

Both families run on the shared `Decoder` with bidirectional attention (`causal=False`):

* **LLaDA** ships its own (OLMo-derived) `config.json`: `d_model`, `n_layers`, `n_heads`,
  `n_kv_heads`, `mlp_hidden_size`, `embedding_size`, `weight_tying`, ... Only the `llama` block
  with RMSNorm, SiLU gating and RoPE is implemented; every option that would change the forward
  (ALiBi, logit/embedding scaling, q/k layer norms, qkv clipping, biases other than q/k/v, ...)
  is refused with a one-line error naming the field, never ignored. The embedding matrix has
  `embedding_size` rows (>= `vocab_size`); the decoder keeps all of them, so the logits have
  `embedding_size` columns exactly as LLaDA's own `ff_out` (LLaDA-8B: both 126464).
* **Dream** uses Qwen2 field names (q/k/v biases, no o_proj/MLP bias, head_dim = hidden/heads)
  and keeps its autoregressive initialisation's shift: logits at position i predict token i + 1
  (`shift_logits=True`; the sampler realigns them, spec §5.2).

The [MASK] id must be a real token (inside `vocab_size`) and differ from the pad id (spec §5.1,
"Padding"). `require_diffusion` / `require_causal` turn a checkpoint of the wrong kind into one
clear line.
"""

from __future__ import annotations

from typing import Any

DIFFUSION_MODEL_TYPES = ("llada", "dream")
LLADA_DEFAULT_MASK_ID = 126336  # `<|mdm_mask|>` of the LLaDA-8B tokenizer (spec §5.1)
DREAM_DEFAULT_MASK_ID = 151666  # Dream 7B (spec §5.2); DreamConfig's own default


def is_diffusion_hf(hf: dict[str, Any]) -> bool:
    """Whether a parsed `config.json` describes a masked-diffusion family handled here."""
    mt = hf.get("model_type")
    return isinstance(mt, str) and mt.lower() in DIFFUSION_MODEL_TYPES


def is_diffusion(cfg: Any) -> bool:
    return not cfg.causal


def require_diffusion(cfg: Any, what: str) -> None:
    """Raises a one-line ValueError unless `cfg` is a masked-diffusion LM with a [MASK] id."""
    if cfg.causal:
        raise ValueError(
            f"{what} is a causal LM (model_type {cfg.model_type!r}); "
            "pass a masked-diffusion checkpoint (LLaDA or Dream)"
        )
    if cfg.mask_token_id is None:
        raise ValueError(
            f"{what} is bidirectional but has no mask_token_id; set mask_token_id in its config.json"
        )


def require_causal(cfg: Any, what: str) -> None:
    """Raises a one-line ValueError unless `cfg` is a causal (autoregressive) LM."""
    if not cfg.causal:
        raise ValueError(
            f"{what} is a masked-diffusion LM (model_type {cfg.model_type!r}); "
            "pass a causal LM checkpoint (Llama, Mistral or Qwen2)"
        )


def check_mask_token(cfg: Any, vocab_size: int | None = None) -> None:
    """The [MASK] id must be a token of the vocabulary and must not be the pad id."""
    vocab = cfg.vocab_size if vocab_size is None else vocab_size
    m = cfg.mask_token_id
    if m is None:
        raise ValueError(
            f"{cfg.model_type} config has no mask_token_id; set it in config.json "
            "(the id of the tokenizer's [MASK] token)"
        )
    if not 0 <= m < vocab:
        raise ValueError(
            f"mask_token_id={m} is outside the vocabulary (vocab_size={vocab}); "
            "set mask_token_id to the id of the tokenizer's [MASK] token"
        )
    if cfg.pad_token_id is not None and m == cfg.pad_token_id:
        raise ValueError(
            f"mask_token_id={m} equals pad_token_id; the pad id must differ from the [MASK] id "
            "(spec §5.1) — give the tokenizer a separate pad token"
        )


def _eos_ids(eos: Any) -> tuple[int, ...]:
    if eos is None:
        return ()
    return tuple(int(e) for e in eos) if isinstance(eos, list) else (int(eos),)


# --------------------------------------------------------------------------------------- LLaDA
def _llada_refuse(field: str, value: Any, why: str, fix: str) -> ValueError:
    return ValueError(f"LLaDA config {field}={value!r} is not supported ({why}); {fix}")


# (field, value that is refused when equal, what it would change, fix). `None` sentinel below.
_LLADA_REFUSED_IF_TRUE = (
    ("alibi", "ALiBi attention biases", "use a RoPE checkpoint (alibi=false, rope=true)"),
    (
        "scale_logits",
        "logits scaled by 1/sqrt(d_model)",
        "only scale_logits=false checkpoints are implemented",
    ),
    (
        "input_emb_norm",
        "embeddings scaled by sqrt(d_model)",
        "only input_emb_norm=false checkpoints are implemented",
    ),
    (
        "attention_layer_norm",
        "layer norms on q and k",
        "only attention_layer_norm=false checkpoints are implemented",
    ),
    (
        "include_bias",
        "biases on every linear layer and norm",
        "only include_bias=false checkpoints are implemented",
    ),
    (
        "bias_for_layer_norm",
        "biases on the RMSNorms",
        "only bias_for_layer_norm=false/null checkpoints are implemented",
    ),
)


# (field, default when absent, the only value implemented, what another value means, the fix)
_LLADA_REQUIRED: tuple[tuple[str, Any, Any, str, str], ...] = (
    ("rope", True, True, "learned absolute position embeddings", "set rope=true"),
    ("clip_qkv", None, None, "q/k/v clamped to ±clip_qkv", "set clip_qkv=null"),
    ("block_type", "llama", "llama",
     "only the 'llama' block (separate q/k/v, ff_proj·up_proj gating) is implemented",
     "use a block_type='llama' checkpoint"),
    # 'swiglu' would split ff_proj's output in halves before the up_proj product, which the llama
    # block cannot even shape-check; gelu/relu change the gate non-linearity.
    ("activation_type", "silu", "silu",
     "the llama block gates as ff_out(silu(ff_proj(x)) * up_proj(x))",
     "use activation_type='silu'"),
    ("layer_norm_type", "rms", "rms", "only RMSNorm is implemented", "use layer_norm_type='rms'"),
    ("layer_norm_with_affine", True, True, "RMSNorms without a weight",
     "use layer_norm_with_affine=true"),
    ("block_group_size", 1, 1, "grouped blocks are stored under transformer.block_groups.*",
     "use block_group_size=1"),
)  # fmt: skip


def _llada_checks(hf: dict[str, Any]) -> None:
    for field, why, fix in _LLADA_REFUSED_IF_TRUE:
        if hf.get(field):
            raise _llada_refuse(field, hf[field], why, fix)
    for field, default, required, why, fix in _LLADA_REQUIRED:
        value = hf.get(field, default)
        if (value is not required) if isinstance(required, bool) else (value != required):
            raise _llada_refuse(field, value, why, fix)
    scaling = hf.get("rope_scaling")
    if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
        raise _llada_refuse(
            "rope_scaling", scaling, "scaled RoPE frequencies", "use rope_scaling=null"
        )


def _llada_kv_heads(hf: dict[str, Any], n_heads: int) -> int:
    """OLMo's `effective_n_kv_heads`: n_kv_heads, or 1 / n_heads from multi_query_attention."""
    mqa = hf.get("multi_query_attention")
    n_kv = hf.get("n_kv_heads")
    if n_kv is None:
        return 1 if mqa is True else n_heads
    n_kv = int(n_kv)
    if mqa is not None and n_kv != (1 if mqa else n_heads):
        raise ValueError(
            f"LLaDA config multi_query_attention={mqa!r} contradicts n_kv_heads={n_kv}; "
            "set multi_query_attention=null and keep n_kv_heads"
        )
    return n_kv


def llada_fields(hf: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """LLaDA's own `config.json` layout -> (`ModelConfig` fields of the bidirectional decoder, the
    tokenizer vocabulary size for the mask-id check); raises on unsupported options."""
    _llada_checks(hf)
    d = int(hf["d_model"])
    n_heads = int(hf["n_heads"])
    if d % n_heads:
        raise ValueError(f"LLaDA config d_model={d} is not a multiple of n_heads={n_heads}")
    n_kv = _llada_kv_heads(hf, n_heads)
    if n_kv <= 0 or n_heads % n_kv:
        raise ValueError(
            f"LLaDA config n_heads={n_heads} is not a multiple of n_kv_heads={n_kv}; "
            "fix n_kv_heads in config.json"
        )
    vocab = int(hf["vocab_size"])
    rows = int(hf.get("embedding_size") or vocab)
    if rows < vocab:
        raise ValueError(
            f"LLaDA config embedding_size={rows} is smaller than vocab_size={vocab}; "
            "embedding_size must be at least vocab_size"
        )
    mlp = hf.get("mlp_hidden_size")
    ff = int(mlp) if mlp is not None else int(hf.get("mlp_ratio", 4)) * d
    fields = dict(
        vocab_size=rows,  # wte / ff_out have embedding_size rows; logits cover all of them
        hidden_size=d,
        intermediate_size=ff,
        num_layers=int(hf["n_layers"]),
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=d // n_heads,
        model_type="llada",
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        tie_word_embeddings=bool(hf.get("weight_tying", False)),
        qkv_bias=bool(hf.get("include_qkv_bias", False)),
        max_position_embeddings=int(hf.get("max_sequence_length", 4096)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
        causal=False,
        mask_token_id=int(hf.get("mask_token_id", LLADA_DEFAULT_MASK_ID)),
        shift_logits=False,
    )
    return fields, vocab


def llada_to_hf(cfg: Any) -> dict[str, Any]:
    """LLaDA's own `config.json` layout (loads back with `llada_from_hf`)."""
    eos = list(cfg.eos_token_ids)
    return {
        "architectures": ["LLaDAModelLM"],
        "model_type": "llada",
        "d_model": cfg.hidden_size,
        "n_layers": cfg.num_layers,
        "n_heads": cfg.num_heads,
        "n_kv_heads": cfg.num_kv_heads,
        "multi_query_attention": None,
        "mlp_hidden_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "embedding_size": cfg.vocab_size,
        "max_sequence_length": cfg.max_position_embeddings,
        "rope": True,
        "rope_theta": cfg.rope_theta,
        "rope_full_precision": True,
        "alibi": False,
        "rms_norm_eps": cfg.rms_norm_eps,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "bias_for_layer_norm": False,
        "attention_layer_norm": False,
        "activation_type": "silu",
        "block_type": "llama",
        "block_group_size": 1,
        "include_bias": False,
        "include_qkv_bias": cfg.qkv_bias,
        "input_emb_norm": False,
        "scale_logits": False,
        "weight_tying": cfg.tie_word_embeddings,
        "mask_token_id": cfg.mask_token_id,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": cfg.pad_token_id,
        "use_cache": False,
        "torch_dtype": cfg.dtype,
    }


# --------------------------------------------------------------------------------------- Dream
def dream_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """Dream (Qwen2 names, `model_type: "Dream"`): the fields that turn the Qwen2 parse of the same
    `config.json` into the bidirectional decoder with shifted logits."""
    hidden, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) != hidden // n_heads:
        raise ValueError(
            f"Dream config head_dim={head_dim} is not supported (Dream's attention uses "
            f"hidden_size // num_attention_heads = {hidden // n_heads}); remove head_dim"
        )
    # The Qwen2 parse supplies names and checks (activation, RoPE scaling, sliding window); Dream's
    # modelling code hard-codes q/k/v biases and bias-free o_proj/MLP whatever the config says.
    return dict(
        model_type="dream",
        qkv_bias=True,
        o_bias=False,
        mlp_bias=False,
        causal=False,
        shift_logits=True,
        mask_token_id=int(hf.get("mask_token_id", DREAM_DEFAULT_MASK_ID)),
    )


def dream_to_hf(cfg: Any) -> dict[str, Any]:
    """Dream's `config.json` (Qwen2 names plus `mask_token_id`; loads back with `dream_from_hf`)."""
    out = cfg.replace(model_type="qwen2").to_hf()
    out.pop("head_dim", None)
    out.update(architectures=["DreamModel"], model_type="Dream", mask_token_id=cfg.mask_token_id)
    return out
