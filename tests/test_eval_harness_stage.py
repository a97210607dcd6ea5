"""Issue #13: lm-evaluation-harness tasks as a utility stage of `python -m mixat_jax.evaluate`
(evaluation/harness_stage.py, `config.lm_eval`): on a tiny local multiple-choice task the stage's
acc equals the accuracy computed without harness code (tests/test_lm_eval.py's helper) on the
target + adapter, the report carries the harness table and its judge, an unchanged re-run
recomputes nothing (no model is touched), a changed setting re-runs; bad config is one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from tests.test_lm_eval import independent_acc, tiny_model_adapter_and_task  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_adapter_and_task(tmp_path_factory.mktemp("harness_stage"), seed=5)


def config(base, adapter, tasks, attacks="", **lm_eval):
    from mixat_jax.evaluation.run_config import base_config

    cfg = base_config()
    cfg.model, cfg.adapter, cfg.attacks = str(base), str(adapter), attacks
    cfg.limit, cfg.max_new_tokens, cfg.gen_batch_size = 1, 4, 2
    cfg.xstest, cfg.xstest_limit = "xstest_v2", 1  # string judge: named beside the harness's
    cfg.lm_eval.update(
        {"tasks": "tiny_mc", "include_path": str(tasks), "batch_size": 4, "max_length": 256}
    )
    cfg.lm_eval.update(lm_eval)
    return cfg


class Untouchable:
    """A target that fails if anything uses it (proves a cached stage loads nothing)."""

    def __getattr__(self, name):
        raise AssertionError(f"the cached lm-eval stage touched the target ({name})")


def test_stage_matches_direct_accuracy_reports_and_caches(tiny, tmp_path, monkeypatch):
    from mixat_jax.evaluation.pipeline import run
    from mixat_jax.hf.load import load_pretrained

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    base, adapter, tasks = tiny
    out = tmp_path / "out"
    got = run(config(base, adapter, tasks, attacks="DirectRequest"), out)
    res = json.loads((out / "lm_eval.json").read_text())
    adapted, tok = load_pretrained(base, adapter=adapter)
    acc, _ = independent_acc(adapted, tok)
    assert res["results"]["tiny_mc"]["acc,none"] == pytest.approx(acc)
    assert set(res["model_fingerprints"]) == {"target", "adapter"}
    assert len(res["model_fingerprints"]["adapter"]["sha256"]) == 64
    (row,) = got["utility"]["lm_eval"]["rows"]
    assert (row["task"], row["metric"], row["n_shot"]) == ("tiny_mc", "acc", 0)
    assert row["value"] == pytest.approx(acc) and row["stderr"] > 0
    util = json.loads((out / "utility.json").read_text())
    assert util["lm_eval"]["rows"] == got["utility"]["lm_eval"]["rows"]
    report = (out / "report.md").read_text()  # beside the robustness numbers
    assert "## Attack success rate" in report and "ALO (any attack)" in report
    assert f"### Utility (lm-evaluation-harness {res['lm_eval_version']})" in report
    xstest_judge = util["xstest"]["judge"]
    assert (
        "- judge: lm-evaluation-harness log-likelihood scoring (not the XSTest / HarmLess "
        f"judges: XSTest: `{xstest_judge}`)"
    ) in report
    assert "| lm_eval.rows" not in report and "| lm_eval.judge" not in report
    assert f"| tiny_mc | acc | {acc:.4f} | {row['stderr']:.4f} | 0 |" in report

    # same model content and task settings: nothing recomputed, the target is never touched
    mtime = (out / "lm_eval.json").stat().st_mtime_ns
    again = run(config(base, adapter, tasks, attacks="DirectRequest"), out, target=Untouchable())
    assert (out / "lm_eval.json").stat().st_mtime_ns == mtime
    assert again["utility"]["lm_eval"] == got["utility"]["lm_eval"]

    # a changed setting re-runs the harness (first 3 documents only)
    run(config(base, adapter, tasks, limit=3), out)
    res3 = json.loads((out / "lm_eval.json").read_text())
    assert res3["n-samples"]["tiny_mc"]["effective"] == 3
    assert res3["fingerprint"] != res["fingerprint"]


@pytest.mark.parametrize(
    "override, message",
    [
        ({"num_fewshot": -1}, "config.lm_eval.num_fewshot must be >= 0, got -1"),
        ({"include_path": "/no/such/dir"}, "config.lm_eval.include_path '/no/such/dir' is not"),
    ],
)
def test_bad_lm_eval_config_is_one_line(tiny, tmp_path, override, message):
    from mixat_jax.evaluation.run_config import resolve

    base, adapter, tasks = tiny
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")) as e:
        resolve(config(base, adapter, tasks, **override), tmp_path / "out")
    assert "\n" not in str(e.value)


def test_missing_lm_eval_is_one_line_before_any_model_loads(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # not a loadable model: nothing may load it
    out = tmp_path / "out"
    argv = [
        "evaluate", "--config", str(ROOT / "configs/eval/tiny.py"), f"--config.model={model}",
        "--config.attacks=", "--config.lm_eval.tasks=arc_easy", f"--workdir={out}",
    ]  # fmt: skip
    code = (
        "import sys; sys.modules['lm_eval'] = None; "
        f"sys.argv = {argv!r}; from mixat_jax.evaluate import cli; cli()"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines() == [
        "error: config.lm_eval.tasks='arc_easy' needs the lm-eval package; "
        "pip install 'lm-eval>=0.4.9' (or --config.lm_eval.tasks='' to skip it)"
    ]
    assert not out.exists()
