"""Masked-diffusion LMs (DAT spec §5.1 LLaDA, §5.2 Dream, §5.5 tiny models) on the NNX Decoder.

Exact logits against an independent torch forward (tests/diffusion_torch_reference.py) that reads
the checkpoint files itself, for both layouts, on batches with [MASK] tokens and right *and* left
padding; sharded == unsharded on 8 devices; every refused config option and bad input is a
single-line ValueError.
"""

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from mixat_jax import load_pretrained
from mixat_jax import mesh as mesh_lib
from mixat_jax.hf import keys
from mixat_jax.hf.load import read_config
from mixat_jax.hf.safetensors_io import SafetensorsFile, save_file
from mixat_jax.models.config import ModelConfig
from mixat_jax.models.diffusion_config import require_causal, require_diffusion
from mixat_jax.tiny_model import build_tiny_checkpoint, build_tiny_diffusion_checkpoint, main
from mixat_jax.tokenizer_build import default_corpus

pytest.importorskip("torch")
pytest.importorskip("safetensors")
from tests import diffusion_torch_reference as ref  # noqa: E402

VOCAB = 512
CORPUS = default_corpus(120_000)


def _build(path, layout, **kw):
    args = dict(
        layout=layout,
        vocab_size=VOCAB,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=96,
        init_std=0.2,  # random norms/biases and large weights: logits far from uniform
        corpus=CORPUS,
        seed=3,
    )
    return build_tiny_diffusion_checkpoint(path, **{**args, **kw})


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusion")
    return {layout: _build(root / layout, layout) for layout in ("llada", "dream")}


def _batch(cfg: ModelConfig, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows: full, right-padded, the same content left-padded, right-padded; ~30 % [MASK]."""
    rng = np.random.RandomState(seed)
    b, l = 4, 12
    body = rng.randint(8, cfg.mask_token_id, size=(b, l))
    body[rng.rand(b, l) < 0.3] = cfg.mask_token_id
    body[:, 0] = rng.randint(8, cfg.mask_token_id, size=b)  # first canvas token is never MASK
    ids = np.full((b, l), cfg.pad_token_id)
    mask = np.zeros((b, l), np.int32)
    ids[0], mask[0] = body[0], 1
    ids[1, :9], mask[1, :9] = body[1, :9], 1  # right padding
    ids[2, 3:], mask[2, 3:] = body[1, :9], 1  # same content, left padding
    ids[3, :5], mask[3, :5] = body[3, :5], 1
    assert (ids == cfg.mask_token_id).any()
    return ids, mask


def _compare(model, directory, ids, mask):
    ours = np.asarray(model(ids, mask))
    theirs = ref.reference_logits(directory, ids, mask)
    real = mask.astype(bool)
    assert ours.shape == theirs.shape
    err = np.abs(ours[real] - theirs[real]).max()
    assert err <= 1e-4, f"max |logit diff| {err}"
    assert np.abs(theirs[real]).std() > 0.5  # a meaningful (non-uniform) model
    return ours


def _one_line_error(fn, *match):
    with pytest.raises(ValueError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for m in match:
        assert m in msg, msg
    return msg


# ------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("layout", ["llada", "dream"])
def test_logits_match_torch_reference(ckpts, layout):
    model, tok = load_pretrained(ckpts[layout])
    cfg = model.cfg
    assert not cfg.causal and cfg.model_type == layout
    assert cfg.mask_token_id == tok.mask_token_id == VOCAB - 1
    assert tok.convert_ids_to_tokens(cfg.mask_token_id) == "<|mdm_mask|>"
    assert cfg.pad_token_id == tok.pad_token_id != cfg.mask_token_id
    assert cfg.shift_logits == (layout == "dream")
    assert cfg.qkv_bias == (layout == "dream")
    ids, mask = _batch(cfg)
    ours = _compare(model, ckpts[layout], ids, mask)
    # left and right padding of the same content give the same logits at the real tokens
    np.testing.assert_allclose(ours[2, 3:], ours[1, :9], atol=2e-5)


def _rewrite(src, dst, edit_tensors, edit_config):
    shutil.copytree(src, dst)
    tensors = {k: np.array(v) for k, v in SafetensorsFile(dst / "model.safetensors").items()}
    edit_tensors(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    hf = json.loads((dst / "config.json").read_text())
    edit_config(hf)
    (dst / "config.json").write_text(json.dumps(hf))
    return dst


def test_llada_qkv_bias_and_weight_tying_match_reference(ckpts, tmp_path):
    rng = np.random.RandomState(1)

    def add_bias_and_tie(t):
        for i in range(2):
            for n, size in (("q", 64), ("k", 32), ("v", 32)):
                t[f"model.transformer.blocks.{i}.{n}_proj.bias"] = rng.randn(size).astype(
                    np.float32
                )
        del t["model.transformer.ff_out.weight"]

    def config(hf):
        hf["include_qkv_bias"] = True
        hf["weight_tying"] = True

    d = _rewrite(ckpts["llada"], tmp_path / "m", add_bias_and_tie, config)
    model, _ = load_pretrained(d)
    assert model.cfg.qkv_bias and model.cfg.tie_word_embeddings and model.lm_head is None
    _compare(model, d, *_batch(model.cfg, seed=1))


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 2, 4)])
def test_sharded_load_equals_unsharded(ckpts, shape):
    assert jax.device_count() == 8, "conftest should provide 8 CPU devices"
    path = ckpts["llada"] if shape[2] == 2 else ckpts["dream"]
    single, _ = load_pretrained(path, with_tokenizer=False)
    ids, mask = _batch(single.cfg, seed=2)
    ids, mask = np.concatenate([ids, ids[::-1]]), np.concatenate([mask, mask[::-1]])
    expected = np.asarray(single(ids, mask))

    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(*shape))
    with jax.set_mesh(mesh):
        model, _ = load_pretrained(path, mesh=mesh, with_tokenizer=False)
        graphdef, state = nnx.split(model)
        specs = [x.sharding.spec for x in jax.tree.leaves(state)]
        assert any(any(a is not None for a in s) for s in specs)
        batch = mesh_lib.shard_batch({"ids": ids, "mask": mask}, mesh)
        fn = jax.jit(lambda st, i, m: nnx.merge(graphdef, st)(i, m))
        got = np.asarray(fn(state, batch["ids"], batch["mask"]))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], expected[real], atol=2e-5)


# ------------------------------------------------------------------------------- config files
LLADA_8B = {  # GSAI-ML/LLaDA-8B-Base config.json (field names and values)
    "activation_type": "silu",
    "alibi": False,
    "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0,
    "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "bias_for_layer_norm": False,
    "block_group_size": 1,
    "block_type": "llama",
    "d_model": 4096,
    "embedding_dropout": 0.0,
    "embedding_size": 126464,
    "eos_token_id": 126081,
    "flash_attention": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "init_cutoff_factor": None,
    "init_device": "meta",
    "init_fn": "mitchell",
    "init_std": 0.02,
    "input_emb_norm": False,
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "mask_token_id": 126336,
    "max_sequence_length": 4096,
    "mlp_hidden_size": 12288,
    "mlp_ratio": 4,
    "model_type": "llada",
    "multi_query_attention": None,
    "n_heads": 32,
    "n_kv_heads": 32,
    "n_layers": 32,
    "pad_token_id": 126081,
    "precision": "amp_bf16",
    "residual_dropout": 0.0,
    "rms_norm_eps": 1e-05,
    "rope": True,
    "rope_full_precision": True,
    "rope_theta": 500000.0,
    "scale_logits": False,
    "use_cache": False,
    "vocab_size": 126464,
    "weight_tying": False,
}
DREAM_7B = {  # Dream-org/Dream-v0-Base-7B config.json (Qwen2.5-7B shapes)
    "architectures": ["DreamModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "mask_token_id": 151666,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "model_type": "Dream",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "pad_token_id": 151643,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "vocab_size": 152064,
}


def test_real_configs_parse():
    c = ModelConfig.from_hf(LLADA_8B)
    assert (c.model_type, c.causal, c.shift_logits, c.mask_token_id) == (
        "llada",
        False,
        False,
        126336,
    )
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (
        4096,
        32,
        32,
        32,
        128,
    )
    assert (c.intermediate_size, c.vocab_size, c.rope_theta) == (12288, 126464, 500000.0)
    assert c.eos_token_ids == (126081,) and c.pad_token_id == 126081
    assert not c.tie_word_embeddings and not c.qkv_bias and c.max_position_embeddings == 4096
    no_mask = {k: v for k, v in LLADA_8B.items() if k != "mask_token_id"}
    assert ModelConfig.from_hf(no_mask).mask_token_id == 126336  # LLaDA default

    d = ModelConfig.from_hf(DREAM_7B)
    assert (d.model_type, d.causal, d.shift_logits, d.mask_token_id) == (
        "dream",
        False,
        True,
        151666,
    )
    assert d.qkv_bias and not d.o_bias and not d.mlp_bias
    assert (d.num_kv_heads, d.head_dim, d.vocab_size, d.rms_norm_eps) == (4, 128, 152064, 1e-6)


@pytest.mark.parametrize("layout", ["llada", "dream"])
def test_to_hf_round_trip(ckpts, layout):
    cfg = read_config(ckpts[layout])
    hf = cfg.to_hf()
    assert hf["model_type"] == ("llada" if layout == "llada" else "Dream")
    assert ModelConfig.from_hf(hf) == cfg
    # a causal family still writes its HF layout
    assert ModelConfig.from_hf(cfg.replace(model_type="llama", causal=True).to_hf()).causal


def test_llada_embedding_size_keeps_all_rows():
    c = ModelConfig.from_hf({**LLADA_8B, "vocab_size": 126400, "embedding_size": 126464})
    assert c.vocab_size == 126464  # logits over every embedding row, as LLaDA's ff_out


@pytest.mark.parametrize(
    "override,field",
    [
        ({"alibi": True}, "alibi"),
        ({"scale_logits": True}, "scale_logits"),
        ({"input_emb_norm": True}, "input_emb_norm"),
        ({"attention_layer_norm": True}, "attention_layer_norm"),
        ({"include_bias": True}, "include_bias"),
        ({"bias_for_layer_norm": True}, "bias_for_layer_norm"),
        ({"rope": False}, "rope"),
        ({"clip_qkv": 8.0}, "clip_qkv"),
        ({"block_type": "sequential"}, "block_type"),
        ({"activation_type": "swiglu"}, "activation_type"),
        ({"activation_type": "gelu"}, "activation_type"),
        ({"layer_norm_type": "default"}, "layer_norm_type"),
        ({"layer_norm_with_affine": False}, "layer_norm_with_affine"),
        ({"block_group_size": 2}, "block_group_size"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"multi_query_attention": True}, "multi_query_attention"),
        ({"n_kv_heads": 12}, "n_kv_heads"),
        ({"embedding_size": 1000}, "embedding_size"),
    ],
)
def test_unsupported_llada_options_raise(override, field):
    _one_line_error(lambda: ModelConfig.from_hf({**LLADA_8B, **override}), field)


def test_llada_multi_query_attention_alone_means_one_kv_head():
    c = ModelConfig.from_hf({**LLADA_8B, "n_kv_heads": None, "multi_query_attention": True})
    assert c.num_kv_heads == 1


def test_dream_bad_options_raise():
    _one_line_error(lambda: ModelConfig.from_hf({**DREAM_7B, "head_dim": 64}), "head_dim")
    _one_line_error(lambda: ModelConfig.from_hf({**DREAM_7B, "hidden_act": "gelu"}), "hidden_act")
    _one_line_error(
        lambda: ModelConfig.from_hf({**DREAM_7B, "use_sliding_window": True}), "use_sliding_window"
    )


@pytest.mark.parametrize("family", [LLADA_8B, DREAM_7B])
def test_mask_id_outside_vocab_or_equal_to_pad(family):
    vocab = family["vocab_size"]
    for bad in (vocab, -1, 10**6):
        _one_line_error(
            lambda b=bad: ModelConfig.from_hf({**family, "mask_token_id": b}),
            f"mask_token_id={bad}",
            "outside the vocabulary",
        )
    _one_line_error(
        lambda: ModelConfig.from_hf({**family, "pad_token_id": family["mask_token_id"]}),
        "equals pad_token_id",
    )


def test_tiny_dream_without_mask_id_gets_dream_default_and_is_refused(ckpts, tmp_path):
    d = _rewrite(ckpts["dream"], tmp_path / "m", lambda t: None, lambda hf: hf.pop("mask_token_id"))
    _one_line_error(lambda: load_pretrained(d), "mask_token_id=151666", "outside the vocabulary")


# ---------------------------------------------------------------------------------- wrong kind
def test_wrong_kind_errors(ckpts, tmp_path):
    causal_dir = build_tiny_checkpoint(tmp_path / "causal", vocab_size=VOCAB, corpus=CORPUS)
    causal = read_config(causal_dir)
    msg = _one_line_error(
        lambda: require_diffusion(causal, f"model at {causal_dir}"),
        f"model at {causal_dir} is a causal LM (model_type 'llama')",
        "pass a masked-diffusion checkpoint (LLaDA or Dream)",
    )
    assert msg.startswith("model at")
    require_causal(causal, "model")
    for layout in ("llada", "dream"):
        cfg = read_config(ckpts[layout])
        require_diffusion(cfg, "model")
        _one_line_error(
            lambda c=cfg, d=ckpts[layout]: require_causal(c, f"model at {d}"),
            f"is a masked-diffusion LM (model_type '{layout}')",
            "pass a causal LM checkpoint",
        )
    bidir_no_mask = causal.replace(causal=False)
    _one_line_error(lambda: require_diffusion(bidir_no_mask, "model"), "no mask_token_id")


# ---------------------------------------------------------------------------------- the loader
def test_llada_checkpoint_errors_are_reported_together(ckpts, tmp_path):
    def edit(t):
        del t["model.transformer.blocks.1.ff_proj.weight"]
        t["model.transformer.blocks.0.stray.weight"] = np.zeros(3, np.float32)
        t["model.transformer.ln_f.weight"] = np.ones(7, np.float32)

    d = _rewrite(ckpts["llada"], tmp_path / "m", edit, lambda hf: None)
    _one_line_error(
        lambda: load_pretrained(d),
        "missing tensors (1): model.transformer.blocks.1.ff_proj.weight",
        "unexpected tensors (1): model.transformer.blocks.0.stray.weight",
        "wrong shape: model.transformer.ln_f.weight (7,)",
    )


def test_family_tables():
    assert keys.rules_for("llama") is keys.RULES and keys.rules_for("dream") is keys.RULES
    rule, layer = keys.match("model.transformer.blocks.3.ff_proj.weight", keys.LLADA_RULES)
    assert rule.path == ("layers", "gate_proj", "kernel") and layer == 3 and rule.transpose
    rule, _ = keys.match("model.transformer.blocks.0.ff_out.weight", keys.LLADA_RULES)
    assert rule.path == ("layers", "down_proj", "kernel")
    rule, layer = keys.match("model.transformer.ff_out.weight", keys.LLADA_RULES)
    assert rule.path == ("lm_head",) and layer is None
    assert keys.match("model.transformer.wte.weight") is None  # not a Llama name
    _one_line_error(lambda: keys.rules_for("gpt2"), "gpt2")


def test_cli_layouts(tmp_path):
    for layout, mt in (("llada", "llada"), ("dream", "Dream")):
        out = tmp_path / layout
        argv = ["--out", str(out), "--layout", layout, "--vocab_size", "300", "--hidden", "32"]
        assert main([*argv, "--layers", "1", "--heads", "2", "--kv_heads", "1"]) == 0
        hf = json.loads((out / "config.json").read_text())
        assert hf["model_type"] == mt and hf["mask_token_id"] == 299
        assert read_config(out).num_kv_heads == 1
