"""train_step / eval_loss_step (MixAT spec §3, §4, §12): LoRA-only updates, accumulation,
jit == pmap == sharded jit, clean reduction with iters=0, optimizer schedule."""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from mixat_jax import objectives, steps  # noqa: E402
from mixat_jax.attacks.continuous import ContinuousAttackConfig  # noqa: E402
from mixat_jax.mesh import MeshConfig, make_mesh  # noqa: E402
from mixat_jax.models.config import LoraConfig, tiny_config  # noqa: E402
from mixat_jax.models.decoder import Decoder  # noqa: E402
from mixat_jax.training import losses  # noqa: E402
from mixat_jax.training import train_step as train_step_lib  # noqa: E402
from mixat_jax.training.optim import OptimConfig, lr_schedule, make_optimizer  # noqa: E402
from mixat_jax.training.state import init_train_state, place_train_state  # noqa: E402
from mixat_jax.training.step_config import StepConfig  # noqa: E402
from tests.data_parallel_case import rows  # noqa: E402

A, U, LA, LU, V = 4, 4, 20, 16, 512
CFG = StepConfig(attack=ContinuousAttackConfig(iters=2, lr=1e-3))  # dropout on everywhere
FAST = {"xla_backend_optimization_level": 0}  # halves XLA:CPU compile time; same numerics


def _run(fn, *args):
    """Lower + compile with FAST options, then call (fn is jax.jit(...) or jax.pmap(...))."""
    return fn.lower(*args).compile(FAST)(*args)


def make_batch(seed: int, g: int) -> dict[str, np.ndarray]:
    """G right-padded micro-batches; away/toward share the prompt; micro-batch 0 has one invalid
    adversarial and one invalid utility slot, micro-batch 1 no valid adversarial row at all."""
    rng = np.random.default_rng(seed)
    out: dict[str, list] = {}

    def add(key, value):
        out.setdefault(key, []).append(value)

    for i in range(g):
        plen = rng.integers(5, 10, A)
        away = rows(rng, A, LA, plen, rng.integers(3, 8, A), V)
        toward = rows(rng, A, LA, plen, rng.integers(2, 5, A), V)
        toward[0][toward[2]] = away[0][away[2]]
        names = ("ids", "mask", "prompt_mask", "target_mask")
        for name, a, t in zip(names, away, toward, strict=True):
            add(f"away_{name}_AxL", a)
            add(f"toward_{name}_AxL", t)
        add("adv_valid_A", np.array([i == 0, i == 0, False, i == 0]))
        util = rows(rng, U, LU, rng.integers(3, 7, U), rng.integers(4, 9, U), V)
        add("util_ids_UxM", util[0])
        add("util_mask_UxM", util[1])
        add("util_target_mask_UxM", util[3])
        add("util_valid_U", np.array([True, i != 0, True, True]))
    return {k: np.stack(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def model():
    m = Decoder(tiny_config(num_layers=1), rngs=nnx.Rngs(0))
    # Two LoRA targets keep the compiled step small (CPU compile time); all-linear is the same code.
    m.add_lora(LoraConfig(r=4, alpha=8, dropout=0.1, targets=("q_proj", "down_proj")))
    # Non-zero B factors so that LoRA dropout and the adapters matter in every pass.
    for lin in m.layers.linears().values():
        if lin.lora_b is not None:
            lin.lora_b[...] = jnp.full(lin.lora_b.shape, 0.02, jnp.float32)
    return m


@pytest.fixture(scope="module")
def sgd_state(model):
    return init_train_state(model, optax.sgd(1.0))  # new lora = lora - mean grads


@pytest.fixture(scope="module")
def jit_result(sgd_state):
    """Reference: one jitted step over G = 2 micro-batches on the default device."""
    batch = make_batch(0, 2)
    fn = jax.jit(lambda s, b, k: steps.train_step(s, b, k, cfg=CFG))
    new_state, metrics = _run(fn, sgd_state, batch, jax.random.key(7))
    return batch, new_state, metrics


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


# Tolerances for comparing two *different* programs (jit vs pmap, scan vs per-micro-batch, sharded
# vs single device, step-wide vs per-micro-batch attack) — issue #15: they must hold on any CPU.
# Everything is fp32, but the programs sum differently: the LoRA gradient of each element is a
# contraction over ~A*L = 80 tokens x hidden 64 (through one layer's backward), split or fused
# differently per program, mesh and CPU kernel (AVX2 vs AVX-512/AMX). Its error is
# ~sqrt(K) * 2^-24 (K ~ 1e3-1e4 terms) relative to the *scale* of the gradient, not to each
# (possibly cancelling) element: UPDATE_RTOL * max|update| per leaf. With sgd(1) the new LoRA
# value is old - grad, rounded once more: STATE_RTOL (8 ulp) x |new|. Measured on AMD EPYC: jit ==
# pmap == step-wide bitwise; sharded <= 1.2e-5 x max|update| (= 1/2 ulp of the state) and
# accumulation <= 1.2e-5. A wrong reduction (sum vs mean, a dropped micro-batch, a wrong key)
# changes the update by >= 10% of max|update|.
UPDATE_RTOL = 1e-4
STATE_RTOL = 1e-6
# Scalar metrics are fp32 means over ~100 tokens (|loss| ~ 6.5): reassociation error ~1e-7
# relative (4.8e-7 abs measured for attack_loss_after, sharded). Counts (num_*_rows,
# targets_dropped, frac_at_boundary with its 1e-3 relative band) are exact in any order.
METRIC_RTOL, METRIC_ATOL = 1e-5, 1e-7


def _assert_states_close(a, b, old):
    """LoRA states ``a`` and ``b`` after one step from ``old``: equal up to fp32 reassociation of
    the update (``UPDATE_RTOL`` x that leaf's max |update|) and the final rounding of the state."""
    leaves = zip(_leaves(a), _leaves(b), _leaves(old), strict=True)
    for x, y, o in leaves:
        scale = np.abs(y - o).max()
        np.testing.assert_allclose(x, y, rtol=STATE_RTOL, atol=UPDATE_RTOL * scale)


def test_lora_only_update_and_metrics(sgd_state, jit_result):
    batch, new_state, metrics = jit_result
    for x, y in zip(_leaves(sgd_state.frozen), _leaves(new_state.frozen), strict=True):
        assert np.array_equal(x, y)  # frozen base bit-identical
    pairs = zip(_leaves(sgd_state.lora), _leaves(new_state.lora), strict=True)
    changed = [not np.array_equal(x, y) for x, y in pairs]
    assert all(changed)
    assert int(new_state.step) == 1
    expected = {
        "loss", "away", "toward", "utility", "attack_loss_before", "attack_loss_after",
        "delta_norm_mean", "delta_norm_max", "frac_at_boundary", "grad_norm", "lr",
        "num_adv_rows", "num_util_rows",
    }  # fmt: skip
    assert expected <= set(metrics)
    assert all(np.isfinite(metrics[k]) for k in expected - {"lr"})  # sgd has no injected lr
    assert float(metrics["num_adv_rows"]) == 3.0 and float(metrics["num_util_rows"]) == 7.0
    assert float(metrics["delta_norm_max"]) > 0.0
    assert float(metrics["attack_loss_after"]) < float(metrics["attack_loss_before"]) + 0.05


@pytest.fixture(scope="module")
def pmap_result(sgd_state, jit_result):
    """pmap over 2 devices, one micro-batch each (G = 1 per device)."""
    if jax.local_device_count() < 2:
        pytest.skip("needs 2 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    batch = jit_result[0]
    step = steps.make_pmapped_train_step(CFG, axis_name="dev")
    replicated = jax.tree.map(lambda x: jnp.broadcast_to(x, (2, *x.shape)), sgd_state)
    per_device = {k: v[:, None] for k, v in batch.items()}  # [2 devices, G=1, ...]
    return _run(step, replicated, per_device, jax.random.key(7))


def test_pmap_equals_jit_on_concatenated_microbatches(sgd_state, jit_result, pmap_result):
    """pmap over 2 devices (1 micro-batch each) == jit over the same 2 micro-batches.

    Different programs (per-device step + pmean vs a scan over micro-batches): equal up to fp32
    reassociation only, never asserted bitwise (bitwise on AMD EPYC, not on every CPU)."""
    _, new_state, metrics = jit_result
    p_state, p_metrics = pmap_result
    for d in range(2):
        lora_d = jax.tree.map(lambda x, d=d: x[d], p_state.lora)
        _assert_states_close(lora_d, new_state.lora, sgd_state.lora)
    for k, v in metrics.items():
        np.testing.assert_allclose(
            p_metrics[k][0], v, rtol=METRIC_RTOL, atol=METRIC_ATOL, err_msg=k
        )


def test_grad_accumulation_is_mean_of_microbatch_grads(sgd_state, jit_result):
    """The scanned G = 2 step moves LoRA by the mean of the two single-micro-batch gradients.

    Single-micro-batch gradients: ``microbatch_grads`` per micro-batch with the scan's keys
    (``fold_in(key, g)``) and that micro-batch's own attack (``step_attack`` on it alone, global
    index g); with sgd(1) the jitted step's update is -mean(grads).
    """
    batch, new_state, metrics = jit_result
    key = jax.random.key(7)

    def single(s, mb, g):
        d, diag = steps.step_attack(s, {k: v[None] for k, v in mb.items()}, key, g, CFG)
        k = jax.random.fold_in(key, g)
        return steps.microbatch_grads(s, mb, k, cfg=CFG, attack=(d[0], diag))

    mbs = [{k: v[g] for k, v in batch.items()} for g in range(2)]
    one = jax.jit(single).lower(sgd_state, mbs[0], 0).compile(FAST)
    grads, losses_ = [], []
    for g, mb in enumerate(mbs):
        gr, parts = one(sgd_state, mb, g)
        grads.append(gr)
        losses_.append(float(parts["loss"][0]))
    mean = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
    # Compare states (old - mean grads vs the step's result) rather than the implied update
    # old - new, whose cancellation costs an ulp of |old| (~7e-9) on gradients of ~3e-4.
    want = jax.tree.map(lambda old, g: old - g, sgd_state.lora, mean)
    _assert_states_close(new_state.lora, want, sgd_state.lora)
    np.testing.assert_allclose(metrics["loss"], np.mean(losses_), rtol=METRIC_RTOL)


def test_step_wide_attack_equals_microbatch_attacks(sgd_state, jit_result):
    """``attack_batching="step"`` (all micro-batches attacked in one call, the default) gives the
    same update and attack metrics as attacking one micro-batch at a time (per-row keys)."""
    batch, new_state, metrics = jit_result
    cfg = CFG.replace(attack_batching="microbatch")
    fn = jax.jit(lambda s, b, k: steps.train_step(s, b, k, cfg=cfg))
    m_state, m_metrics = fn.lower(sgd_state, batch, jax.random.key(7)).compile(FAST)(
        sgd_state, batch, jax.random.key(7)
    )
    # Different programs (one attack over A*G rows vs G attacks over A rows): reassociation only;
    # the sign attack is discontinuous only where a gradient component is ~0, where flipping it
    # moves the loss by ~0 (bitwise equal on AMD EPYC).
    _assert_states_close(m_state.lora, new_state.lora, sgd_state.lora)
    for k in ("loss", "attack_loss_before", "attack_loss_after", "delta_norm_max"):
        np.testing.assert_allclose(
            m_metrics[k], metrics[k], rtol=METRIC_RTOL, atol=METRIC_ATOL, err_msg=k
        )
    with pytest.raises(ValueError, match="attack_batching"):
        CFG.replace(attack_batching="rows")


def test_sharded_jit_equals_single_device(sgd_state, jit_result):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    batch, new_state, metrics = jit_result
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    step = steps.make_jitted_train_step(CFG, mesh, compiler_options=FAST)
    placed = place_train_state(sgd_state, mesh)
    compiled = step.compile(placed, batch, jax.random.key(7))
    assert compiled.memory_analysis() is not None
    s_state, s_metrics = step(placed, batch, jax.random.key(7))
    # 2x2x2 mesh: contractions split over fsdp/tensor and all-reduced -> reassociation only.
    _assert_states_close(s_state.lora, new_state.lora, sgd_state.lora)
    for k, v in metrics.items():
        np.testing.assert_allclose(s_metrics[k], v, rtol=METRIC_RTOL, atol=METRIC_ATOL, err_msg=k)
    assert s_state.frozen is placed.frozen  # not donated, passed through


def test_iters_zero_is_clean_c_advul(model, sgd_state):
    """With δ ≡ 0 the losses are plain C-AdvUL on clean prompts (spec §12 sanity check a)."""
    batch = make_batch(1, 1)
    cfg = dataclasses.replace(CFG, attack=ContinuousAttackConfig(iters=0))
    assert not cfg.runs_attack and not StepConfig(variant="sft").runs_attack
    graphdef = nnx.graphdef(model)

    @jax.jit
    def run(state, batch):
        metrics = steps.eval_loss_step(state, batch, cfg=cfg)
        m = nnx.merge(graphdef, state.lora, state.frozen)
        mb = {k: v[0] for k, v in batch.items()}

        def ce(prefix, suffix, valid):
            ids = mb[f"{prefix}_ids_{suffix}"]
            logits = m(ids, mb[f"{prefix}_mask_{suffix}"])
            return objectives.masked_ce(logits, ids, mb[f"{prefix}_target_mask_{suffix}"], valid)

        ces = [ce(p, s, mb[v]) for p, s, v in (
            ("away", "AxL", "adv_valid_A"),
            ("toward", "AxL", "adv_valid_A"),
            ("util", "UxM", "util_valid_U"),
        )]  # fmt: skip
        return metrics, ces

    metrics, (ce_h, ce_s, ce_u) = _run(run, sgd_state, batch)
    want = 0.5 * losses.floor_away(-ce_h) + 0.5 * losses.floor_toward(ce_s) + ce_u
    # eval_loss_step vs a hand-written forward + masked_ce in one jit: same math, differently
    # fused -> fp32 means over ~100 tokens (~6.5) agree to ~1e-7 relative; METRIC_RTOL = 1e-5.
    np.testing.assert_allclose(metrics["ce_harm"], ce_h, rtol=1e-5)
    np.testing.assert_allclose(metrics["attack_loss_before"], ce_h, rtol=1e-5)
    np.testing.assert_allclose(metrics["ce_safe"], ce_s, rtol=1e-5)
    np.testing.assert_allclose(metrics["utility"], ce_u, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)
    assert float(metrics["delta_norm_max"]) == 0.0


def test_lr_schedule_and_optimizer():
    cfg = OptimConfig()
    sched = lr_schedule(cfg, 100)
    np.testing.assert_allclose(sched(0), 2e-4, rtol=1e-6)  # warm-up 0 (spec §11.14)
    np.testing.assert_allclose(sched(50), 1e-4, rtol=1e-5)
    np.testing.assert_allclose(sched(100), 0.0, atol=1e-12)
    warm = lr_schedule(OptimConfig(warmup_ratio=0.03), 100)  # 3 warm-up steps
    np.testing.assert_allclose([warm(0), warm(1), warm(3)], [0.0, 2e-4 / 3, 2e-4], rtol=1e-5)
    tx = make_optimizer(cfg, 100)
    params = {"w": jnp.ones((4,))}
    state = tx.init(params)
    updates, state = tx.update({"w": jnp.full((4,), 10.0)}, state, params)
    # First AdamW step: clipped grad direction, |update| = lr·(1 + wd·w) per coordinate.
    np.testing.assert_allclose(updates["w"], -2e-4 * (1.0 + 1e-3), rtol=1e-4)
    assert float(steps.injected_learning_rate(state)) == pytest.approx(2e-4)


def test_bad_inputs_fail_clearly(sgd_state):
    with pytest.raises(ValueError, match="step variant"):
        StepConfig(variant="dpo")
    batch = make_batch(0, 1)
    del batch["util_valid_U"]
    with pytest.raises(ValueError, match="batch lacks keys"):
        steps.train_step(sgd_state, batch, jax.random.key(0), cfg=CFG)
    bad = make_batch(0, 1)
    bad["toward_ids_AxL"] = bad["toward_ids_AxL"][:, :, :-1]
    with pytest.raises(ValueError, match="toward_ids_AxL"):
        steps.with_microbatch_axis(bad)


@pytest.mark.parametrize("variant", ["sft", "discrete_only", "mixat"])
def test_attack_is_not_traced_without_delta(sgd_state, monkeypatch, variant):
    """'sft' / 'discrete_only' skip the attack entirely (δ ≡ 0 is not run-and-zeroed)."""

    def boom(*args, **kwargs):
        raise RuntimeError("attack traced")

    monkeypatch.setattr(train_step_lib, "continuous_attack", boom)  # where train_step calls it
    cfg = dataclasses.replace(CFG, variant=variant)
    trace = lambda: jax.eval_shape(
        lambda s, b, k: steps.train_step(s, b, k, cfg=cfg),
        sgd_state,
        make_batch(0, 1),
        jax.random.key(0),
    )
    if variant == "mixat":
        with pytest.raises(RuntimeError, match="attack traced"):
            trace()
    else:
        trace()


# ---------------------------------------------------------------- two adversarial micro-batches
# "grad" steps give every attacked token its own ‖δ_t‖ (sign steps move all tokens by the same
# k·lr·√D, where token-weighted and per-micro-batch means coincide); lr 0.01 puts ~1/7 of the
# tokens on the ball's boundary (the others stay below 0.6·eps_abs).
GRAD_CFG = StepConfig(attack=ContinuousAttackConfig(iters=2, lr=0.01, optimizer="grad"))


@pytest.fixture(scope="module")
def two_groups():
    """G = 2 micro-batches that BOTH have valid adversarial rows (3 and 2 rows, 23 and 14
    attacked prompt tokens): the step-wide attack optimises two non-empty groups at once (the
    grouped objective's segment sums)."""
    batch = make_batch(0, 2)
    batch["adv_valid_A"][1] = np.array([True, False, True, False])
    return batch


def test_two_adversarial_microbatches_jit_pmap_and_attack_batching_agree(sgd_state, two_groups):
    """With two non-empty adversarial groups, jit (step-wide attack), jit (one micro-batch at a
    time) and pmap (one micro-batch per device) give the same update and the same metrics;
    ``delta_norm_mean`` / ``frac_at_boundary`` follow their definition (``step_metrics``):
    Σ_t ‖δ_t‖ / N and #{‖δ_t‖ >= (1 - 1e-3)·eps_abs} / N over the N attacked tokens of the whole
    step (token-weighted over the step, not a mean of per-micro-batch means)."""
    # A fresh step counter: the sharded test's donation also frees sgd_state.step (device_put
    # to a replicated sharding reuses its buffer).
    sgd_state = sgd_state.replace(step=jnp.zeros((), jnp.int32))
    key = jax.random.key(7)
    fn = jax.jit(lambda s, b, k: steps.train_step(s, b, k, cfg=GRAD_CFG))
    new_state, metrics = _run(fn, sgd_state, two_groups, key)

    # The definition, from the step's own δ (step-wide attack, same keys).
    attack = jax.jit(lambda s, b: steps.step_attack(s, b, key, 0, GRAD_CFG)[0])
    norms = np.linalg.norm(np.asarray(_run(attack, sgd_state, two_groups)), axis=-1)
    b = two_groups
    attacked = b["away_prompt_mask_AxL"] & b["away_mask_AxL"] & b["adv_valid_A"][..., None]
    eps_abs = GRAD_CFG.attack.eps * float(sgd_state.emb_norm)
    want_mean = norms[attacked].mean()
    want_frac = np.mean(norms[attacked] >= (1 - 1e-3) * eps_abs)
    assert 0.0 < want_frac < 1.0
    per_mb = np.mean([norms[g][attacked[g]].mean() for g in range(2)])
    assert abs(per_mb - want_mean) > 100 * METRIC_RTOL * want_mean  # the definitions differ here
    np.testing.assert_allclose(metrics["delta_norm_mean"], want_mean, rtol=METRIC_RTOL)
    assert float(metrics["frac_at_boundary"]) == pytest.approx(want_frac, rel=1e-6)
    np.testing.assert_allclose(metrics["delta_norm_max"], norms[attacked].max(), rtol=METRIC_RTOL)
    assert float(metrics["num_adv_rows"]) == 5.0

    cfg_mb = GRAD_CFG.replace(attack_batching="microbatch")
    fn_mb = jax.jit(lambda s, b, k: steps.train_step(s, b, k, cfg=cfg_mb))
    others = {"microbatch": _run(fn_mb, sgd_state, two_groups, key)}
    if jax.local_device_count() >= 2:
        pstep = steps.make_pmapped_train_step(GRAD_CFG, axis_name="dev")
        replicated = jax.tree.map(lambda x: jnp.broadcast_to(x, (2, *x.shape)), sgd_state)
        per_device = {k: v[:, None] for k, v in two_groups.items()}
        p_state, p_metrics = _run(pstep, replicated, per_device, key)
        for d in range(2):
            lora_d = jax.tree.map(lambda x, d=d: x[d], p_state.lora)
            others[f"pmap device {d}"] = (p_state.replace(lora=lora_d),
                                          jax.tree.map(lambda x, d=d: x[d], p_metrics))  # fmt: skip
    # Different programs: fp32 reassociation only (see UPDATE_RTOL / METRIC_RTOL).
    for name, (o_state, o_metrics) in others.items():
        _assert_states_close(o_state.lora, new_state.lora, sgd_state.lora)
        for k, v in metrics.items():
            np.testing.assert_allclose(
                o_metrics[k], v, rtol=METRIC_RTOL, atol=METRIC_ATOL, err_msg=f"{name}: {k}"
            )
