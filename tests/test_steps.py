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

from mixat_jax import steps  # noqa: E402
from mixat_jax.attacks.continuous import ContinuousAttackConfig  # noqa: E402
from mixat_jax.mesh import MeshConfig, make_mesh  # noqa: E402
from mixat_jax.models.config import LoraConfig, tiny_config  # noqa: E402
from mixat_jax.models.decoder import Decoder  # noqa: E402
from mixat_jax.training import losses  # noqa: E402
from mixat_jax.training.optim import OptimConfig, lr_schedule, make_optimizer  # noqa: E402
from mixat_jax.training.state import init_train_state, place_train_state  # noqa: E402
from mixat_jax.training.step_config import StepConfig  # noqa: E402

A, U, LA, LU, V = 4, 4, 20, 16, 512
CFG = StepConfig(attack=ContinuousAttackConfig(iters=2, lr=1e-3))  # dropout on everywhere
FAST = {"xla_backend_optimization_level": 0}  # halves XLA:CPU compile time; same numerics


def _run(fn, *args):
    """Lower + compile with FAST options, then call (fn is jax.jit(...) or jax.pmap(...))."""
    return fn.lower(*args).compile(FAST)(*args)


def _rows(rng, n, length, prompt_lens, target_lens):
    ids = rng.integers(1, V, (n, length)).astype(np.int32)
    pos = np.arange(length)[None]
    mask = pos < (prompt_lens + target_lens)[:, None]
    prompt = pos < prompt_lens[:, None]
    ids[~mask] = 0
    return ids, mask, prompt, mask & ~prompt


def make_batch(seed: int, g: int) -> dict[str, np.ndarray]:
    """G right-padded micro-batches; away/toward share the prompt; micro-batch 0 has one invalid
    adversarial and one invalid utility slot, micro-batch 1 no valid adversarial row at all."""
    rng = np.random.default_rng(seed)
    out: dict[str, list] = {}

    def add(key, value):
        out.setdefault(key, []).append(value)

    for i in range(g):
        plen = rng.integers(5, 10, A)
        away = _rows(rng, A, LA, plen, rng.integers(3, 8, A))
        toward = _rows(rng, A, LA, plen, rng.integers(2, 5, A))
        toward[0][toward[2]] = away[0][away[2]]
        names = ("ids", "mask", "prompt_mask", "target_mask")
        for name, a, t in zip(names, away, toward, strict=True):
            add(f"away_{name}_AxL", a)
            add(f"toward_{name}_AxL", t)
        add("adv_valid_A", np.array([i == 0, i == 0, False, i == 0]))
        util = _rows(rng, U, LU, rng.integers(3, 7, U), rng.integers(4, 9, U))
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


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-7):
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


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


def test_pmap_equals_jit_on_concatenated_microbatches(jit_result, pmap_result):
    """pmap over 2 devices (1 micro-batch each) == jit over the same 2 micro-batches."""
    _, new_state, metrics = jit_result
    p_state, p_metrics = pmap_result
    for d in range(2):
        _assert_trees_close(jax.tree.map(lambda x, d=d: x[d], p_state.lora), new_state.lora)
    for k, v in metrics.items():
        np.testing.assert_allclose(p_metrics[k][0], v, rtol=1e-5, atol=1e-7, err_msg=k)


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
    implied = jax.tree.map(lambda old, new: old - new, sgd_state.lora, new_state.lora)
    _assert_trees_close(implied, mean, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(metrics["loss"], np.mean(losses_), rtol=1e-5)


def test_step_wide_attack_equals_microbatch_attacks(sgd_state, jit_result):
    """``attack_batching="step"`` (all micro-batches attacked in one call, the default) gives the
    same update and attack metrics as attacking one micro-batch at a time (per-row keys)."""
    batch, new_state, metrics = jit_result
    cfg = CFG.replace(attack_batching="microbatch")
    fn = jax.jit(lambda s, b, k: steps.train_step(s, b, k, cfg=cfg))
    m_state, m_metrics = fn.lower(sgd_state, batch, jax.random.key(7)).compile(FAST)(
        sgd_state, batch, jax.random.key(7)
    )
    _assert_trees_close(m_state.lora, new_state.lora, rtol=1e-4, atol=1e-7)
    for k in ("loss", "attack_loss_before", "attack_loss_after", "delta_norm_max"):
        np.testing.assert_allclose(m_metrics[k], metrics[k], rtol=1e-4, atol=1e-6, err_msg=k)
    with pytest.raises(ValueError, match="attack_batching"):
        CFG.replace(attack_batching="rows")


def test_sharded_jit_equals_single_device(sgd_state, jit_result):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    batch, new_state, metrics = jit_result
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    step = steps.make_jitted_train_step(CFG, sgd_state.tx, mesh, compiler_options=FAST)
    placed = place_train_state(sgd_state, mesh)
    compiled = step.compile(placed, batch, jax.random.key(7))
    assert compiled.memory_analysis() is not None
    s_state, s_metrics = step(placed, batch, jax.random.key(7))
    _assert_trees_close(s_state.lora, new_state.lora)
    for k, v in metrics.items():
        np.testing.assert_allclose(s_metrics[k], v, rtol=1e-5, atol=1e-7, err_msg=k)
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
            return losses.masked_ce(logits, ids, mb[f"{prefix}_target_mask_{suffix}"], valid)

        ces = [ce(p, s, mb[v]) for p, s, v in (
            ("away", "AxL", "adv_valid_A"),
            ("toward", "AxL", "adv_valid_A"),
            ("util", "UxM", "util_valid_U"),
        )]  # fmt: skip
        return metrics, ces

    metrics, (ce_h, ce_s, ce_u) = _run(run, sgd_state, batch)
    want = 0.5 * losses.floor_away(-ce_h) + 0.5 * losses.floor_toward(ce_s) + ce_u
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
    assert float(steps._learning_rate(state)) == pytest.approx(2e-4)


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

    monkeypatch.setattr(steps, "continuous_attack", boom)
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
