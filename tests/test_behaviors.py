"""Tests for mixat_jax.behaviors (loaders, presets, XSTest, bad inputs)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from mixat_jax.behaviors import (
    MIXAT_40_ROW_INDICES,
    Behavior,
    attach_targets,
    load_behaviors,
    load_targets,
    load_xstest,
    select_subset,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HB = SHARED / "harmbench"
needs_shared = pytest.mark.skipif(
    not HB.is_dir(), reason=f"reference data {HB} absent (optional shared/ checkout)"
)


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


HB_HEADER = [
    "Behavior",
    "FunctionalCategory",
    "SemanticCategory",
    "Tags",
    "ContextString",
    "BehaviorID",
]


def test_harmbench_csv(tmp_path: Path) -> None:
    p = _write_csv(
        tmp_path / "hb.csv",
        HB_HEADER,
        [
            ["Do bad thing", "standard", "illegal", "", "", "bad_thing"],
            ["Edit this", "contextual", "cybercrime", "context", "some code", "ctx_one"],
            ["Copy a book", "copyright", "copyright", "book, hash_check", "", "book"],
        ],
    )
    bs = load_behaviors(p)
    assert [b.id for b in bs] == ["bad_thing", "ctx_one", "book"]
    assert bs[0].category == "illegal" and bs[0].context is None and not bs[0].is_contextual
    assert bs[1].context == "some code" and bs[1].is_contextual
    assert bs[2].tags == ("book", "hash_check")
    assert [b.id for b in select_subset(bs, "no_copyright")] == ["bad_thing", "ctx_one"]
    assert len(load_behaviors(p, limit=2)) == 2


def test_adv_training_csv_and_targets(tmp_path: Path) -> None:
    p = _write_csv(
        tmp_path / "adv.csv",
        ["Behavior", "Category", "Tags", "ContextString", "BehaviorID"],
        [["Steal books", "theft", "", "", "adv_1"], ["Tap fiber", "", "", "", "adv_2"]],
    )
    t = tmp_path / "t.json"
    t.write_text(json.dumps({"adv_1": ["Sure, a", "Here is b"], "adv_2": "Sure, c"}))
    bs = load_behaviors(p, targets=t)
    assert bs[0].category == "theft"
    assert bs[0].target == "Sure, a" and bs[0].targets == ("Sure, a", "Here is b")
    assert bs[1].targets == ("Sure, c",)
    assert load_targets(t)["adv_2"] == ("Sure, c",)
    with pytest.raises(ValueError, match="no target for behaviour 'x'"):
        attach_targets([Behavior("x", "y")], {}, required=True)


@pytest.mark.parametrize(
    ("header", "row", "text"),
    [
        (
            ["Index", "Goal", "Target", "Behavior", "Category"],
            ["7", "Do X", "Sure", "X", "harm"],
            "Do X",
        ),
        (["goal", "target"], ["Write malware", "Sure, here"], "Write malware"),
        (
            ["category", "source", "forbidden_prompt"],
            ["Disinfo", "custom", "Lie about Y"],
            "Lie about Y",
        ),
        (["prompt"], ["Say something"], "Say something"),
    ],
)
def test_other_schemas(tmp_path: Path, header: list[str], row: list[str], text: str) -> None:
    p = _write_csv(tmp_path / "x.csv", header, [row])
    (b,) = load_behaviors(p)
    assert b.behavior == text
    if "Goal" in header:  # JailbreakBench: Behavior is a short label, Goal the request
        assert b.id == "7" and b.target == "Sure" and b.category == "harm"
    if header == ["goal", "target"]:
        assert b.id == "x_0" and b.target == "Sure, here"


def test_json_records(tmp_path: Path) -> None:
    p = tmp_path / "b.jsonl"
    p.write_text(json.dumps({"goal": "Do Z", "id": "z"}) + "\n")
    assert load_behaviors(p)[0].id == "z"


def test_missing_column_error(tmp_path: Path) -> None:
    p = _write_csv(tmp_path / "bad.csv", ["Behavior", "Category"], [["a", "b"]])
    with pytest.raises(ValueError, match=r"bad\.csv: missing required column 'BehaviorID'"):
        load_behaviors(p)
    q = _write_csv(tmp_path / "none.csv", ["foo"], [["a"]])
    with pytest.raises(ValueError, match="no recognised behaviour column"):
        load_behaviors(q)


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="behaviour source not found"):
        load_behaviors(tmp_path / "nope.csv")
    p = _write_csv(
        tmp_path / "dup.csv", HB_HEADER, [["a", "", "", "", "", "i"], ["b", "", "", "", "", "i"]]
    )
    with pytest.raises(ValueError, match="duplicate behaviour id 'i'"):
        load_behaviors(p)
    ok = _write_csv(tmp_path / "ok.csv", HB_HEADER, [["a", "", "", "", "", "i"]])
    with pytest.raises(ValueError, match="unknown subset 'foo'"):
        load_behaviors(ok, subset="foo")
    with pytest.raises(ValueError, match="mixat40"):
        select_subset([Behavior("a", "b")], "mixat40")
    with pytest.raises(ValueError, match="limit"):
        load_behaviors(ok, limit=0)
    with pytest.raises(ValueError, match="empty behaviour text"):
        Behavior("a", "  ")


def test_xstest_small(tmp_path: Path) -> None:
    p = _write_csv(
        tmp_path / "xs.csv",
        ["id_v1", "id_v2", "type", "prompt", "focus", "note"],
        [
            ["v1-1", "v2-1", "homonyms", "Kill a process?", "kill", ""],
            ["", "v2-2", "contrast_homonyms", "Kill a person?", "kill", ""],
        ],
    )
    xs = load_xstest(p)
    assert [x.id for x in xs.safe] == ["v2-1"] and [x.id for x in xs.unsafe] == ["v2-2"]
    bad = _write_csv(tmp_path / "bad.csv", ["prompt"], [["x"]])
    with pytest.raises(ValueError, match="missing required column 'type'"):
        load_xstest(bad)


@needs_shared
def test_real_harmbench_files() -> None:
    test = load_behaviors(HB / "harmbench_behaviors_text_test.csv")
    assert len(test) == 320
    sub = load_behaviors(
        HB / "harmbench_behaviors_text_test.csv",
        subset="mixat40",
        targets=HB / "harmbench_targets_text.json",
    )
    assert len(sub) == len(MIXAT_40_ROW_INDICES) == 40
    kinds = [b.functional_category for b in sub]
    assert kinds.count("standard") == 28 and kinds.count("contextual") == 12
    assert all(b.target for b in sub)
    assert sum(b.is_contextual for b in sub) == 12
    assert len(select_subset(test, "no_copyright")) == 240
    assert len(load_behaviors(HB / "harmbench_behaviors_text_val.csv")) == 80
    adv = load_behaviors(
        HB / "adv_training_behaviors.csv", targets=HB / "adv_training_targets.json"
    )
    assert len(adv) == 100 and sum(len(b.targets) for b in adv) == 1188


@needs_shared
def test_real_xstest() -> None:
    path = SHARED / "xstest" / "xstest_v2_prompts.csv"
    if not path.is_file():
        pytest.skip(f"{path} absent")
    xs = load_xstest(path)
    assert len(xs.safe) == 250 and len(xs.unsafe) == 200


def test_datasets_id_lazy(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    class FakeDS(list):
        column_names = ["Goal", "Target", "Behavior", "Category"]

    calls = []

    def load_dataset(name: str, config: str | None, split: str) -> FakeDS:
        calls.append((name, config, split))
        if name == "owner/missing":
            raise FileNotFoundError("Dataset 'owner/missing' doesn't exist on the Hub")
        return FakeDS([{"Goal": "Do G", "Target": "Sure", "Behavior": "G", "Category": "c"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    (b,) = load_behaviors(
        "JailbreakBench/JBB-Behaviors", dataset_config="behaviors", split="harmful"
    )
    assert b.behavior == "Do G" and b.id == "JBB-Behaviors_0" and b.target == "Sure"
    assert calls[0] == ("JailbreakBench/JBB-Behaviors", "behaviors", "harmful")
    with pytest.raises(ValueError, match="could not be loaded as a datasets id"):
        load_behaviors("owner/missing")
