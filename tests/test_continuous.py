"""Continuous embedding attack (MixAT spec §5, §11.1-5): ball, mask, descent, no param grads."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixat_jax import lora as lora_lib
from mixat_jax.attacks.continuous import (
    ContinuousAttackConfig,
    continuous_attack,
    continuous_attack_model,
    mean_embedding_norm,
    project_l2,
)
from mixat_jax.models.config import LoraConfig, tiny_config
from mixat_jax.models.decoder import Decoder
from mixat_jax.objectives import TokenRows

B, L = 3, 16
FAST = {"xla_backend_optimization_level": 0}
PROMPT_LENS = np.array([7, 9, 6])
TARGET_LENS = np.array([5, 4, 6])


@pytest.fixture(scope="module")
def setup():
    model = Decoder(tiny_config(num_layers=1), rngs=nnx.Rngs(0))
    model.add_lora(LoraConfig(r=4, alpha=8, dropout=0.1, targets=("q_proj", "down_proj")))
    graphdef, lora, frozen = lora_lib.split(model)
    # Non-zero LoRA B so the adapters (and their dropout) matter.
    lora = jax.tree.map(lambda x: x + 0.05, lora)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 512, (B, L)).astype(np.int32)
    pos = np.arange(L)[None]
    end = (PROMPT_LENS + TARGET_LENS)[:, None]
    mask = pos < end
    ids[~mask] = 0
    batch = dict(
        ids=jnp.asarray(ids),
        mask=jnp.asarray(mask),
        prompt_mask=jnp.asarray(pos < PROMPT_LENS[:, None]),
        target_mask=jnp.asarray((pos >= PROMPT_LENS[:, None]) & mask),
        valid=jnp.asarray([True, True, False]),
    )
    batch["rows"] = TokenRows(
        batch["ids"], batch["mask"], batch["prompt_mask"], batch["target_mask"]
    )
    eps_abs = 0.075 * float(mean_embedding_norm(model.embedding_matrix))
    return graphdef, lora, frozen, batch, eps_abs, model


def _attack(setup, cfg, key=0, **kw):
    graphdef, lora, frozen, b, eps_abs, _ = setup
    fn = jax.jit(
        lambda lora, frozen, k: continuous_attack(
            graphdef,
            lora,
            frozen,
            b["rows"],
            k,
            cfg=cfg,
            eps_abs=eps_abs,
            row_valid_B=b["valid"],
            **kw,
        )
    )
    args = (lora, frozen, jax.random.key(key))
    return fn.lower(*args).compile(FAST)(*args)  # fast XLA:CPU compile, same numerics


def test_defaults_match_reference():
    cfg = ContinuousAttackConfig()
    assert (cfg.eps, cfg.iters, cfg.lr, cfg.optimizer) == (0.075, 10, 1e-4, "sign")
    assert (cfg.init, cfg.relative_lr, cfg.best_iterate, cfg.dropout) == (
        "zero",
        False,
        False,
        True,
    )
    with pytest.raises(ValueError, match="attack optimizer"):
        ContinuousAttackConfig(optimizer="pgd")
    with pytest.raises(ValueError, match="attack init"):
        ContinuousAttackConfig(init="suffix")


def test_projection_per_token():
    d = jnp.array([[[3.0, 4.0], [0.3, 0.4]]])
    out = project_l2(d, 1.0)
    np.testing.assert_allclose(out, [[[0.6, 0.8], [0.3, 0.4]]], rtol=1e-6)


def test_sign_attack_stays_in_ball_and_mask(setup):
    _, _, _, b, eps_abs, _ = setup
    d = 64
    # Step sized so that the 2nd step leaves the ball: the projection must bind.
    cfg = ContinuousAttackConfig(iters=3, lr=0.6 * eps_abs / np.sqrt(d), dropout=False)
    delta, diag = _attack(setup, cfg)
    assert delta.dtype == jnp.float32 and delta.shape == (B, L, d)
    norms = np.linalg.norm(np.asarray(delta), axis=-1)
    assert norms.max() <= eps_abs * (1 + 1e-5)
    attacked = np.asarray(b["prompt_mask"] & b["mask"]) & np.asarray(b["valid"])[:, None]
    assert np.all(norms[~attacked] == 0.0)  # targets, padding and the invalid row untouched
    assert np.all(norms[attacked] > 0.0)  # every prompt position moves (template tokens too)
    np.testing.assert_allclose(diag["frac_at_boundary"], 1.0)
    np.testing.assert_allclose(diag["delta_norm_max"], eps_abs, rtol=1e-5)
    np.testing.assert_allclose(diag["eps_abs"], eps_abs, rtol=1e-6)


def test_sign_attack_lowers_target_ce(setup):
    """Small sign steps descend; k steps of lr reach per-token norm k·lr·√D (spec §5)."""
    _, _, _, _, eps_abs, _ = setup
    cfg = ContinuousAttackConfig(iters=5, lr=3e-5, dropout=False)
    _, diag = _attack(setup, cfg)
    trace = np.append(np.asarray(diag["loss_trace"]), float(diag["loss_after"]))
    assert trace.shape == (6,)
    np.testing.assert_allclose(diag["loss_before"], trace[0])
    assert trace[-1] < trace[0]
    assert np.mean(np.diff(trace) < 0) >= 0.8
    expect = 5 * 3e-5 * np.sqrt(64)
    assert expect < eps_abs
    np.testing.assert_allclose(diag["delta_norm_max"], expect, rtol=1e-5)
    assert float(diag["frac_at_boundary"]) == 0.0


def test_no_parameter_gradient_from_attack(setup):
    graphdef, lora, frozen, b, eps_abs, _ = setup
    # "grad" steps make delta a smooth function of the parameters unless they are constants.
    cfg = ContinuousAttackConfig(iters=2, lr=1e-2, optimizer="grad", dropout=False)

    def f(lora):
        delta, diag = continuous_attack(
            graphdef,
            lora,
            frozen,
            b["rows"],
            jax.random.key(0),
            cfg=cfg,
            eps_abs=eps_abs,
        )
        return jnp.sum(delta**2) + diag["loss_after"]

    grads = jax.jit(jax.grad(f))(lora)
    assert all(np.all(np.asarray(g) == 0.0) for g in jax.tree.leaves(grads))


def test_adam_uniform_init_stays_in_ball_and_mask(setup):
    _, _, _, b, eps_abs, _ = setup
    cfg = ContinuousAttackConfig(
        iters=2, lr=1e-2, optimizer="adam", init="uniform", best_iterate=True, dropout=True
    )
    delta, diag = _attack(setup, cfg)
    norms = np.linalg.norm(np.asarray(delta), axis=-1)
    attacked = np.asarray(b["prompt_mask"] & b["mask"]) & np.asarray(b["valid"])[:, None]
    assert norms.max() <= eps_abs * (1 + 1e-5)
    assert np.all(norms[~attacked] == 0.0)
    # Best iterate: per row the lowest recorded CE, so never worse than any iterate's batch CE.
    assert float(diag["loss_after"]) <= float(np.min(diag["loss_trace"])) + 1e-6


def test_zero_iters_is_clean_and_model_convenience(setup):
    *_, b, eps_abs, model = setup
    cfg = ContinuousAttackConfig(iters=0)
    delta, diag = continuous_attack_model(model, b["rows"], cfg=cfg, row_valid_B=b["valid"])
    assert np.all(np.asarray(delta) == 0.0)
    np.testing.assert_allclose(diag["loss_before"], diag["loss_after"])
    np.testing.assert_allclose(diag["eps_abs"], eps_abs, rtol=1e-6)
    assert dataclasses.replace(cfg, iters=1).iters == 1
    # The rows are a record (objectives.TokenRows), not four loose arrays.
    arrays = (b["ids"], b["mask"], b["prompt_mask"], b["target_mask"])
    with pytest.raises(TypeError):
        continuous_attack_model(model, *arrays, cfg=cfg)


def test_two_groups_equal_attacking_each_group_alone(setup):
    """``group_B`` / ``num_groups`` (the training step's step-wide attack): the objective is the
    SUM of per-group token means, so each row's δ is what attacking its group alone gives
    (per-row keys, dropout on); ``loss_before`` is the mean of the groups' losses and
    ``delta_norm_mean`` / ``frac_at_boundary`` are token-weighted over ALL attacked tokens."""
    graphdef, lora, frozen, b, eps_abs, _ = setup
    # "grad" steps: δ is linear in each group's own gradient (a wrong group weighting shows).
    cfg = ContinuousAttackConfig(iters=2, lr=0.03, optimizer="grad", dropout=True)
    keys = jax.random.split(jax.random.key(5), B)

    def attack(idx, group=None, num_groups=1):
        rows = jax.tree.map(lambda x: x[np.asarray(idx)], b["rows"])
        fn = jax.jit(
            lambda lora, frozen, k: continuous_attack(
                graphdef, lora, frozen, rows, k, cfg=cfg, eps_abs=eps_abs,
                group_B=None if group is None else jnp.asarray(group), num_groups=num_groups,
            )
        )  # fmt: skip
        args = (lora, frozen, keys[np.asarray(idx)])
        return fn.lower(*args).compile(FAST)(*args)

    both, diag = attack([0, 1, 2], group=[0, 0, 1], num_groups=2)
    first, diag0 = attack([0, 1])
    second, diag1 = attack([2])
    np.testing.assert_allclose(both[:2], first, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(both[2:], second, rtol=1e-5, atol=1e-9)
    assert float(jnp.abs(both).max()) > 0.0
    groups_mean = (float(diag0["loss_before"]) + float(diag1["loss_before"])) / 2
    np.testing.assert_allclose(diag["loss_before"], groups_mean, rtol=1e-6)
    attacked = np.asarray(b["prompt_mask"] & b["mask"])
    norms = np.linalg.norm(np.asarray(both), axis=-1)[attacked]
    np.testing.assert_allclose(diag["delta_norm_mean"], norms.mean(), rtol=1e-5)
    at_boundary = np.mean(norms >= (1 - 1e-3) * eps_abs)
    assert float(diag["frac_at_boundary"]) == pytest.approx(at_boundary, rel=1e-6)


def test_relative_lr_scales_the_step_by_mean_embedding_norm(setup):
    """``relative_lr``: the absolute step is lr·ē (ē of the embedding matrix, or ``emb_norm``
    when given, as the training step does): the same δ as an absolute step of lr·ē."""
    *_, eps_abs, model = setup
    e_bar = float(mean_embedding_norm(model.embedding_matrix))
    rel = ContinuousAttackConfig(iters=2, lr=0.002, relative_lr=True, dropout=False)
    d_rel, diag_rel = _attack(setup, rel)
    d_abs, diag_abs = _attack(setup, dataclasses.replace(rel, relative_lr=False, lr=0.002 * e_bar))
    np.testing.assert_allclose(diag_rel["lr_abs"], 0.002 * e_bar, rtol=1e-6)
    np.testing.assert_allclose(diag_abs["lr_abs"], 0.002 * e_bar, rtol=1e-6)
    np.testing.assert_allclose(d_rel, d_abs, rtol=1e-5, atol=1e-9)
    # Sign steps of lr·ē reach k·lr·ē·√D per token (inside the ball here).
    expect = 2 * 0.002 * e_bar * np.sqrt(64)
    assert expect < eps_abs
    np.testing.assert_allclose(diag_rel["delta_norm_max"], expect, rtol=1e-5)
    _, diag_given = _attack(setup, rel, emb_norm=2 * e_bar)
    np.testing.assert_allclose(diag_given["lr_abs"], 0.004 * e_bar, rtol=1e-6)
