"""GGUF (llama.cpp) checkpoints in (issue #12, "GGUF in"): metadata -> HF `config.json` dict,
tensors -> lazily dequantized arrays under Hugging Face names, tokenizer + chat template.

`GGUFCheckpoint(path)` is a read-only mapping HF tensor name -> `GGUFTensor`, so `hf.load` streams
a GGUF file into the target sharding exactly like a safetensors checkpoint: every device's callback
reads and dequantizes only the rows of its own slice (quantization blocks run along a row, so rows
dequantize independently). Tensors are read with the `gguf` package (`GGUFReader` memmaps the file)
and dequantized with its numpy dequantizers (`gguf.quants.dequantize`) to float32.

Names: llama.cpp's `token_embd`, `output_norm`, `output`, `blk.N.{attn_norm, attn_q, attn_k,
attn_v, attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}` map onto `model.embed_tokens`,
`model.norm`, `lm_head`, `model.layers.N.{input_layernorm, self_attn.{q,k,v,o}_proj,
post_attention_layernorm, mlp.{gate,up,down}_proj}`. For the `llama` architecture llama.cpp's
converter permutes the rows of Q and K (per head, interleaving the two rotary halves for its
non-NeoX RoPE); reading undoes that permutation, so the tensors equal the HF checkpoint's. `qwen2`
files are not permuted (NeoX RoPE) and carry q/k/v biases.

Architectures: `llama` (Llama 1/2/3/3.1/3.2, Mistral, SmolLM, TinyLlama, ...) and `qwen2`. Llama
3.1's RoPE scaling, which llama.cpp stores as a `rope_freqs` tensor of per-frequency divisors, is
turned back into HF `rope_scaling` (rope_type llama3) and checked by recomputing the divisors.
Anything the decoder would compute differently (another architecture, mixture of experts,
per-layer head counts, partial rotary, linear / YaRN RoPE scaling) is refused in one line.
Tensor types: those in `SUPPORTED_TYPES` (every type `gguf.quants` dequantizes in numpy that has
been checked here); others (IQ*, TQ*, MXFP4 ...) are refused in one line naming the tensor.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
SUPPORTED_TYPES = frozenset(
    {
        Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
        Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
    }
)  # fmt: skip

_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RX = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
_FIX = (
    "convert the original Hugging Face checkpoint instead, or re-quantize the GGUF file with "
    "llama.cpp to Q8_0 / Q4_K_M"
)


def hf_name(gguf_name: str) -> str:
    """The Hugging Face tensor name of a llama.cpp tensor name (unknown names come back as is)."""
    if gguf_name in _TOP:
        return _TOP[gguf_name]
    m = _BLOCK_RX.match(gguf_name)
    if m and m.group(2) in _BLOCK:
        return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"
    return gguf_name


def unpermute_rows(num_rows: int, n_head: int) -> np.ndarray:
    """`order[r]` = the GGUF row holding HF row `r` of a llama-arch Q or K projection.

    llama.cpp writes `w.reshape(n_head, 2, d, ...).swapaxes(1, 2)` (d = head_dim / 2); this is the
    inverse, applied to row indices so that a row slice stays a cheap gather."""
    d = num_rows // n_head // 2
    return np.arange(num_rows).reshape(n_head, d, 2).swapaxes(1, 2).reshape(num_rows)


class GGUFTensor:
    """One tensor of a GGUF file in HF orientation ([out, in]); indexing dequantizes only the rows
    asked for (float32). `.T` is the transposed view `hf.load` uses for linear kernels."""

    def __init__(self, name: str, data: np.ndarray, qtype: Q, shape: tuple[int, ...], order=None):
        self.name = name
        self.qtype = qtype
        self.shape = shape
        self._data = data  # memmap: logical shape for float types, (rows, bytes) for block types
        self._order = order  # row permutation (llama Q/K) or None
        self.ndim = len(shape)
        self.dtype = np.dtype(np.float32)

    def _rows(self, rows) -> np.ndarray:
        if self.ndim == 1 and self.qtype not in (Q.F32, Q.F16):  # blocks span the vector: all
            out = np.asarray(gguf.quants.dequantize(self._data, self.qtype), np.float32)
            return out if self._order is None else out[self._order][rows]
        if self._order is not None:
            rows = self._order[rows]
        return np.asarray(gguf.quants.dequantize(self._data[rows], self.qtype), np.float32)

    def __getitem__(self, index) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        rows, rest = (index[0], index[1:]) if index else (slice(None), ())
        out = self._rows(rows).reshape(self._row_shape(rows))
        return out[(slice(None), *rest)] if not isinstance(rows, int | np.integer) else out[rest]

    def _row_shape(self, rows) -> tuple[int, ...]:
        if isinstance(rows, int | np.integer):
            return self.shape[1:]
        return (len(range(self.shape[0])[rows]), *self.shape[1:])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    @property
    def T(self) -> _Transposed:  # noqa: N802 - numpy's spelling
        if self.ndim != 2:
            raise ValueError(f"GGUF tensor {self.name} is not 2-D; cannot transpose it")
        return _Transposed(self)


class _Transposed:
    """`GGUFTensor.T`: indexing reads the base's rows for the requested columns."""

    def __init__(self, base: GGUFTensor):
        self.base = base
        self.shape = base.shape[::-1]
        self.ndim = 2
        self.dtype = base.dtype

    @property
    def T(self) -> GGUFTensor:  # noqa: N802
        return self.base

    def __getitem__(self, index) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        cols, rows = (tuple(index) + (slice(None), slice(None)))[:2]
        return self.base[rows, cols].T

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self.base[:].T
        return out if dtype is None else out.astype(dtype)


def llama3_factors(inv_freq: np.ndarray, p: dict[str, float]) -> np.ndarray:
    """Per-frequency divisors of Llama-3 RoPE scaling (llama.cpp's `rope_freqs` tensor)."""
    old = p["original_max_position_embeddings"]
    wavelen = 2 * np.pi / inv_freq
    smooth = (old / wavelen - p["low_freq_factor"]) / (p["high_freq_factor"] - p["low_freq_factor"])
    mid = 1 / ((1 - smooth) / p["factor"] + smooth)
    out = np.where(wavelen > old / p["low_freq_factor"], p["factor"], mid)
    return np.where(wavelen < old / p["high_freq_factor"], 1.0, out)


def llama3_rope_scaling(
    factors: np.ndarray, *, theta: float, head_dim: int, original_context: int, where: Any
) -> dict[str, Any] | None:
    """The HF `rope_scaling` (rope_type llama3) that reproduces llama.cpp's `rope_freqs` tensor.

    llama.cpp stores Llama 3.1's scaling as per-frequency divisors: 1 for short wavelengths,
    `factor` for long ones, `1 / ((1 - s) / factor + s)` between, where `s` is linear in
    1 / wavelength. `factor` is the largest divisor; the two thresholds come from the smooth band
    (a line fit when it holds two or more frequencies, otherwise a search between the wavelengths
    that bracket them, which all give the same divisors), rounded to 6 digits when that still fits.
    The result is checked by recomputing the tensor; anything else is refused in one line."""
    inv = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if factors.shape != inv.shape:
        raise ValueError(
            f"{where}: rope_freqs holds {factors.size} values but head_dim {head_dim} needs "
            f"{inv.size}; the file is inconsistent"
        )
    factor = float(factors.max())
    if np.allclose(factors, 1.0, rtol=1e-6):
        return None
    wavelen = 2 * np.pi / inv
    ones, full = np.isclose(factors, 1.0, rtol=1e-6), np.isclose(factors, factor, rtol=1e-6)
    mid = ~ones & ~full
    old = float(original_context)
    s = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)  # = old / w / (hf - lf) - lf / (hf - lf)
    candidates = []
    if mid.sum() >= 2:
        slope, icpt = np.polyfit(1 / wavelen[mid], s, 1)
        low = -icpt * old / slope
        candidates.append((low, low + old / slope))
    else:  # thresholds are only bracketed: try high-threshold wavelengths across the bracket
        a = wavelen[ones].max() if ones.any() else wavelen.min() / 4
        b = wavelen[~ones].min()
        for hi_w in np.geomspace(a, b, 66)[1:-1]:
            high = old / hi_w
            if mid.sum() == 1:  # the band's one point then fixes the low threshold
                low = (old / wavelen[mid][0] - s[0] * high) / (1 - s[0])
            else:
                c = wavelen[~full].max()
                d = wavelen[full].min() if full.any() else wavelen.max() * 4
                low = old / np.sqrt(c * d)
            candidates.append((low, high))
    for low, high in candidates:
        for digits in (6, 17):  # the round values the converter started from, when they fit
            params = {
                "rope_type": "llama3",
                "factor": float(f"{factor:.{digits}g}"),
                "low_freq_factor": float(f"{low:.{digits}g}"),
                "high_freq_factor": float(f"{high:.{digits}g}"),
                "original_max_position_embeddings": int(original_context),
            }
            if 0 < low < high and np.allclose(llama3_factors(inv, params), factors, rtol=1e-5):
                return params
    raise ValueError(
        f"{where}: rope_freqs is not a Llama-3-style RoPE scaling mixat_jax can reproduce; "
        "convert the original Hugging Face checkpoint instead"
    )


def _f32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _field_value(field) -> Any:
    """A metadata value as Python (str / int / float / bool / list), gguf>=0.10 field layout."""
    types = field.types
    if not types:
        return None

    def one(t, part):
        if t == gguf.GGUFValueType.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        v = part.tolist()
        v = v[0] if isinstance(v, list) else v
        return bool(v) if t == gguf.GGUFValueType.BOOL else v

    if types[0] == gguf.GGUFValueType.ARRAY:
        return [one(types[-1], field.parts[i]) for i in field.data]
    return one(types[0], field.parts[field.data[0]])


class GGUFCheckpoint(Mapping):
    """Read-only mapping HF tensor name -> `GGUFTensor` for one `.gguf` file, plus its metadata."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise ValueError(f"GGUF file {str(path)!r} does not exist; pass a .gguf file")
        try:
            reader = gguf.GGUFReader(self.path, "r")
        except Exception as e:  # noqa: BLE001 - truncated / corrupt files raise many kinds
            raise ValueError(
                f"{self.path}: not a readable GGUF file ({type(e).__name__}: "
                f"{' '.join(str(e).split())[:160]}); the file is truncated or corrupt, re-download it"
            ) from None
        self._reader = reader
        self.metadata = {
            k: _field_value(f) for k, f in reader.fields.items() if k != "tokenizer.ggml.merges"
        }
        self.architecture = str(self.metadata.get("general.architecture", ""))
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{self.path}: GGUF architecture {self.architecture!r} is not supported; mixat_jax "
                f"reads {', '.join(SUPPORTED_ARCHITECTURES)} files (Llama, Mistral, SmolLM, Qwen2 "
                "families); use a model of one of these families"
            )
        infos = {t.name: t for t in reader.tensors}
        bad = [
            f"{n} ({t.tensor_type.name})"
            for n, t in infos.items()
            if t.tensor_type not in SUPPORTED_TYPES
        ]
        if bad:
            raise ValueError(
                f"{self.path}: unsupported GGUF tensor type for {', '.join(bad[:4])}"
                f"{' ...' if len(bad) > 4 else ''}; supported: "
                f"{', '.join(sorted(t.name for t in SUPPORTED_TYPES))}; {_FIX}"
            )
        self.hf_config = self._hf_config(infos)
        self._tensors: dict[str, GGUFTensor] = {}
        n_heads = self.hf_config["num_attention_heads"]
        n_kv = self.hf_config["num_key_value_heads"]
        for name, t in infos.items():
            if name == "rope_freqs.weight":
                continue
            shape = tuple(int(s) for s in reversed(t.shape.tolist()))
            order = None
            if self.architecture == "llama" and re.search(r"\.attn_[qk]\.(weight|bias)$", name):
                order = unpermute_rows(shape[0], n_heads if ".attn_q." in name else n_kv)
            self._tensors[hf_name(name)] = GGUFTensor(name, t.data, t.tensor_type, shape, order)

    def _get(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        full = f"{self.architecture}.{key}"
        if full not in self.metadata:
            if required:
                raise ValueError(
                    f"{self.path}: GGUF metadata lacks {full}; the file is incomplete (re-convert it "
                    "with a current llama.cpp)"
                )
            return default
        return self.metadata[full]

    def _hf_config(self, infos: Mapping[str, Any]) -> dict[str, Any]:
        """The HF `config.json` dict the metadata describes (refusing what the decoder lacks)."""
        arch, where = self.architecture, self.path
        if self._get("expert_count", 0):
            raise ValueError(
                f"{where}: mixture-of-experts GGUF files are not supported (dense models only)"
            )
        n_heads = self._get("attention.head_count", required=True)
        n_kv = self._get("attention.head_count_kv", n_heads)
        if isinstance(n_heads, list) or isinstance(n_kv, list):
            raise ValueError(
                f"{where}: per-layer head counts are not supported (uniform layers only)"
            )
        hidden = int(self._get("embedding_length", required=True))
        head_dim = int(self._get("attention.key_length", hidden // int(n_heads)))
        if int(self._get("attention.value_length", head_dim)) != head_dim:
            raise ValueError(f"{where}: key and value head sizes differ; not supported")
        rot = self._get("rope.dimension_count", head_dim)
        if int(rot) != head_dim:
            raise ValueError(
                f"{where}: partial rotary embeddings ({rot} of {head_dim} dims) are not supported"
            )
        scaling = self._get("rope.scaling.type", "none")
        if scaling not in ("none", None) and float(self._get("rope.scaling.factor", 1.0)) != 1.0:
            raise ValueError(f"{where}: RoPE scaling {scaling!r} is not supported")
        rope_scaling = None
        if "rope_freqs.weight" in infos:
            t = infos["rope_freqs.weight"]
            factors = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float64)
            rope_scaling = llama3_rope_scaling(
                factors,
                theta=_f32(self._get("rope.freq_base", 10000.0)),
                head_dim=head_dim,
                original_context=int(self._get("rope.scaling.original_context_length", 8192)),
                where=where,
            )
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        embd = infos.get("token_embd.weight")
        vocab = self._get("vocab_size") or (
            int(embd.shape[-1]) if embd is not None else len(tokens or ())
        )
        if tokens is not None and len(tokens) > int(vocab):
            raise ValueError(
                f"{where}: the tokenizer lists {len(tokens)} tokens but the model's vocabulary is "
                f"{vocab}; the file is inconsistent"
            )
        md = self.metadata
        eos = [md[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                               "tokenizer.ggml.eom_token_id") if md.get(k) is not None]  # fmt: skip
        eos = list(dict.fromkeys(int(e) for e in eos))
        out: dict[str, Any] = {
            "model_type": arch,
            "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(self._get("feed_forward_length", required=True)),
            "num_hidden_layers": int(self._get("block_count", required=True)),
            "num_attention_heads": int(n_heads),
            "num_key_value_heads": int(n_kv),
            "head_dim": head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": int(self._get("context_length", 4096)),
            "rms_norm_eps": _f32(self._get("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": _f32(self._get("rope.freq_base", 10000.0)),
            "tie_word_embeddings": "output.weight" not in infos,
            "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "pad_token_id": md.get("tokenizer.ggml.padding_token_id"),
        }
        if rope_scaling is not None:
            out["rope_scaling"] = rope_scaling
        if arch == "llama":
            out["attention_bias"] = "blk.0.attn_q.bias" in infos
            out["mlp_bias"] = False
        if arch == "qwen2":
            out["use_sliding_window"] = False
        return out

    def generation_config(self) -> dict[str, Any]:
        """`generation_config.json` for a converted directory (the token ids the file names)."""
        c = self.hf_config
        return {
            k: c[k]
            for k in ("bos_token_id", "eos_token_id", "pad_token_id")
            if c.get(k) is not None
        }

    def __getitem__(self, name: str) -> GGUFTensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def load_tokenizer(path: str | Path, chat_template: str | None = None):
    """The tokenizer transformers builds from the GGUF metadata, with the file's chat template.

    `chat_template` (the file's `tokenizer.chat_template`) is set when transformers left it out.
    For a byte-level (gpt2) vocabulary without `<|endoftext|>` (Llama 3) transformers appends that
    token as its default unknown token, one id past the model's vocabulary; no chat template or
    attack writes it, so it is left as transformers builds it."""
    from transformers import AutoTokenizer

    p = Path(path).expanduser()
    try:
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            f"{p}: could not build the tokenizer from the GGUF metadata ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:200]})"
        ) from None
    if chat_template and not getattr(tok, "chat_template", None):
        tok.chat_template = chat_template
    return tok
