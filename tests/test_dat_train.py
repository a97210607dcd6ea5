"""DAT Stage B (DAT spec §2.3): ``variant="dat"`` in ``python -m mixat_jax.train``.

The dat step IS the cat step (same jaxpr, same lowered program); Stage A's ``selected.jsonl``
becomes the adversarial rows (inpainted prompt as the instruction, refusal of the original
behaviour); bad input is one line with status 2 and an untouched workdir; a tiny CPU run with
the per-epoch re-selection ablation stops, resumes (re-reading the epoch's selection) and
finishes; a changed ``dat.selected`` is another config; ``configs/dat/*.py`` resolve.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from mixat_jax import config_types, steps
from mixat_jax.attacks.continuous import ContinuousAttackConfig
from mixat_jax.dat.reselect import choose, score
from mixat_jax.hf.load import load_pretrained
from mixat_jax.mesh import MeshConfig, make_mesh
from mixat_jax.models.config import LoraConfig, tiny_config
from mixat_jax.models.decoder import Decoder
from mixat_jax.tiny_model import build_tiny_checkpoint
from mixat_jax.training import data as data_lib
from mixat_jax.training import run_config as rc
from mixat_jax.training.batches import BatchLayout
from mixat_jax.training.data import AdvRow
from mixat_jax.training.state import init_train_state
from mixat_jax.training.step_config import StepConfig
from mixat_jax.training.stream import EpochStream, load_rows
from mixat_jax.training.synthetic import safety_world
from tests.test_steps import make_batch

ROOT = Path(__file__).resolve().parents[1]
TINY = "configs/dat/tiny.py"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f
    )
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    env.pop("MIXAT_DAT_SELECTED", None)
    return env


def stage_a_records(behaviors: int = 6, draws: int = 8, kept: int = 3) -> list[dict]:
    """Stage-A-shaped candidates on the synthetic world's training behaviours (``selected`` =
    the first ``kept`` draws of each)."""
    first: dict[str, AdvRow] = {}
    for r in safety_world(0)["train_adv"]:
        first.setdefault(r.behavior_id, r)
    return [
        {"behavior_id": bid, "behavior": r.behavior, "draw": j,
         "prompt": f"{r.behavior} Variant {j}.", "target": r.target, "log_likelihood": -float(j),
         "target_loss": float(j), "judge_score": 0.5, "completion": "", "selected": j < kept}
        for bid, r in list(first.items())[:behaviors] for j in range(draws)
    ]  # fmt: skip


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def stage_a(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("stage_a")
    records = stage_a_records()
    write_jsonl(d / "samples.jsonl", records)
    write_jsonl(d / "selected.jsonl", [r for r in records if r["selected"]])
    return d / "selected.jsonl"


# ------------------------------------------------------------------------------ the step
def test_dat_step_is_the_cat_step():
    """Same rows, same key: variant "dat" traces to the same jaxpr as "cat" (the same program,
    so the same state and metrics), and it runs the attack."""
    model = Decoder(tiny_config(num_layers=1), rngs=nnx.Rngs(0))
    model.add_lora(LoraConfig(r=4, alpha=8, dropout=0.1, targets=("q_proj", "down_proj")))
    state = init_train_state(model, optax.sgd(1.0))
    batch, key = make_batch(0, 2), jax.random.key(7)
    attack = ContinuousAttackConfig(iters=2, lr=1e-3)
    programs = {}
    for variant in ("cat", "dat"):
        cfg = StepConfig(variant=variant, attack=attack)
        assert cfg.runs_attack
        fn = lambda s, b, k, cfg=cfg: steps.train_step(s, b, k, cfg=cfg)
        programs[variant] = str(jax.make_jaxpr(fn)(state, batch, key))
    assert re.search(r"\bsign\b", programs["dat"])  # the attack's signed steps are traced
    assert programs["dat"] == programs["cat"]


# ------------------------------------------------------------------------------ rows
def test_load_dat_rows_maps_prompt_target_and_refusal(tmp_path):
    records = stage_a_records(behaviors=2, draws=2, kept=2)
    records[3]["behavior"] = "A behaviour without a safe response."
    path = write_jsonl(tmp_path / "selected.jsonl", records)
    safe = tmp_path / "safe.csv"
    safe.write_text(f'Behavior,Safe_Response\n"{records[0]["behavior"]}",No: it is secret.\n')
    rows = data_lib.load_dat_rows(path, safe, refusal="Constant refusal.")
    assert [r.behavior for r in rows] == [r["prompt"] for r in records]  # the prompt is trained
    assert [r.behavior_id for r in rows] == [r["behavior_id"] for r in records]
    assert [r.target for r in rows] == [r["target"] for r in records]
    assert [r.refusal for r in rows] == ["No: it is secret."] * 2 + ["Constant refusal."] * 2
    assert {r.refusal for r in data_lib.load_dat_rows(path)} == {data_lib.SAFE_RESPONSE}


def test_load_rows_dat_replaces_or_extends_the_adversarial_rows(stage_a):
    spec = rc.DataSpec(source="synthetic", behaviors="", targets="", safe_responses="")
    world = safety_world(0)
    adv, util = load_rows(spec, rc.DatSpec(selected=str(stage_a)))
    assert len(adv) == 18 and all(r.behavior.endswith(".") and "Variant" in r.behavior
                                  for r in adv)  # fmt: skip
    assert util == list(world["train_util"])
    both, _ = load_rows(spec, rc.DatSpec(selected=str(stage_a), include_original=True))
    assert both == adv + list(world["train_adv"])
    assert load_rows(spec)[0] == list(world["train_adv"])


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "no selected prompts in"),
        ('{"behavior_id": "b"\n', "line 2 of"),
        ('{"behavior_id": "b", "behavior": "x", "prompt": "p"}\n', "has no field 'target'"),
    ],
)
def test_bad_selected_files_are_one_line(tmp_path, text, message):
    path = tmp_path / "selected.jsonl"
    path.write_text("\n" + text)
    with pytest.raises(ValueError) as e:
        data_lib.load_dat_rows(path)
    assert message in str(e.value) and "\n" not in str(e.value)
    if text:
        assert f"line 2 of {str(path)!r}" in str(e.value)
    with pytest.raises(ValueError, match="does not exist"):
        data_lib.load_dat_rows(tmp_path / "absent.jsonl")


def test_epoch_adv_replaces_rows_and_keeps_the_plan():
    adv = [AdvRow(f"b{i}", f"prompt {i}", "t") for i in range(10)]
    util = safety_world(0)["train_util"][:60]
    mixture = data_lib.interleave(adv, util, adv_probability=0.2, seed=1)
    layout = BatchLayout(adv_slots=2, util_slots=3)
    plain = EpochStream(mixture, layout, seed=0)
    new = [dataclasses.replace(r, behavior=r.behavior.upper()) for r in adv]
    swapped = EpochStream(mixture, layout, seed=0, epoch_adv=lambda e: new if e == 1 else None)
    n = plain.micro_batches_in(3)
    assert swapped.micro_batches_in(3) == n
    for m in range(n):
        a, b = plain[m], swapped[m]
        assert b.util_rows == a.util_rows
        epoch = plain.locate(m)[0]
        want = [r.behavior.upper() if epoch == 1 else r.behavior for r in a.adv_rows]
        assert [r.behavior for r in b.adv_rows] == want


def test_reselection_keeps_the_k_lowest_losses_per_behaviour():
    records = stage_a_records(behaviors=2, draws=4, kept=2)
    selected = [r for r in records if r["selected"]]
    losses = [3.0, 1.0, 2.0, 1.0, 0.5, 0.7, 0.9, 0.1]
    chosen = choose(selected, records, losses)
    assert [(r["behavior_id"], r["draw"]) for r in chosen] == [
        (records[0]["behavior_id"], 1), (records[0]["behavior_id"], 3),
        (records[4]["behavior_id"], 3), (records[4]["behavior_id"], 0),
    ]  # fmt: skip
    assert [r["target_loss"] for r in chosen] == [1.0, 1.0, 0.1, 0.5]
    with pytest.raises(ValueError, match="needs 2 candidates"):
        choose(selected, records[:5], losses[:5])


def test_reselection_scores_the_same_on_a_sharded_mesh(tmp_path):
    """``reselect.score`` (Stage A's target CE under the current parameters) on an fsdp=8 mesh
    with the rows sharded equals the single-device scores; padding rows are dropped."""
    path = build_tiny_checkpoint(tmp_path / "tiny", vocab_size=512, hidden_size=32)
    model, tok = load_pretrained(path, kind="causal")
    candidates = stage_a_records(behaviors=3, draws=4)[:11]
    single = score(model, tok, candidates, batch_rows=8, system_prompt=None, mesh=None)
    mesh = make_mesh(MeshConfig(fsdp=8))
    with jax.set_mesh(mesh):
        sharded_model, _ = load_pretrained(path, kind="causal", mesh=mesh)
        sharded = score(sharded_model, tok, candidates, batch_rows=8, system_prompt=None,
                        mesh=mesh)  # fmt: skip
    assert single.shape == (11,) and np.all(np.isfinite(single)) and np.all(single > 0)
    np.testing.assert_allclose(sharded, single, rtol=1e-5)


# ------------------------------------------------------------------------------ configs
def _load(path: str, arg=None) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"dat_{Path(path).stem}", ROOT / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


@pytest.mark.parametrize("name", ["llama3_8b", "qwen2_5_14b", "tiny"])
def test_dat_configs_resolve(name):
    """configs/dat/<name>.py resolves and round-trips, with DAT's App. B values (spec §2.3)."""
    c = _load(f"configs/dat/{name}.py")
    cfg = rc.from_config_dict(c)
    assert config_types.to_config_dict(cfg).to_dict() == c.to_dict()
    assert cfg.variant == "dat" and cfg.discrete.schedule == "none" and cfg.dat.selected
    assert cfg.optim.learning_rate == 1e-4 and cfg.step.loss.utility_weight == 0.45
    assert not cfg.dat.include_original and not cfg.dat.reselect_every_epoch
    if name != "tiny":
        assert cfg.dtype == "bfloat16" and cfg.lora.r == 64 and cfg.grad_accum == 8
        assert (cfg.batch.adv_slots, cfg.batch.util_slots) == (1, 7)
        assert cfg.step.attack.iters == (40 if name == "qwen2_5_14b" else 10)


def test_dat_block_and_variant_must_agree():
    base = {"model": "m", "discrete": {"schedule": "none"}}
    with pytest.raises(ValueError, match=r"--config.dat.selected=OUT/selected.jsonl"):
        rc.from_config_dict({**base, "variant": "dat"})
    with pytest.raises(ValueError, match=r"variant is 'cat'; use --config.variant=dat"):
        rc.from_config_dict({**base, "variant": "cat", "dat": {"selected": "s.jsonl"}})
    with pytest.raises(ValueError, match="discrete.schedule=none"):
        rc.from_config_dict({"model": "m", "variant": "dat", "dat": {"selected": "s.jsonl"}})


# ------------------------------------------------------------------------------ the CLI
def _train(workdir: Path, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mixat_jax.train", f"--config={TINY}", f"--workdir={workdir}",
           *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", "no selected prompts in"),
        ("missing_field", "has no field 'target'"),
        ("no_selected", "--config.dat.selected=OUT/selected.jsonl"),
        ("with_cat", "use --config.variant=dat"),
    ],
)
def test_bad_dat_input_is_one_line_and_leaves_workdir_intact(tmp_path, stage_a, case, message):
    selected = tmp_path / "selected.jsonl"
    if case == "missing_field":
        rec = {k: v for k, v in stage_a_records(1, 1)[0].items() if k != "target"}
        write_jsonl(selected, [rec])
    else:
        selected.write_text("")
    extra = {
        "empty": [f"--config.dat.selected={selected}"],
        "missing_field": [f"--config.dat.selected={selected}"],
        "no_selected": ["--config.dat.selected="],
        "with_cat": ["--config.variant=cat", f"--config.dat.selected={stage_a}"],
    }[case]
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("keep me")
    before = {p.name: p.read_bytes() for p in workdir.iterdir()}
    proc = _train(workdir, *extra, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith("error:") and message in errors[0], errors
    assert {p.name: p.read_bytes() for p in workdir.iterdir()} == before


def test_tiny_dat_run_with_reselection_stops_resumes_and_finishes(tmp_path, stage_a):
    """configs/dat/tiny.py on the Stage-A-shaped file: 7 micro-batches per epoch (18 selected
    rows, mixture p_adv 0.5, 3 + 3 slots), 2 per step; epoch 1 starts in step 4, whose
    re-selection is written, then re-read by the resumed run. A changed dat.selected is another
    config for the workdir."""
    workdir = tmp_path / "run"
    common = [f"--config.dat.selected={stage_a}", "--config.steps=5", "--config.attack.iters=2",
              "--config.dat.reselect_every_epoch=true", "--config.data.adv_probability=0.5",
              "--config.batch.adv_slots=3", "--config.batch.util_slots=3",
              "--config.dat.reselect_batch_size=16",
              f"--config.tiny_model.cache_dir={tmp_path / 'tiny'}",
              f"--config.compilation_cache_dir={tmp_path / 'xla'}"]  # fmt: skip
    first = _train(workdir, *common, "--config.stop_after=4")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "18 adversarial" in first.stderr and "7 micro-batches/epoch" in first.stderr
    chosen = workdir / "dat_reselect" / "epoch_1.jsonl"
    assert "DAT re-selection of epoch 1: 18 of 48 candidates" in first.stderr, first.stderr[-2000:]
    records = data_lib.read_dat_records(chosen)
    assert data_lib.per_behavior_counts(records) == {r["behavior_id"]: 3 for r in records}
    assert all(r["reselect_epoch"] == 1 and np.isfinite(r["target_loss"]) for r in records)
    config = json.loads((workdir / "config.json").read_text())
    assert config["variant"] == "dat" and config["dat"]["selected"] == str(stage_a)
    second = _train(workdir, *common)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from checkpoint step 4" in second.stderr
    assert f"DAT re-selection of epoch 1: read {chosen}" in second.stderr
    assert data_lib.read_dat_records(chosen) == records
    metrics = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    assert [m["epoch"] for m in metrics] == [0, 0, 0, 1, 1]
    assert all(np.isfinite(m["loss"]) and m["train_step_compiles"] == 1 for m in metrics)
    assert (workdir / "adapter" / "adapter_model.safetensors").exists()
    other = tmp_path / "other.jsonl"
    other.write_bytes(stage_a.read_bytes())
    again = _train(workdir, *[f"--config.dat.selected={other}" if a.startswith(
        "--config.dat.selected") else a for a in common], timeout=120)  # fmt: skip
    assert again.returncode == 2 and "different config" in again.stderr
