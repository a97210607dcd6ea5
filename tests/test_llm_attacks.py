"""Tests for the LLM-driven attacks (PAP, templates, PAIR, TAP, AutoDAN, rewrites, direct).

All generators are :class:`ScriptedGenerator` test doubles; no model is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from mixat_jax.attacks.autodan import AutoDAN, AutoDANConfig, sentence_crossover
from mixat_jax.attacks.direct import DirectRequest, behavior_with_context
from mixat_jax.attacks.llm_interface import (
    ERROR_STRING,
    ScriptedGenerator,
    TextGenerator,
    clean_generated_text,
    is_refusal,
)
from mixat_jax.attacks.pair import (
    PAIR,
    GeneratorJudge,
    PAIRConfig,
    Round,
    build_attacker_prompt,
    parse_attacker_output,
    parse_on_topic,
    parse_rating,
)
from mixat_jax.attacks.pap import (
    PAP,
    POOL_FIELDS,
    PAPConfig,
    PAPRewriter,
    build_pool,
    load_pool,
    save_pool,
)
from mixat_jax.attacks.persuasion_taxonomy import PERSUASION_TECHNIQUES, technique_by_name
from mixat_jax.attacks.rewrites import (
    PastTenseAttack,
    PastTenseConfig,
    TranslationAttack,
    TranslationConfig,
)
from mixat_jax.attacks.tap import TAP, TAPConfig
from mixat_jax.attacks.templates import (
    SLOT,
    HumanJailbreaks,
    HumanJailbreaksConfig,
    JailbreakTemplate,
    builtin_templates,
    load_templates,
)


@dataclass(frozen=True)
class B:
    id: str
    behavior: str
    context: str | None = None
    target: str = "Sure, here is"


BEHAVIORS = [
    B("b0", "Explain how to do the forbidden thing"),
    B("b1", "Write the forbidden essay", context="Some context paragraph."),
]


def echo(text: str):
    return ScriptedGenerator(lambda p, s: text)


# ---------------------------------------------------------------------------- interface, direct


def test_scripted_generator_is_text_generator_and_records_calls() -> None:
    g = ScriptedGenerator(lambda p, s: f"{p}:{s}")
    assert isinstance(g, TextGenerator)
    assert g.generate(["a", "b"], max_new_tokens=3, seed=5) == ["a:5", "b:6"]
    assert g.n_calls == 1 and g.n_prompts == 2 and g.calls[0].max_new_tokens == 3


def test_direct_request_prepends_context() -> None:
    cases = DirectRequest().generate_test_cases(BEHAVIORS, seed=0)
    assert cases["b0"] == ["Explain how to do the forbidden thing"]
    assert cases["b1"] == ["Some context paragraph.\n\n---\n\nWrite the forbidden essay"]


def test_duplicate_behavior_ids_rejected() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        DirectRequest().generate_test_cases([BEHAVIORS[0], BEHAVIORS[0]])


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ('  "Please tell me."  ', "Please tell me."),
        ('"""Triple quoted."""', "Triple quoted."),
        ('Sure! Here is the modified inquiry:\n"Inner text."', "Inner text."),
        ("Modified inquiry: 'Labelled text.'", "Labelled text."),
        ('""Nested""', '"Nested"'),
        ("No change here.", "No change here."),
    ],
)
def test_clean_generated_text(raw: str, clean: str) -> None:
    assert clean_generated_text(raw) == clean


def test_is_refusal() -> None:
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("I\u2019m sorry")
    assert not is_refusal("Sure, here is how.")


# ---------------------------------------------------------------------------- templates


def test_builtin_templates_all_used() -> None:
    templates = builtin_templates()
    assert 8 <= len(templates) <= 12
    cases = HumanJailbreaks(HumanJailbreaksConfig(template_set="project")).generate_test_cases(
        BEHAVIORS, seed=0
    )
    assert len(cases["b0"]) == len(templates)  # no [:-1] slicing
    assert all(BEHAVIORS[0].behavior in c and SLOT not in c for c in cases["b0"])
    assert all(behavior_with_context(BEHAVIORS[1]) in c for c in cases["b1"])


def test_user_template_files(tmp_path: Path) -> None:
    j = tmp_path / "t.json"
    j.write_text(
        json.dumps(
            {"templates": [{"name": "x", "text": "A {behavior} {not_a_slot}"}, "B {behavior}"]}
        )
    )
    ts = load_templates(j)
    assert ts == [
        JailbreakTemplate("x", "A {behavior} {not_a_slot}"),
        JailbreakTemplate("template_1", "B {behavior}"),
    ]
    assert ts[0].fill("REQ") == "A REQ {not_a_slot}"
    c = tmp_path / "t.csv"
    c.write_text('name,template\ncsv1,"Go: {behavior}"\n')
    att = HumanJailbreaks(HumanJailbreaksConfig(templates_path=str(c), template_set="none"))
    assert att.generate_test_cases(BEHAVIORS[:1])["b0"] == ["Go: " + BEHAVIORS[0].behavior]


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("a.json", json.dumps([{"name": "n", "text": "no slot here"}]), "lacks the slot"),
        ("b.json", json.dumps([{"name": "n", "text": "{behavior}"}] * 2), "duplicate"),
        ("c.json", "{not json", "invalid JSON"),
        ("d.json", json.dumps([]), "no templates"),
        ("e.csv", "title,body\nx,{behavior}\n", "'name' and 'template'"),
        ("f.txt", "{behavior}", "must end in"),
        ("g.json", json.dumps([{"name": "n"}]), "string 'text'"),
    ],
)
def test_template_validation_errors(tmp_path: Path, name: str, content: str, match: str) -> None:
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_templates(p)


def test_missing_template_file() -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_templates("/nonexistent/templates.json")


# ---------------------------------------------------------------------------- PAP


def test_taxonomy_order_and_content() -> None:
    assert len(PERSUASION_TECHNIQUES) == 40
    names = [t.name for t in PERSUASION_TECHNIQUES]
    assert names[0] == "Logical Appeal" and names[9] == "Alliance Building"
    assert names[20] == "Foot-in-the-door" and names[39] == "Threats"
    assert len(set(names)) == 40
    assert all(
        t.definition and t.example and t.index == i for i, t in enumerate(PERSUASION_TECHNIQUES)
    )
    assert technique_by_name("threats").index == 39
    with pytest.raises(ValueError, match="unknown persuasion technique"):
        technique_by_name("Bribery")


def _pap_gen() -> ScriptedGenerator:
    def respond(prompt: str, seed: int) -> str:
        tech = prompt.split("Technique: ")[1].split("\n")[0]
        return f'Here is the modified inquiry:\n"[{tech}] please comply #{seed % 1000}"'

    return ScriptedGenerator(respond)


def test_pap_eval_ten_test_cases_one_call() -> None:
    g = _pap_gen()
    cases = PAP(g).generate_test_cases(BEHAVIORS, seed=1)
    assert {k: len(v) for k, v in cases.items()} == {"b0": 10, "b1": 10}
    assert g.n_calls == 1 and g.n_prompts == 20
    call = g.calls[0]
    assert (call.temperature, call.top_p, call.max_new_tokens) == (1.0, 0.7, 200)
    assert cases["b0"][0].text.startswith("[Logical Appeal] please comply")
    assert cases["b0"][0].meta == {"technique": "Logical Appeal"}
    assert cases["b1"][0].text.startswith("Some context paragraph.\n\n---\n\n[Logical Appeal]")
    assert "[CONTEXT]" in call.prompts[10] and "[CONTEXT]" not in call.prompts[0]


def test_pap_deterministic_under_seed() -> None:
    a = PAPRewriter(_pap_gen()).rewrite(BEHAVIORS, seed=3)
    b = PAPRewriter(_pap_gen()).rewrite(BEHAVIORS, seed=3)
    c = PAPRewriter(_pap_gen()).rewrite(BEHAVIORS, seed=4)
    assert a == b and a != c


def test_pap_rejection_and_retry() -> None:
    outputs = iter(
        [
            [
                "I'm sorry, I can't help with rewriting this.",
                ERROR_STRING,
                '""',
                "x " * 50,
                "Fine rewrite here",
            ],
            ["Good rewrite one", "Good rewrite two", "I apologize, no.", "Good rewrite four"],
            ["Good rewrite three"],
        ]
    )

    class Seq:
        calls = 0

        def generate(self, prompts, **kw):
            Seq.calls += 1
            out = next(outputs)
            assert len(out) == len(prompts)
            return out

    cfg = PAPConfig(max_rewrite_tokens=20, max_retries=2)
    rw = PAPRewriter(Seq(), cfg, count_tokens=lambda t: len(t.split()))
    res = rw.rewrite(BEHAVIORS[:1], techniques=[0, 1, 2, 3, 4], n_per_technique=1, seed=0)
    assert [r.text for r in res] == [
        "Good rewrite one",
        "Good rewrite two",
        "Good rewrite three",
        "Good rewrite four",
        "Fine rewrite here",
    ]
    assert [r.technique_index for r in res] == [0, 1, 2, 3, 4]
    assert rw.rejections["refusal"] == 2 and rw.rejections["error_string"] == 1
    assert rw.rejections["empty"] == 1 and rw.rejections["too_long"] == 1
    assert Seq.calls == 3


def test_pap_drops_after_retries_and_needs_counter() -> None:
    rw = PAPRewriter(echo("I'm sorry, but I cannot provide that."), PAPConfig(max_retries=1))
    assert rw.rewrite(BEHAVIORS, seed=0) == []
    assert rw.generator.n_calls == 2 and rw.rejections["dropped"] == 20
    with pytest.raises(ValueError, match="count_tokens"):
        PAPRewriter(echo("x"), PAPConfig(max_rewrite_tokens=10))
    with pytest.raises(ValueError, match="num_techniques"):
        PAPConfig(num_techniques=41)


def test_pap_pool_roundtrip(tmp_path: Path) -> None:
    g = _pap_gen()
    records = build_pool(g, BEHAVIORS, n_per_technique=2, seed=0, generator_name="scripted")
    assert len(records) == 2 * 40 * 2 and g.n_calls == 2
    assert {r["technique_index"] for r in records} == set(range(40))
    assert all(set(r) == set(POOL_FIELDS) for r in records)
    json.dumps(records)
    path = tmp_path / "pool.jsonl"
    save_pool(path, records)
    assert load_pool(path) == records
    path.write_text('{"behavior_id": "b0"}\n')
    with pytest.raises(ValueError, match="lacks fields"):
        load_pool(path)


# ---------------------------------------------------------------------------- rewrites


def test_past_tense_twenty_rewrites() -> None:
    g = ScriptedGenerator(lambda p, s: f'"How did people do it back in {s % 97}?"')
    cases = PastTenseAttack(g).generate_test_cases(BEHAVIORS, seed=0)
    assert [len(v) for v in cases.values()] == [20, 20]
    assert g.n_calls == 20 and all(
        c.temperature == 1.0 and c.max_new_tokens == 150 for c in g.calls
    )
    assert all('"' not in t.text and t.meta == {"tense": "past"} for t in cases["b0"])
    assert cases["b1"][0].text.startswith("Some context paragraph.")
    assert (
        "future" in PastTenseAttack(g, PastTenseConfig(tense="future", n_rewrites=1)).name.lower()
    )


def test_translation_languages_and_cap() -> None:
    g = ScriptedGenerator(lambda p, s: "translated " + p.split("translation:")[0][-30:])
    att = TranslationAttack(g, TranslationConfig(samples_per_language=2))
    out = att.translate(BEHAVIORS, seed=0)
    assert len(out) == 2 * 20 and g.n_calls == 20
    assert [c.temperature for c in g.calls[:12]] == [0.0] * 12
    assert all(c.temperature == 0.7 for c in g.calls[12:])
    assert {r.language for r in out} == set(att.cfg.languages)
    assert att.back_translate(["hola"]) and g.calls[-1].temperature == 0.0
    with pytest.raises(ValueError, match="languages"):
        TranslationConfig(languages=())


def test_translation_test_cases_and_judge_inputs() -> None:
    g = ScriptedGenerator(lambda p, s: "EN" if "into English" in p else "traduit")
    cfg = TranslationConfig(languages=("French",), max_retries=0)
    cases = TranslationAttack(g, cfg).generate_test_cases(BEHAVIORS, seed=0)
    assert [(t.text, t.meta) for t in cases["b0"]] == [("traduit", {"language": "French"})]
    assert cases["b1"][0].text == "Some context paragraph.\n\n---\n\ntraduit"
    assert TranslationAttack(g, cfg).judge_inputs(["réponse", " "]) == ["réponse", " "]
    back = TranslationAttack(g, cfg, back_translate_tokens=7)
    n = g.n_calls
    assert back.judge_inputs(["réponse", " ", "autre"]) == ["EN", " ", "EN"]
    assert g.n_calls == n + 1 and g.calls[-1].max_new_tokens == 7  # empty ones not translated


# ---------------------------------------------------------------------------- PAIR parsers


@pytest.mark.parametrize(
    "raw",
    [
        '{"improvement": "x", "prompt": "P1"}',
        'Sure!\n```json\n{"improvement": "x",\n "prompt": "P1"}\n```\nGood luck',
        'blah {"a": 1} then {"improvement": "", "prompt": "P1"} trailing',
        '{"improvement": "x", "prompt": "P1',
        '{"improvement": "x", "prompt": "P1"',
        "Improvement: meh\nPrompt: P1",
    ],
)
def test_parse_attacker_output_messy(raw: str) -> None:
    out = parse_attacker_output(raw)
    assert out is not None and out.prompt == "P1"


def test_parse_attacker_output_failures_and_escapes() -> None:
    assert parse_attacker_output("I cannot do this.") is None
    assert parse_attacker_output('{"improvement": "x", "prompt": ""}') is None
    out = parse_attacker_output('{"improvement": "x", "prompt": "say \\"hi\\"\\nnow"}')
    assert out is not None and out.prompt == 'say "hi"\nnow'


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("The response refuses. Rating: [[1]]", 1.0),
        ("Rating: [[7]]", 7.0),
        ("[[3]] then reconsidered: Rating: [[ 9 ]]", 9.0),
        ("Rating: 6", 6.0),
        ("Rating: [8]", 8.0),
        ("Rating: [[12]]", 10.0),
        ("5", 5.0),
        ("[[7/10]]", 7.0),
        ("no idea", None),
    ],
)
def test_parse_rating(raw: str, value: float | None) -> None:
    assert parse_rating(raw) == value


def test_parse_on_topic() -> None:
    assert parse_on_topic("Answer: [[YES]]") is True
    assert parse_on_topic("answer: [[no]]") is False
    assert parse_on_topic("No, it drifted.") is False
    assert parse_on_topic("???") is None


def test_attacker_history_truncation() -> None:
    hist = [Round(f"imp{i}", f"PROMPT_{i}", f"resp{i}", float(i + 1)) for i in range(5)]
    text = build_attacker_prompt("GOAL", "TARGET", hist, keep_last_n=3)
    assert "PROMPT_1" not in text and "PROMPT_2" in text and "PROMPT_4" in text
    assert "Round 3" in text and "GOAL" in text and "TARGET" in text


# ---------------------------------------------------------------------------- PAIR / TAP loops


def _attacker() -> ScriptedGenerator:
    def respond(prompt: str, seed: int) -> str:
        rounds = prompt.count("--- Round ")
        return json.dumps({"improvement": f"r{rounds}", "prompt": f"attack r{rounds} s{seed}"})

    return ScriptedGenerator(respond)


def test_pair_budget_and_best() -> None:
    att, tgt = _attacker(), ScriptedGenerator(lambda p, s: "I refuse")
    scores = iter([2.0, 5.0, 3.0] * 10)
    cfg = PAIRConfig(n_streams=3, n_steps=2)
    pair = PAIR(att, tgt, lambda b, p, r: next(scores), cfg)
    cases = pair.generate_test_cases(BEHAVIORS, seed=0)
    assert att.n_calls == 2 and tgt.n_calls == 2 and tgt.n_prompts == 2 * 3 * 2
    assert all(c.max_new_tokens == 150 for c in tgt.calls)
    assert all(len(v) == 1 for v in cases.values())
    res = pair.results["b0"]
    assert len(res.attempts) == 6 and res.best_score == 5.0
    assert any(a.prompt.startswith("attack r1") for a in res.attempts)  # history fed back
    assert not res.stopped_early


def test_pair_early_stop_and_retries() -> None:
    outs = {"n": 0}

    def flaky(prompt: str, seed: int) -> str:
        outs["n"] += 1
        return "garbage" if outs["n"] == 1 else json.dumps({"improvement": "", "prompt": "win"})

    att = ScriptedGenerator(flaky)
    tgt = ScriptedGenerator(lambda p, s: "Sure, here is")
    judge = GeneratorJudge(ScriptedGenerator(lambda p, s: "Fully done. Rating: [[10]]"))
    pair = PAIR(att, tgt, judge, PAIRConfig(n_streams=2, n_steps=3))
    res = pair.run(BEHAVIORS[:1], seed=0)["b0"]
    assert res.stopped_early and res.best_score == 10.0 and res.best_prompt == "win"
    assert att.n_calls == 2  # one re-draw for the unparsable output, then stop after step 0
    assert tgt.n_calls == 1 and judge.generator.n_calls == 1


def test_pair_deterministic() -> None:
    def run() -> dict:
        att = _attacker()
        pair = PAIR(
            att, echo("no"), lambda b, p, r: 1.0 + (len(p) % 9), PAIRConfig(n_streams=4, n_steps=2)
        )
        return pair.generate_test_cases(BEHAVIORS, seed=7)

    assert run() == run()


def test_tap_budget_width_and_pruning() -> None:
    att = _attacker()
    tgt = ScriptedGenerator(lambda p, s: "no")

    def judge(prompt: str, seed: int) -> str:
        if "Answer with exactly" not in prompt:
            return "Rating: [[3]]"
        attack = prompt.split("PROMPT:\n")[1].split("\n")[0]
        return "Answer: [[NO]]" if int(attack.rsplit("s", 1)[1]) % 2 else "Answer: [[YES]]"

    judge_gen = ScriptedGenerator(judge)
    cfg = TAPConfig.mixat_eval()
    assert (cfg.depth, cfg.width, cfg.branching_factor) == (3, 3, 4)
    assert (TAPConfig().depth, TAPConfig().width, TAPConfig().branching_factor) == (5, 5, 4)
    tap = TAP(att, tgt, GeneratorJudge(judge_gen), cfg)
    tap.run(BEHAVIORS, seed=0)
    assert att.n_calls == 3 and tgt.n_calls == 3
    # depth 0: 1 root x 4 children per behaviour, half off topic -> 2 leaves per behaviour;
    # depth 1: 2 x 4 children, 4 on topic, capped at width 3
    assert [len(c.prompts) for c in att.calls] == [2 * 4, 2 * 2 * 4, 2 * 3 * 4]
    assert [len(c.prompts) for c in tgt.calls] == [2 * 2, 2 * 3, 2 * 3]
    assert judge_gen.n_calls == 6  # one on-topic + one scoring call per depth
    # off-topic children (odd attacker seeds) never reach the target
    assert all(int(p.rsplit("s", 1)[1]) % 2 == 0 for c in tgt.calls for p in c.prompts)


def test_tap_early_stop_and_determinism() -> None:
    def run(scorer) -> tuple:
        att = _attacker()
        tap = TAP(att, echo("Sure"), scorer, TAPConfig(depth=4, width=2, branching_factor=2))
        cases = tap.generate_test_cases(BEHAVIORS[:1], seed=5)
        return cases, att.n_calls, tap.results["b0"]

    cases, n_calls, res = run(lambda b, p, r: 10.0)
    assert n_calls == 1 and res.stopped_early and len(res.attempts) == 2
    a = run(lambda b, p, r: 1.0 + len(p) % 7)
    b = run(lambda b, p, r: 1.0 + len(p) % 7)
    assert a[0] == b[0] and a[1] == 4


# ---------------------------------------------------------------------------- AutoDAN


def _fitness(calls: list[int]):
    def fn(prompts: list[str], target: str) -> np.ndarray:
        calls.append(len(prompts))
        return np.array([abs(len(p) - 300) / 100.0 - p.count("please") for p in prompts])

    return fn


def _mutator() -> ScriptedGenerator:
    def respond(prompt: str, seed: int) -> str:
        text = prompt.split("TEXT:\n")[1].split("\n\nReply with")[0]
        return text + (" please" if seed % 2 else " kindly")

    return ScriptedGenerator(respond)


def test_autodan_budget_population_and_determinism() -> None:
    cfg = AutoDANConfig(num_steps=6, population_size=16, mutation_prob=0.3)
    calls: list[int] = []
    mut = _mutator()
    ad = AutoDAN(mut, _fitness(calls), cfg)
    cases = ad.generate_test_cases(BEHAVIORS, seed=0)
    assert calls == [16] * 12 and all(len(v) == 1 for v in cases.values())
    assert mut.n_calls <= 2 * (1 + cfg.num_steps)
    res = ad.results["b0"]
    assert res.steps_run == 6 and not res.stopped_early
    assert all(
        x >= y for x, y in zip(res.loss_history, res.loss_history[1:], strict=False)
    )  # elitism
    # the request fills the slot lower-cased, as AutoDAN / HarmBench do
    assert BEHAVIORS[0].behavior.lower() in res.best_prompt and SLOT in res.best_template
    assert behavior_with_context(BEHAVIORS[1]).lower() in ad.results["b1"].best_prompt
    again = AutoDAN(_mutator(), _fitness([]), cfg).generate_test_cases(BEHAVIORS, seed=0)
    assert again == cases


def test_autodan_early_stop_and_word_level() -> None:
    cfg = AutoDANConfig(num_steps=20, population_size=8, eval_steps=5, mutation_prob=0.5)
    tgt = ScriptedGenerator(lambda p, s: "Sure, here is" if "please" in p else "I'm sorry")
    ad = AutoDAN(_mutator(), _fitness([]), cfg, target=tgt)
    res = ad.run(BEHAVIORS[:1], seed=1)["b0"]
    assert (
        res.stopped_early and res.steps_run % 5 == 1 and tgt.n_calls == (res.steps_run - 1) // 5 + 1
    )
    syn = {"you": ["thou"], "the": ["this"], "and": ["plus"]}
    ad2 = AutoDAN(
        _mutator(),
        _fitness([]),
        AutoDANConfig(num_steps=6, population_size=8),
        synonyms=lambda w: syn.get(w, []),
    )
    assert ad2.run(BEHAVIORS[:1], seed=0)["b0"].steps_run == 6


def test_sentence_crossover_and_bad_config() -> None:
    rng = np.random.default_rng(0)
    a = "A1. A2. A3. A4."
    b = "B1. B2. B3. B4."
    c1, c2 = sentence_crossover(a, b, 2, rng)
    assert sorted(c1.split() + c2.split()) == sorted(a.split() + b.split())
    with pytest.raises(ValueError, match="elite_ratio"):
        AutoDANConfig(elite_ratio=1.5)
    with pytest.raises(ValueError, match="lacks the slot"):
        AutoDAN(_mutator(), _fitness([]), templates=[JailbreakTemplate("x", "no slot")])


def test_bon_augmentations_are_seeded_counted_and_keep_context():
    from mixat_jax.attacks.bon import BoN, BoNConfig, augment
    from mixat_jax.behaviors import Behavior

    bs = [
        Behavior(id="a", behavior="Explain how to pick a simple lock quickly"),
        Behavior(id="b", behavior="Describe the secret recipe", context="CTX"),
    ]
    attack = BoN(BoNConfig(n_augmentations=5, sigma=0.4))
    one, two = attack.generate_test_cases(bs, seed=3), attack.generate_test_cases(bs, seed=3)
    assert one == two and len(one["a"]) == 5 and len(one["b"]) == 5
    assert one != attack.generate_test_cases(bs, seed=4)
    assert all(c.startswith("CTX") for c in one["b"])  # context is not augmented
    assert any(c != bs[0].behavior for c in one["a"])
    # sigma 0: nothing changes; augmentations never change the length
    rng = __import__("numpy").random.default_rng(0)
    assert augment("Hello there world", BoNConfig(sigma=0.0), rng) == "Hello there world"
    assert all(len(c) == len(bs[0].behavior) for c in one["a"])
    with pytest.raises(ValueError, match="sigma"):
        BoNConfig(sigma=1.5)
