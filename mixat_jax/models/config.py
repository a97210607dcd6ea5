"""Model and LoRA configuration for the decoder family (Llama 2/3/3.1, Mistral/Zephyr, Qwen2/2.5).

Masked-diffusion LMs (LLaDA, Dream; DAT spec §5) are read and written by `diffusion_config`,
to which `from_hf` / `to_hf` dispatch on `model_type`.

`ModelConfig.from_hf(config_json)` reads a Hugging Face `config.json` and refuses anything the
decoder would silently compute differently (unknown `model_type`, activations other than SiLU,
unsupported RoPE scaling types, Qwen2 sliding windows that are actually in use, ...).
`LoraConfig` mirrors the PEFT `LoraConfig` fields MixAT uses (MixAT spec §3.1: r=64, alpha=16,
dropout 0.1, "all-linear").
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mixat_jax.models import diffusion_config

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling (`rope_type == "llama3"`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static architecture description; hashable so it can be a static jit argument."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    model_type: str = "llama"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    causal: bool = True  # False: bidirectional attention (masked-diffusion LMs, DAT)
    # Masked-diffusion LMs (LLaDA, Dream; DAT spec §5): the [MASK] token id, and whether the
    # logits at position i predict token i + 1 (Dream keeps its AR initialisation's shift).
    mask_token_id: int | None = None
    shift_logits: bool = False
    dtype: str = "float32"  # parameter + activation dtype ("float32" | "bfloat16")
    remat: bool = False  # jax.checkpoint around each decoder block

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        d, f, n = self.hidden_size, self.intermediate_size, self.num_layers
        attn = d * self.q_size * 2 + d * self.kv_size * 2
        per_layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return n * per_layer + self.vocab_size * d + d + head

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> ModelConfig:
        """Builds a config from a parsed HF `config.json`; raises ValueError on unsupported options."""
        mt = hf.get("model_type")
        family = mt.lower() if isinstance(mt, str) else mt
        if family == "llada":  # masked-diffusion LMs (DAT spec §5): their own config layouts
            fields, vocab = diffusion_config.llada_fields(hf)
            cfg = cls(**fields).replace(**overrides)
            diffusion_config.check_mask_token(cfg, vocab)
            return cfg
        if family == "dream":
            fields = diffusion_config.dream_fields(hf)
            cfg = cls.from_hf({**hf, "model_type": "qwen2"}).replace(**fields, **overrides)
            diffusion_config.check_mask_token(cfg)
            return cfg
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {mt!r}: mixat_jax supports {', '.join(SUPPORTED_MODEL_TYPES)} "
                "(causal) and llada, Dream (masked diffusion); convert the checkpoint to one of these families"
            )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(
                f"unsupported hidden_act {act!r}: only 'silu' (SwiGLU MLP) is implemented"
            )
        n_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        head_dim = hf.get("head_dim") or hidden // n_heads
        rope = dict(hf.get("rope_parameters") or {})
        legacy = hf.get("rope_scaling") or {}
        rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_type = (
            rope.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
        )
        scaling_src = {**legacy, **rope}
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=float(scaling_src["factor"]),
                low_freq_factor=float(scaling_src["low_freq_factor"]),
                high_freq_factor=float(scaling_src["high_freq_factor"]),
                original_max_position_embeddings=int(
                    scaling_src["original_max_position_embeddings"]
                ),
            )
        elif rope_type != "default":
            raise ValueError(
                f"unsupported rope scaling type {rope_type!r}: only 'default' and 'llama3' are implemented"
            )
        sliding = hf.get("sliding_window")
        if mt == "qwen2":
            # Qwen2 only applies the window when use_sliding_window is set.
            if hf.get("use_sliding_window", False):
                raise ValueError(
                    "Qwen2 use_sliding_window=true is not supported (it changes attention on some layers); "
                    "set use_sliding_window=false in config.json"
                )
            sliding = None
        if mt == "llama":
            sliding = None
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        attention_bias = bool(hf.get("attention_bias", False))
        cfg = cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=n_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            head_dim=int(head_dim),
            model_type=mt,
            rope_theta=rope_theta,
            rope_scaling=scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=True if mt == "qwen2" else attention_bias,
            o_bias=False if mt == "qwen2" else attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=int(sliding) if sliding else None,
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=hf.get("pad_token_id"),
        )
        if cfg.num_heads % cfg.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={cfg.num_heads} is not a multiple of "
                f"num_key_value_heads={cfg.num_kv_heads}"
            )
        return cfg.replace(**overrides)

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict for this architecture (for merged-weight export)."""
        if self.model_type == "llada":  # the family's own layout
            return diffusion_config.llada_to_hf(self)
        if self.model_type == "dream":
            return diffusion_config.dream_to_hf(self)
        arch = {
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
        }
        out: dict[str, Any] = {
            "architectures": [arch[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids)
            if len(self.eos_token_ids) != 1
            else self.eos_token_ids[0],
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.dtype,
        }
        if self.model_type == "llama":
            out["attention_bias"] = self.qkv_bias
            out["mlp_bias"] = self.mlp_bias
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            out["use_sliding_window"] = False
        if self.rope_scaling is not None:
            out["rope_scaling"] = {
                "rope_type": "llama3",
                **dataclasses.asdict(self.rope_scaling),
            }
        return out


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """PEFT-compatible LoRA settings. `targets` = module names or "all-linear" (all but lm_head)."""

    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.1
    targets: tuple[str, ...] = LINEAR_NAMES

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    @classmethod
    def make(
        cls, r: int = 64, alpha: float = 16.0, dropout: float = 0.1, targets: Any = "all-linear"
    ) -> LoraConfig:
        if isinstance(targets, str):
            targets = (
                LINEAR_NAMES
                if targets == "all-linear"
                else tuple(t for t in targets.split("|") if t)
            )
        targets = tuple(targets)
        bad = [t for t in targets if t not in LINEAR_NAMES]
        if bad:
            raise ValueError(
                f"unknown LoRA target(s) {bad}: use names from {'|'.join(LINEAR_NAMES)} or 'all-linear'"
            )
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        return cls(r=int(r), alpha=float(alpha), dropout=float(dropout), targets=targets)


def tiny_config(**kw: Any) -> ModelConfig:
    """A few-layer preset for tests and the CPU demo."""
    base = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
    )
    base.update(kw)
    return ModelConfig(**base)


PRESETS: dict[str, dict[str, Any]] = {
    # Shapes of the reference models (for AOT compile / memory analysis and GPU benchmarks).
    "llama3_8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=500000.0,
        model_type="llama",
    ),
    "llama3_2_1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        rope_theta=500000.0,
        model_type="llama",
        tie_word_embeddings=True,
    ),
    "mistral_7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=10000.0,
        model_type="mistral",
    ),
    "qwen2_5_14b": dict(
        vocab_size=152064,
        hidden_size=5120,
        intermediate_size=13824,
        num_layers=48,
        num_heads=40,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=1e6,
        model_type="qwen2",
        qkv_bias=True,
    ),
    "qwen2_5_32b": dict(
        vocab_size=152064,
        hidden_size=5120,
        intermediate_size=27648,
        num_layers=64,
        num_heads=40,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=1e6,
        model_type="qwen2",
        qkv_bias=True,
    ),
}


def preset(name: str, **kw: Any) -> ModelConfig:
    if name == "tiny":
        return tiny_config(**kw)
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}: choose from tiny, {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **kw})
