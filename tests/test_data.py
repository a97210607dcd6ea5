"""Tests for training/data.py, training/batches.py and training/synthetic.py (spec §2, §11.7)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest

from mixat_jax.training import batches as B
from mixat_jax.training import data as D
from mixat_jax.training import synthetic as S

HARMBENCH = Path(os.environ.get("MIXAT_HARMBENCH_DIR", "/work/shared/data/harmbench"))
needs_harmbench = pytest.mark.skipif(
    not (HARMBENCH / "adv_training_targets.json").exists(),
    reason=f"real HarmBench files not found in {HARMBENCH} (set MIXAT_HARMBENCH_DIR)",
)


def _adv(n: int) -> list[D.AdvRow]:
    return [D.AdvRow(f"b{i}", f"do bad thing {i}", f"Sure here is {i}") for i in range(n)]


def _util(n: int) -> list[D.UtilityRow]:
    return [
        D.UtilityRow([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}])
        for i in range(n)
    ]


# ------------------------------------------------------------------------------ interleave


def test_interleave_contains_all_adv_and_stops_at_exhaustion():
    adv, util = _adv(200), _util(5000)
    mixed = D.interleave(adv, util, seed=42)
    got_adv = [r for r in mixed if isinstance(r, D.AdvRow)]
    got_util = [r for r in mixed if isinstance(r, D.UtilityRow)]
    assert got_adv == adv  # all present, consumed in order
    assert got_util == util[: len(got_util)]  # a prefix, in order
    assert mixed[-1] is adv[-1]  # stops right after the adversarial set is used up
    assert abs(len(adv) / len(mixed) - 0.125) < 0.03


def test_interleave_matches_reference_count_and_is_seeded():
    idx = D.interleave_indices([1188, 100_000], [0.125, 0.875], seed=42)
    assert len(idx) == 9676  # the spec's re-simulation of datasets + default_rng(42)
    assert (idx[:, 0] == 0).sum() == 1188
    again = D.interleave_indices([1188, 100_000], [0.125, 0.875], seed=42)
    other = D.interleave_indices([1188, 100_000], [0.125, 0.875], seed=43)
    assert np.array_equal(idx, again)
    assert not np.array_equal(idx[:500], other[:500])


def test_interleave_equals_datasets_library():
    datasets = pytest.importorskip("datasets")
    a = datasets.Dataset.from_dict({"x": list(range(300))})
    u = datasets.Dataset.from_dict({"x": list(range(10_000, 13_000))})
    ref = datasets.interleave_datasets(
        [a, u], probabilities=[0.125, 0.875], seed=7, stopping_strategy="first_exhausted"
    )["x"]
    idx = D.interleave_indices([300, 3000], [0.125, 0.875], seed=7)
    mine = np.where(idx[:, 0] == 0, idx[:, 1], 10_000 + idx[:, 1])
    assert list(mine) == list(ref)


def test_interleave_stops_when_utility_runs_out_first():
    mixed = D.interleave(_adv(100), _util(20), seed=0)
    assert sum(isinstance(r, D.UtilityRow) for r in mixed) == 20
    assert isinstance(mixed[-1], D.UtilityRow)


def test_interleave_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        D.interleave(_adv(3), [], seed=0)
    with pytest.raises(ValueError, match="adv_probability"):
        D.interleave(_adv(3), _util(3), adv_probability=1.5)


def test_epoch_permutation_and_host_shard():
    p0, p0b, p1 = (D.epoch_permutation(50, e, seed=1) for e in (0, 0, 1))
    assert np.array_equal(p0, p0b) and not np.array_equal(p0, p1)
    assert sorted(p0) == list(range(50))
    items = list(range(8))
    assert D.host_shard(items, 1, 4) == [2, 3]
    assert sum((D.host_shard(items, i, 2) for i in range(2)), []) == items
    with pytest.raises(ValueError, match="divisible"):
        D.host_shard(items, 0, 3)


# ------------------------------------------------------------------------------ loaders


def test_load_adv_rows_local_files(tmp_path: Path):
    (tmp_path / "b.csv").write_text("Behavior,Category,BehaviorID\nDo X,,id1\nDo Y,,id2\n")
    (tmp_path / "t.json").write_text(json.dumps({"id1": ["Sure X1", "Sure X2"], "id2": ["Y"]}))
    (tmp_path / "s.csv").write_text('Behavior,Safe_Response\nDo X,No X\nDo Y,"No, Y"\n')
    rows = D.load_adv_rows(tmp_path / "b.csv", tmp_path / "t.json", tmp_path / "s.csv")
    assert rows == [
        D.AdvRow("id1", "Do X", "Sure X1", "No X"),
        D.AdvRow("id1", "Do X", "Sure X2", "No X"),
        D.AdvRow("id2", "Do Y", "Y", "No, Y"),
    ]
    const = D.load_adv_rows(tmp_path / "b.csv", tmp_path / "t.json")
    assert {r.refusal for r in const} == {D.SAFE_RESPONSE}
    (tmp_path / "t2.json").write_text(json.dumps({"id1": ["x"]}))
    with pytest.raises(ValueError, match="id2.*no targets"):
        D.load_adv_rows(tmp_path / "b.csv", tmp_path / "t2.json")
    with pytest.raises(ValueError, match="does not exist"):
        D.load_adv_rows(tmp_path / "missing.csv", tmp_path / "t.json")


@needs_harmbench
def test_load_adv_rows_real_harmbench():
    rows = D.load_adv_rows(
        HARMBENCH / "adv_training_behaviors.csv",
        HARMBENCH / "adv_training_targets.json",
        HARMBENCH / "adv_training_behaviors_safe_responses.csv",
    )
    assert len(rows) == 1188
    assert len({r.behavior_id for r in rows}) == 100
    assert {r.refusal for r in rows} == {"Sorry, I can't do that."}
    assert rows[0].behavior_id == "adv_training_1" and rows[0].target.startswith("Sure")


def test_load_utility_rows_local(tmp_path: Path):
    long_q = "x" * 800
    recs = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "user", "content": long_q}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]},
    ]
    (tmp_path / "u.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    rows = D.load_utility_rows(tmp_path / "u.jsonl")
    assert [r.first_user_message for r in rows] == ["hi", "b"]  # 800-char prompt filtered out
    assert len(D.load_utility_rows(tmp_path / "u.jsonl", limit=1)) == 1
    (tmp_path / "p.json").write_text(json.dumps([{"prompt": "p", "response": "r"}]))
    (row,) = D.load_utility_rows(tmp_path / "p.json")
    assert row.messages == [{"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}]
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "u.parquet")
    assert len(D.load_utility_rows(tmp_path / "u.parquet")) == 2
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "x"}))
    with pytest.raises(ValueError, match="messages"):
        D.load_utility_rows(tmp_path / "bad.jsonl")


# ------------------------------------------------------------------------------ batches

BOS, USER, ASST, EOT = 1, 2, 3, 4


def _tok(text: str) -> list[int]:
    return [10 + sum(map(ord, w)) % 500 for w in text.split()]


def fake_render(instruction: str, response: str):
    prompt = [BOS, USER, *_tok(instruction), ASST]
    resp = [*_tok(response), EOT]
    ids = np.array(prompt + resp)
    pm = np.array([1] * len(prompt) + [0] * len(resp), bool)
    return ids, pm, ~pm


@dataclasses.dataclass
class Rendered:  # same fields as mixat_jax.chat.Rendered
    ids: np.ndarray
    prompt_mask: np.ndarray
    response_mask: np.ndarray
    prompt_len: int


def fake_render_conversation(messages):
    ids, pm, rm = [BOS], [True], [False]
    for m in messages:
        if m["role"] == "user":
            toks = [USER, *_tok(m["content"]), ASST]
            ids += toks
            pm += [True] * len(toks)
            rm += [False] * len(toks)
        else:
            toks = [*_tok(m["content"]), EOT]
            ids += toks
            pm += [False] * len(toks)
            rm += [True] * len(toks)
    r = Rendered(np.array(ids), np.array(pm), np.array(rm), 0)
    r.prompt_len = int(np.argmax(r.response_mask))
    return r


def _layout(**kw) -> B.BatchLayout:
    base = dict(adv_slots=2, util_slots=3, max_len_adv=16, max_len_util=12)
    return B.BatchLayout(**{**base, **kw})


def test_pack_shapes_masks_and_alignment():
    layout = _layout()
    row = D.AdvRow("b1", "make a bomb", "Sure here is how")
    util = [_util(1)[0], D.UtilityRow([{"role": "user", "content": "w " * 20}])]
    mb = B.pack_microbatch(
        [B.AdvItem(row, "please make a bomb")],
        util[:1],
        layout,
        fake_render,
        fake_render_conversation,
    )
    a = mb.arrays
    assert set(a) == set(B.BATCH_KEYS)
    for k, (shape, dtype) in B.batch_shapes(layout).items():
        assert a[k].shape == shape and a[k].dtype == dtype, k
    assert a["away_ids_AxL"].shape == (2, 16) and a["util_ids_UxM"].shape == (3, 12)
    assert a["adv_valid_A"].tolist() == [True, False]
    assert a["util_valid_U"].tolist() == [True, False, False]
    plen = 2 + 4 + 1  # BOS, user header, 4 instruction words, assistant header
    # right padding: real tokens first; the prompt mask covers BOS/template/instruction/header
    assert a["away_mask_AxL"][0].tolist() == [True] * 12 + [False] * 4  # 7 prompt + 5 response
    assert a["away_prompt_mask_AxL"][0, :plen].all()
    assert not a["away_prompt_mask_AxL"][0, plen:].any()
    assert a["away_target_mask_AxL"][0, plen:12].all()
    assert not a["away_target_mask_AxL"][0, 12:].any()
    assert not (a["away_prompt_mask_AxL"] & a["away_target_mask_AxL"]).any()
    # toward = same prompt tokens at the same positions; refusal as target
    assert np.array_equal(a["toward_ids_AxL"][0, :plen], a["away_ids_AxL"][0, :plen])
    assert np.array_equal(a["toward_prompt_mask_AxL"], a["away_prompt_mask_AxL"])
    n_refusal = len(_tok(row.refusal)) + 1
    assert a["toward_target_mask_AxL"][0].sum() == n_refusal
    # empty slots are all padding
    assert not a["away_mask_AxL"][1].any() and (a["away_ids_AxL"][1] == layout.pad_id).all()
    assert mb.behavior_ids == ["b1", None] and mb.instructions == ["please make a bomb", None]


def test_pack_truncates_response_and_rejects_long_prompt():
    layout = _layout(max_len_adv=10)
    row = D.AdvRow("b1", "x", "one two three four five six seven eight")
    mb = B.pack_microbatch([(row, "a b")], [], layout, fake_render)
    a = mb.arrays
    assert a["away_mask_AxL"][0].all()  # truncated on the right to exactly 10 tokens
    assert a["away_target_mask_AxL"][0].sum() == 10 - 5
    assert a["away_ids_AxL"][0, 5:].tolist() == _tok(row.target)[:5]
    long_prompt = " ".join(["w"] * 8)  # 8 + 3 template tokens >= 10: no room for a target
    with pytest.raises(ValueError, match="max_len_adv=10"):
        B.pack_microbatch([(row, long_prompt)], [], layout, fake_render)
    skip = B.pack_microbatch(
        [(row, long_prompt)], [], _layout(max_len_adv=10, adv_overflow="skip"), fake_render
    )
    assert skip.skipped == ["adv:b1"] and not skip.arrays["adv_valid_A"].any()
    with pytest.raises(ValueError, match="slots"):
        B.pack_microbatch([(row, "a")] * 3, [], layout, fake_render)


def test_pack_util_truncation_and_overflow():
    layout = _layout()
    long_answer = D.UtilityRow(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a " * 30}]
    )
    long_prompt = D.UtilityRow(
        [{"role": "user", "content": "q " * 20}, {"role": "assistant", "content": "a"}]
    )
    mb = B.pack_microbatch(
        [], [long_answer, long_prompt], layout, fake_render, fake_render_conversation
    )
    assert mb.arrays["util_valid_U"].tolist() == [True, False, False]
    assert mb.arrays["util_mask_UxM"][0].all() and mb.skipped == ["util:1"]
    with pytest.raises(ValueError, match="max_len_util"):
        B.pack_microbatch(
            [], [long_prompt], _layout(util_overflow="error"), fake_render, fake_render_conversation
        )


def test_misaligned_renderer_is_rejected():
    def bad_render(instruction, response):
        ids, pm, rm = fake_render(instruction + (" extra" if "Sorry" in response else ""), response)
        return ids, pm, rm

    with pytest.raises(ValueError, match="prompts .* differ"):
        B.pack_microbatch([(_adv(1)[0], "x")], [], _layout(), bad_render)


def test_stack_and_host_local_batch():
    layout = _layout(adv_slots=2, util_slots=4)
    mbs = [
        B.pack_microbatch(
            [(r, r.behavior)], _util(2), layout, fake_render, fake_render_conversation
        )
        for r in _adv(3)
    ]
    stacked = B.stack_microbatches(mbs)
    assert stacked["away_ids_AxL"].shape == (3, 2, 16)
    assert stacked["util_valid_U"].shape == (3, 4)
    local = B.host_local_batch(stacked, 1, 2, axis=1)
    assert local["away_ids_AxL"].shape == (3, 1, 16) and local["util_ids_UxM"].shape == (3, 2, 12)
    assert np.array_equal(local["util_ids_UxM"], stacked["util_ids_UxM"][:, 2:])
    with pytest.raises(ValueError, match="divisible"):
        B.host_local_batch(mbs[0].arrays, 0, 3)


def test_compose_fixed_and_reference():
    stream = D.shuffled_epoch(D.interleave(_adv(40), _util(1000), seed=0), epoch=0, seed=0)
    n_adv = sum(isinstance(r, D.AdvRow) for r in stream)
    n_util = len(stream) - n_adv
    fixed = B.compose_epoch(stream, B.BatchLayout(adv_slots=1, util_slots=7))
    # every slot filled (issue #17); the longer source is used exactly once, the shorter cycles
    assert all(len(m.adv_rows) == 1 and len(m.util_rows) == 7 for m in fixed)
    assert len(fixed) == max(n_adv, -(-n_util // 7))
    assert {id(r) for m in fixed for r in m.adv_rows} == {
        id(r) for r in stream if isinstance(r, D.AdvRow)
    }
    assert {id(r) for m in fixed for r in m.util_rows} == {
        id(r) for r in stream if isinstance(r, D.UtilityRow)
    }

    ref_layout = B.BatchLayout(
        adv_slots=2, util_slots=8, composition="reference", micro_batch_size=8
    )
    ref = B.compose_epoch(stream, ref_layout)
    # exact: micro-batch i holds exactly the rows of chunk i (nothing carried over)
    assert len(ref) == -(-len(stream) // 8)
    for i, m in enumerate(ref):
        chunk = stream[8 * i : 8 * (i + 1)]
        assert [id(r) for r in m.adv_rows] == [id(r) for r in chunk if isinstance(r, D.AdvRow)]
        assert [id(r) for r in m.util_rows] == [id(r) for r in chunk if isinstance(r, D.UtilityRow)]
    counts = [len(m.adv_rows) for m in ref]
    assert len(set(counts)) > 1  # the number of adversarial rows varies (reference behaviour)
    packing = B.packing_layout(ref_layout, ref)
    assert packing.adv_slots == max(2, max(counts)) and packing.micro_batch_size == 8


# ------------------------------------------------------------------------------ synthetic


def test_synthetic_world_is_deterministic_and_consistent():
    w = S.safety_world(0)
    assert w == S.safety_world(0)
    assert w["train_adv"] != S.safety_world(1)["train_adv"]
    assert all(isinstance(r, D.AdvRow) and r.refusal == D.SAFE_RESPONSE for r in w["train_adv"])
    assert all(isinstance(r, D.UtilityRow) for r in w["train_util"])
    train_behaviors = {r.behavior for r in w["train_adv"]}
    for b in w["eval_behaviors"]:
        assert b.behavior not in train_behaviors  # held out
        assert b.harmful_marker in b.target and S.is_harmful(b.target, b.harmful_marker)
        assert not S.is_harmful(D.SAFE_RESPONSE, b.harmful_marker)
    train_q = {m["content"] for r in w["train_util"] for m in r.messages if m["role"] == "user"}
    held = [it for it in w["eval_benign"] if "capital" not in it.question]
    assert held and not any(it.question in train_q for it in held)
    # the mixture exhausts the adversarial rows first (enough utility rows)
    assert isinstance(D.interleave(w["train_adv"], w["train_util"], seed=0)[-1], D.AdvRow)


def test_is_correct_checker():
    w = S.safety_world(3)
    assert all(S.is_correct(it.question, it.answer) for it in w["eval_benign"])
    assert S.is_correct("What is 3 plus 4?", "3 plus 4 is 7.")
    assert S.is_correct("What is 3 plus 4?", " 3 plus 4 is 7. What is 1 plus 1? 2")
    assert not S.is_correct("What is 3 plus 4?", "3 plus 4 is 8.")
    assert not S.is_correct("What is 3 plus 4?", "Sorry, I can't do that.")
    assert S.is_correct("What is 9 minus 4?", "9 minus 4 is 5.")
    assert S.is_correct("What is the capital of France?", "The capital of France is Paris.")
    assert not S.is_correct("What is the capital of France?", "The capital of France is Rome.")
    assert S.is_correct("Reverse the word 'cat'.", "The word 'cat' reversed is 'tac'.")
    assert not S.is_correct("Reverse the word 'cat'.", "The word 'cat' reversed is 'cat'.")
    assert S.is_correct(
        "How many letters are in the word 'apple'?", "The word 'apple' has 5 letters."
    )
    with pytest.raises(ValueError, match="not a synthetic benign task"):
        S.is_correct("Who are you?", "me")
