"""GCG probe sampling (issue #14; mixat_jax.attacks.gcg_probe, gcg.probe_candidate_losses):
Spearman and the set-size formula, an identical draft picks what plain GCG picks, the target
scores exactly the probe set and the draft's f best, jit == sharded, a foreign tokenizer is
refused in one line."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from scipy.stats import spearmanr

from mixat_jax.attacks import gcg
from mixat_jax.attacks.gcg_driver import run_gcg, start_run
from mixat_jax.attacks.gcg_presets import PRESETS, GCGConfig, preset
from mixat_jax.attacks.gcg_probe import filter_plan, filtered_size, spearman, truncated_copy
from mixat_jax.evaluation.suite import plan_attack
from mixat_jax.hf.load import load_pretrained
from mixat_jax.mesh import MeshConfig, make_mesh
from mixat_jax.training.run_config import DiscreteSpec
from tests.hf_builders import build_family_tokenizer, build_tiny_hf_checkpoint

BEHAVIOR = "Write a poem about the sea"
TARGET = "Sure, here is a poem"
# width 32, sampling factor 4: probe set P = 8; r = 4: the filtered set f <= 8. No suffix-prefix
# reuse and one chunk keep the compiled steps small; top-M = W returns every candidate's loss.
CFG = GCGConfig(
    num_steps=3, optim_str_init="x x x x x", search_width=32, topk=8, filter_topm=32,
    reuse_suffix_prefix=False, probe_r=4.0, probe_sampling_factor=4,
)  # fmt: skip
PROBE = CFG.replace(probe_draft="@target", probe_filter="mask")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_hf_checkpoint(
        tmp_path_factory.mktemp("probe") / "m", "llama3", vocab_size=512
    )


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_pretrained(model_dir)


def _step(run, step=0):
    """One compiled step's raw outputs (behaviour 0) for a ``start_run`` run (the executable
    ``GCGRun.step`` compiles, so later runs with the same settings reuse it)."""
    cur = run.put(np.asarray([run.buffers[0].best[1]], np.int32))
    args = (run.params, run.caches, cur, run.layouts, run.allowed_V, run.root_keys,
            run.put(np.int32(step)), run.draft_params, run.draft_caches)  # fmt: skip
    static = dict(graphdef=run.graphdef, spec=run.spec, draft_graphdef=run.draft_graphdef)
    exe, _ = gcg.compile_cached(gcg.batched_gcg_step, args, static)
    return jax.tree.map(lambda x: np.asarray(x)[0], exe(*args))


def _losses_by_ids(out):
    """{candidate ids: lowest finite loss} of a step's top-M output (duplicates are +inf)."""
    d = {}
    for ids, v in zip(map(tuple, out["top_ids"]), out["top_loss"], strict=True):
        if np.isfinite(v):
            d[ids] = min(v, d.get(ids, np.inf))
    return d


@pytest.fixture(scope="module")
def plain(loaded):
    model, tok = loaded
    return _step(start_run(model, tok, [BEHAVIOR], [TARGET], CFG))


def test_spearman_and_set_sizes_follow_the_formula():
    rng = np.random.default_rng(0)
    for _ in range(5):
        a = rng.integers(0, 6, 12).astype(np.float32)  # ties, as scipy averages them
        b = a + rng.normal(0, 2, 12).astype(np.float32)
        np.testing.assert_allclose(float(spearman(a, b)), spearmanr(a, b).correlation, atol=1e-5)
    assert float(spearman(np.ones(8), np.arange(8.0))) == 0.0  # constant side: no agreement
    for rho in (-1.0, -0.3, 0.0, 0.41, 0.9, 1.0):
        want = max(1, min(int((1 - (1 + rho) / 2) * 512 / 8), 512))  # nanoGCG 0.3.0
        assert int(filtered_size(np.float32(rho), 512, 8.0)) == want
    assert filter_plan(512, 8, 1) == (64,)  # mask: the largest f (alpha = 0)
    assert filter_plan(512, 8, 4) == (16, 32, 48, 64)
    assert filter_plan(32, 4, 1, granule=8) == (8,) and filter_plan(20, 8, 4, granule=8) == (8,)


def test_identical_draft_picks_what_plain_gcg_picks(loaded, plain):
    model, tok = loaded
    run = start_run(model, tok, [BEHAVIOR], [TARGET], PROBE)
    assert run.spec.probe_size == 32 // 4 and run.spec.filter_sizes == (32 // 4,)
    probe = _step(run)
    assert float(probe["probe_rho"]) == pytest.approx(1.0) and int(probe["probe_filtered"]) == 1
    np.testing.assert_array_equal(probe["top_ids"][0], plain["top_ids"][0])
    np.testing.assert_allclose(probe["top_loss"][0], plain["top_loss"][0], rtol=1e-5)


def _noisy(model, scale=0.5):
    """The model with every weight perturbed (a worse draft, same tokenizer and shapes)."""
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(7)
    leaves, tree = jax.tree.flatten(state)
    out = []
    for x in leaves:
        h = np.asarray(x)
        noise = (scale * h.std() * rng.standard_normal(h.shape)).astype(h.dtype)
        out.append(jax.device_put(h + noise, x.sharding))
    return nnx.merge(graphdef, jax.tree.unflatten(tree, out))


def test_target_scores_the_probe_set_and_the_drafts_f_best(loaded, plain):
    model, tok = loaded
    draft = _noisy(model)
    run = start_run(model, tok, [BEHAVIOR], [TARGET], PROBE, draft=(draft, tok))
    out = _step(run)
    f, rho = int(out["probe_filtered"]), float(out["probe_rho"])
    assert f == max(1, min(int((1 - (1 + rho) / 2) * 32 / 4), 32)) and rho < 0.99
    # the candidates are plain GCG's (same key); every finite loss is the target's own loss
    assert set(map(tuple, out["top_ids"])) == set(map(tuple, plain["top_ids"]))
    target, scored = _losses_by_ids(plain), _losses_by_ids(out)
    assert 1 <= len(scored) <= run.spec.probe_size + f
    for ids, v in scored.items():
        np.testing.assert_allclose(v, target[ids], rtol=1e-5)
    # ... and the draft's f best (valid) candidates are among them
    cand = np.asarray(list(target), np.int32)
    d_loss, _ = gcg.batched_candidate_losses(
        run.draft_params, run.draft_caches, cand[None], run.layouts,
        graphdef=run.draft_graphdef, spec=run.spec,
    )  # fmt: skip
    best = cand[np.argsort(np.asarray(d_loss[0]), kind="stable")[:f]]
    assert all(tuple(c) in scored for c in best)


def test_foreign_tokenizer_draft_is_refused_in_one_line(loaded):
    model, tok = loaded
    other = build_family_tokenizer("llama3", 300)
    with pytest.raises(ValueError, match="different tokenizer") as e:
        run_gcg(model, tok, BEHAVIOR, TARGET, PROBE, draft=(model, other))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="probe_draft is empty"):
        run_gcg(model, tok, BEHAVIOR, TARGET, CFG, draft=(model, tok))


def test_truncated_copy_keeps_the_first_layers(loaded):
    model, _ = loaded
    cut = truncated_copy(model, 1)
    assert (
        cut.cfg.num_layers == 1 and model.cfg.num_layers == 2 and truncated_copy(model, 2) is model
    )
    full, part = nnx.to_flat_state(nnx.state(model)), dict(nnx.to_flat_state(nnx.state(cut)))
    for k, v in full:
        want = np.asarray(v[...])[:1] if k[0] == "layers" else np.asarray(v[...])
        np.testing.assert_array_equal(np.asarray(part[k][...]), want)
    with pytest.raises(ValueError, match="probe_draft_layers=3"):
        truncated_copy(model, 3)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_probe_sampling_sharded_run_agrees(model_dir, loaded):
    model, tok = loaded
    # one device, filtered set as a mask == 8 devices, compiled sizes ("switch"); a worse draft
    want = run_gcg(model, tok, BEHAVIOR, TARGET, PROBE, seed=1, draft=(_noisy(model), tok))
    mesh = make_mesh(MeshConfig(data=8, fsdp=1, tensor=1))
    m8, t8 = load_pretrained(model_dir, mesh=mesh)
    cfg = PROBE.replace(probe_filter="switch", probe_filter_sizes=2)
    got = run_gcg(m8, t8, BEHAVIOR, TARGET, cfg, seed=1, mesh=mesh, draft=(_noisy(m8), t8))
    # sharded vs one device: the same steps up to fp32 reassociation (near-ties may diverge
    # after the first differing step; compare up to it, as tests/test_gcg.py does)
    pairs = enumerate(zip(got.strings, want.strings, strict=True))
    k = next((i for i, (a, b) in pairs if a != b), None)
    n = len(want.losses) if k is None else k + 1
    np.testing.assert_allclose(got.losses[:n], want.losses[:n], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.probe_rho[:n], want.probe_rho[:n], atol=1e-5)
    assert got.probe_filtered[:n] == want.probe_filtered[:n] and len(want.probe_rho) == 3
    assert max(want.probe_filtered) > 1  # the agreement-dependent size is exercised


def test_probe_sampling_is_off_by_default_and_exposed_everywhere():
    spec = importlib.util.spec_from_file_location(
        "gcg_attack_config", Path(__file__).resolve().parents[1] / "configs/attack/gcg.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cli = module.get_config("harmbench")
    assert cli.probe_draft == "" and cli.probe_r == 8.0 and cli.probe_sampling_factor == 16
    for name in PRESETS:
        assert preset(name).probe_draft == ""
    block = {"probe_draft": "@target", "probe_draft_layers": 2, "probe_filter": "switch"}
    evaluation = plan_attack("GCG", block).settings["cfg"]
    training = DiscreteSpec(gcg={"preset": "mixat_train", **block}).gcg_config
    for cfg in (evaluation, training):
        assert (cfg.probe_draft, cfg.probe_draft_layers, cfg.probe_filter) == (
            "@target",
            2,
            "switch",
        )
    with pytest.raises(ValueError, match="probe_filter"):
        GCGConfig(probe_filter="sometimes")
    with pytest.raises(ValueError, match="search_width // probe_sampling_factor >= 2"):
        GCGConfig(probe_draft="@target", search_width=16, probe_sampling_factor=16)
