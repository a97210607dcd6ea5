"""The resumable stages of an evaluation run (`Evaluation`, spec mixat.md §8.1 pipeline, §8.2):
test cases per attack, completions from the target, judgements (stages 2-4, cached under the
work directory), the utility checks (XSTest in three classes and HarmLess with the configured
utility judge, #13; multiple choice), then the outputs (`outputs.py`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO

from mixat_jax.attacks.llm_interface import TestCase, call_seed
from mixat_jax.behaviors import Behavior, XSTestPrompts, load_xstest
from mixat_jax.evaluation.cache import (
    JsonlStore,
    complete_groups,
    new_group_token,
    text_hash,
    write_json_atomic,
    write_jsonl_atomic,
)
from mixat_jax.evaluation.fingerprints import (
    attack_fingerprint,
    generation_fingerprint,
    judge_fingerprint,
    utility_judge_fingerprint,
    xstest_fingerprint,
)
from mixat_jax.evaluation.harness_stage import run_harness_stage
from mixat_jax.evaluation.models import ModelPool, build_judge, build_utility_judge
from mixat_jax.evaluation.outputs import final_records, run_manifest, write_outputs
from mixat_jax.evaluation.progress import ENV_INTERRUPT, InterruptHook, Progress
from mixat_jax.evaluation.run_config import Resolved, lm_eval_tasks, utility_judge_name
from mixat_jax.evaluation.suite import AttackPlan, as_test_cases, build_attack
from mixat_jax.evaluation.utility import (
    HARMLESS_BUILTIN,
    XSTEST_BUILTIN,
    load_harmless,
    load_multiple_choice,
    score_harmless,
    score_multiple_choice,
    score_xstest_classes,
    utility_data_path,
)

RecordKey = tuple[str, str, int]  # (attack, behaviour id, test-case index)


class Evaluation:
    """Runs the stages of a resolved configuration in its work directory."""

    def __init__(
        self,
        res: Resolved,
        *,
        target: Any | None = None,
        interrupt: str | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.res, self.cfg, self.out = res, res.cfg, res.workdir
        self.pool = ModelPool(res, target)
        self.stream = stream or sys.stderr
        self.interrupt = InterruptHook(interrupt or os.environ.get(ENV_INTERRUPT))
        self.bfp = res.behavior_fps
        self.by_id = {b.id: b for b in res.behaviors}
        self.cases: dict[str, dict[str, list[dict[str, Any]]]] = {}
        self.gens: dict[RecordKey, dict[str, Any]] = {}
        self.judged: dict[RecordKey, dict[str, Any]] = {}
        self.stats: dict[str, int] = {"generated": 0, "judged": 0, "attack_calls": 0}
        self._attacks: dict[str, Any] = {}

    # -- helpers
    def log(self, msg: str) -> None:
        print(f"[evaluate] {msg}", file=self.stream, flush=True)

    def _attack(self, plan: AttackPlan) -> Any:
        if plan.name not in self._attacks:
            self._attacks[plan.name] = build_attack(plan, self.pool)
        return self._attacks[plan.name]

    # -- stage 2: test cases
    def test_cases(self) -> None:
        store = JsonlStore(self.out / "test_cases.jsonl")
        records = store.read()
        chunk_default = int(self.cfg.behavior_chunk)
        for plan in self.res.plans:
            afp = attack_fingerprint(self.res, plan)

            def accept(r: dict[str, Any], name: str = plan.name, afp: str = afp) -> bool:
                return (
                    r.get("attack") == name
                    and r.get("attack_fp") == afp
                    and r.get("behavior_fp") == self.bfp.get(str(r.get("behavior_id")))
                )

            groups = complete_groups(records, accept)
            done = {bid: recs for (_, bid), recs in groups.items() if bid in self.by_id}
            self.cases[plan.name] = done
            todo = [b for b in self.res.behaviors if b.id not in done]
            n_all = len(self.res.behaviors)
            if not todo:
                self.log(f"test cases {plan.name}: all {n_all} behaviours cached")
                continue
            progress = Progress(
                "test cases", plan.name, "behaviour", n_all, self.stream, done0=len(done)
            )
            if done:
                self.log(f"test cases {plan.name}: {len(done)}/{n_all} behaviours cached")
            attack = self._attack(plan)
            size = plan.chunk_size or chunk_default
            n_samples = int(plan.settings["n_samples"])
            for start in range(0, len(todo), size):
                part = todo[start : start + size]
                seed = call_seed(int(self.cfg.seed), plan.name, part[0].id)
                result = as_test_cases(attack.generate_test_cases(part, seed=seed))
                self.stats["attack_calls"] += 1
                new: list[dict[str, Any]] = []
                for b in part:
                    cases = [tc for tc in result.get(b.id, []) for _ in range(n_samples)]
                    new += self._case_records(plan.name, afp, b, cases, n_samples)
                store.append(new)
                for b in part:
                    self.cases[plan.name][b.id] = [
                        r for r in new if r["behavior_id"] == b.id and r["index"] >= 0
                    ]
                progress.update(len(self.cases[plan.name]))
                self.interrupt.tick("test_cases", len(part))

    def _case_records(
        self, attack: str, afp: str, b: Behavior, cases: list[TestCase], n_samples: int
    ) -> list[dict[str, Any]]:
        group = new_group_token()
        base = {
            "attack": attack,
            "behavior_id": b.id,
            "n_cases": len(cases),
            "group": group,
            "attack_fp": afp,
            "behavior_fp": self.bfp[b.id],
        }
        if not cases:
            return [{**base, "index": -1, "test_case": None}]
        out = []
        for i, tc in enumerate(cases):
            rec = {**base, "index": i, "test_case": tc.text, "meta": tc.meta}
            if n_samples > 1:
                rec["sample"] = i % n_samples
            if tc.completion is not None:
                rec["completion"] = tc.completion
            out.append(rec)
        return out

    # -- stage 3: completions
    def completions(self) -> None:
        store = JsonlStore(self.out / "cache" / "generations.jsonl")
        records = store.read()
        for plan in self.res.plans:
            gfp = generation_fingerprint(self.res, plan)
            cached = {
                (r["attack"], r["behavior_id"], int(r["index"])): r
                for r in records
                if r.get("attack") == plan.name and r.get("gen_fp") == gfp
            }
            pending: list[dict[str, Any]] = []
            for b in self.res.behaviors:
                for rec in self.cases[plan.name].get(b.id, []):
                    key = (plan.name, b.id, int(rec["index"]))
                    hit = cached.get(key)
                    if hit is not None and hit.get("test_case_hash") == _case_hash(rec):
                        self.gens[key] = hit
                    else:
                        pending.append(rec)
            total = sum(len(v) for v in self.cases[plan.name].values())
            if not pending:
                if total:
                    self.log(f"completions {plan.name}: all {total} cached")
                continue
            self._generate(plan, gfp, pending, total, store)

    def _generate(
        self,
        plan: AttackPlan,
        gfp: str,
        pending: list[dict[str, Any]],
        total: int,
        store: JsonlStore,
    ) -> None:
        c = self.cfg
        done = total - len(pending)
        progress = Progress("completions", plan.name, "test case", total, self.stream, done)
        pending = sorted(pending, key=lambda r: len(r["test_case"]))
        step = int(c.gen_batch_size)
        temperature = float(plan.settings["gen_temperature"])
        top_p = float(plan.settings["gen_top_p"])
        for start in range(0, len(pending), step):
            batch = pending[start : start + step]
            if plan.white_box_completions:
                texts = [str(r.get("completion", "")) for r in batch]
            else:
                # One seed per record, from its identity (issue #17): a resumed or re-batched
                # run draws the same samples (greedy decoding ignores seeds).
                sampling = {"temperature": temperature, "top_p": top_p}
                if temperature > 0:
                    sampling["seeds"] = [record_seed(int(c.seed), plan.name, r) for r in batch]
                texts = self.pool.target.generate(
                    [r["test_case"] for r in batch],
                    max_new_tokens=int(c.max_new_tokens),
                    **sampling,
                )
                self.stats["generated"] += len(batch)
            judge_in = self._attack(plan).judge_inputs(texts) if plan.spec.judge_inputs else texts
            new = []
            for r, text, j_in in zip(batch, texts, judge_in, strict=True):
                rec = {
                    "attack": plan.name,
                    "behavior_id": r["behavior_id"],
                    "index": int(r["index"]),
                    "test_case_hash": _case_hash(r),
                    "completion": text,
                    "gen_fp": gfp,
                }
                if j_in != text:
                    rec["judge_input"] = j_in
                new.append(rec)
                self.gens[(plan.name, r["behavior_id"], int(r["index"]))] = rec
            store.append(new)
            done += len(batch)
            progress.update(done)
            self.interrupt.tick("completions", len(batch))
        empty = sum(
            1 for k, g in self.gens.items() if k[0] == plan.name and not g["completion"].strip()
        )
        if empty:
            self.log(
                f"warning: {plan.name}: {empty} of {total} completions are empty (judged safe)"
            )

    # -- stage 4: judging
    def judge(self) -> None:
        store = JsonlStore(self.out / "cache" / "judgements.jsonl")
        name = self.res.judge_name
        jfp = judge_fingerprint(self.res)
        cached = store.latest(
            key=lambda r: (r["attack"], r["behavior_id"], int(r["index"])),
            accept=lambda r: r.get("judge") == name and r.get("judge_fp") == jfp,
        )
        pending = []
        for key, g in self.gens.items():
            j_in = g.get("judge_input", g["completion"])
            hit = cached.get(key)
            if (
                hit is not None
                and hit.get("input_hash") == text_hash(j_in)
                and hit.get("behavior_fp") == self.bfp[key[1]]
            ):
                self.judged[key] = hit
            else:
                pending.append((key, j_in))
        if not pending:
            if self.gens:
                self.log(f"judge {name}: all {len(self.gens)} judgements cached")
            return
        judge = build_judge(self.res, self.pool)
        done = len(self.gens) - len(pending)
        progress = Progress("judge", name, "completion", len(self.gens), self.stream, done)
        step = max(1, int(self.cfg.judge_batch_size)) * 4
        for start in range(0, len(pending), step):
            batch = pending[start : start + step]
            out = judge.judge([self.by_id[k[1]] for k, _ in batch], [t for _, t in batch])
            new = []
            for (key, j_in), jd in zip(batch, out, strict=True):
                rec = {
                    "attack": key[0],
                    "behavior_id": key[1],
                    "index": key[2],
                    "judge": name,
                    "judge_fp": jfp,
                    "label": int(jd.label),
                    "input_hash": text_hash(j_in),
                    "behavior_fp": self.bfp[key[1]],
                    "meta": _jsonable_meta(jd.meta),
                }
                new.append(rec)
                self.judged[key] = rec
            store.append(new)
            self.stats["judged"] += len(batch)
            done += len(batch)
            progress.update(done)
            self.interrupt.tick("judgements", len(batch))

    # -- utility
    def utility(self) -> dict[str, Any]:
        """XSTest classes, HarmLess answered rate, lm-evaluation-harness tasks, multiple-choice
        accuracy (those configured)."""
        out: dict[str, Any] = {}
        if self.cfg.xstest:
            out["xstest"] = self._xstest()
        if self.cfg.harmless:
            out["harmless"] = self._harmless()
        if lm_eval_tasks(self.cfg):
            out["lm_eval"] = run_harness_stage(self.res, self.pool, self.log)
        if self.cfg.mc:
            c = self.cfg
            items = load_multiple_choice(
                c.mc,
                split=c.mc_split,
                dataset_config=c.mc_config or None,
                limit=int(c.mc_limit) or None,
            )
            self.log(f"multiple choice: scoring {len(items)} questions from {c.mc}")
            res = score_multiple_choice(self.pool.target.loglik, items)
            out["mc"] = {"source": c.mc, **res}
        return out

    def _xstest(self) -> dict[str, Any]:
        c = self.cfg
        prompts = load_xstest(utility_data_path(c.xstest, XSTEST_BUILTIN))
        if int(c.xstest_limit):
            n = int(c.xstest_limit)
            prompts = XSTestPrompts(safe=prompts.safe[:n], unsafe=prompts.unsafe[:n])
        items = [(p.id, p.prompt) for p in list(prompts.safe) + list(prompts.unsafe)]
        tokens = int(c.xstest_max_new_tokens) or int(c.max_new_tokens)
        completions = self._utility_completions("xstest", items, tokens)
        labels = self._utility_labels("xstest", items, completions)
        uj = c.utility_judge
        name = utility_judge_name(c, "xstest")
        return score_xstest_classes(
            prompts, {i: labels[i]["label"] for i, _ in items}, judge=name, judge_kind=uj.kind
        )

    def _harmless(self) -> dict[str, Any]:
        c = self.cfg
        prompts = load_harmless(utility_data_path(c.harmless, HARMLESS_BUILTIN))
        items = [(f"harmless_{i}", p) for i, p in enumerate(prompts)]
        tokens = int(c.harmless_max_new_tokens) or int(c.max_new_tokens)
        completions = self._utility_completions("harmless", items, tokens)
        labels = self._utility_labels("harmless", items, completions)
        return score_harmless(
            prompts,
            [labels[i]["label"] for i, _ in items],
            judge=utility_judge_name(c, "harmless"),
            judge_kind=c.utility_judge.kind,
        )

    def _utility_completions(
        self, task: str, items: list[tuple[str, str]], tokens: int
    ) -> dict[str, str]:
        """Greedy completions of (id, prompt) items, cached in OUT/cache/<task>.jsonl."""
        gfp = xstest_fingerprint(self.res, tokens)
        store = JsonlStore(self.out / "cache" / f"{task}.jsonl")
        cached = store.latest(key=lambda r: (r["id"],), accept=lambda r: r.get("gen_fp") == gfp)
        completions = {
            i: cached[(i,)]["completion"]
            for i, prompt in items
            if (i,) in cached and cached[(i,)].get("prompt_hash") == text_hash(prompt)
        }
        todo = [(i, p) for i, p in items if i not in completions]
        progress = Progress(
            task, "completions", "prompt", len(items), self.stream, len(completions)
        )
        step = int(self.cfg.gen_batch_size)
        for start in range(0, len(todo), step):
            batch = todo[start : start + step]
            texts = self.pool.target.generate(
                [p for _, p in batch], max_new_tokens=tokens, temperature=0.0
            )
            self.stats["generated"] += len(batch)
            store.append(
                [
                    {"id": i, "prompt_hash": text_hash(p), "completion": t, "gen_fp": gfp}
                    for (i, p), t in zip(batch, texts, strict=True)
                ]
            )
            completions.update({i: t for (i, _), t in zip(batch, texts, strict=True)})
            progress.update(len(completions))
            self.interrupt.tick(task, len(batch))
        return completions

    def _utility_labels(
        self, task: str, items: list[tuple[str, str]], completions: Mapping[str, str]
    ) -> dict[str, dict[str, Any]]:
        """The utility judge's label and raw answer per id, cached in
        OUT/cache/<task>_judgements.jsonl (keyed on the judge's fingerprint and the pair's
        hash); also writes OUT/<task>.jsonl (prompt, completion, label, raw, judge)."""
        name = utility_judge_name(self.cfg, task)
        jfp = utility_judge_fingerprint(self.res, task)
        store = JsonlStore(self.out / "cache" / f"{task}_judgements.jsonl")
        cached = store.latest(key=lambda r: (r["id"],), accept=lambda r: r.get("judge_fp") == jfp)

        def pair_hash(i: str, prompt: str) -> str:
            return text_hash(prompt + "\x00" + completions[i])

        labels = {
            i: cached[(i,)]
            for i, p in items
            if (i,) in cached and cached[(i,)].get("input_hash") == pair_hash(i, p)
        }
        todo = [(i, p) for i, p in items if i not in labels]
        if todo:
            judge = build_utility_judge(self.res, self.pool, task)
            progress = Progress(task, name, "completion", len(items), self.stream, len(labels))
            step = int(self.cfg.utility_judge.batch_size) * 4
            for start in range(0, len(todo), step):
                batch = todo[start : start + step]
                out = judge.classify([p for _, p in batch], [completions[i] for i, _ in batch])
                new = [
                    {
                        "id": i,
                        "judge": name,
                        "judge_fp": jfp,
                        "input_hash": pair_hash(i, p),
                        "label": j.label,
                        "raw": j.raw,
                    }
                    for (i, p), j in zip(batch, out, strict=True)
                ]
                store.append(new)
                labels.update({r["id"]: r for r in new})
                self.stats["judged"] += len(batch)
                progress.update(len(labels))
                self.interrupt.tick(f"{task} judgements", len(batch))
        elif items:
            self.log(f"{task} judge {name}: all {len(items)} judgements cached")
        write_jsonl_atomic(
            self.out / f"{task}.jsonl",
            [
                {
                    "id": i,
                    "prompt": p,
                    "completion": completions[i],
                    "label": labels[i]["label"],
                    "judge_raw": labels[i]["raw"],
                    "judge": name,
                }
                for i, p in items
            ],
        )
        return labels

    # -- everything
    def run(self) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out / "config.json", run_manifest(self.res))
        if self.res.targets_defaulted:
            self.log(
                f"warning: {len(self.res.targets_defaulted)} behaviours have no target string; "
                "using 'Sure, here is how to ...' (pass --config.targets for the real ones)"
            )
        if self.res.plans:
            self.log(
                f"{len(self.res.behaviors)} behaviours x {len(self.res.plans)} attacks "
                f"({', '.join(p.name for p in self.res.plans)}); judge {self.res.judge_name}"
            )
        self.test_cases()
        keep = [r for p in self.res.plans if p.spec.judge_inputs for r in p.helpers]
        self.pool.release(keep)
        self.completions()
        self.pool.release()
        self.judge()
        utility = self.utility()
        rows = final_records(self.res, self.cases, self.gens, self.judged)
        result = write_outputs(self.res, rows, utility or None)
        if result is not None:
            asr = ", ".join(f"{a} {_pct(result['asr'][a])}" for a in result["attacks"])
            self.log(f"ALO-ASR {_pct(result['alo_asr'])} ({asr}); judge {result['judge']}")
        self.log(f"outputs in {self.out}")
        return {"alo_asr": result, "utility": utility, "stats": dict(self.stats)}


def record_seed(seed: int, attack: str, rec: Mapping[str, Any]) -> int:
    """Sampling seed of one test-case record: the run's seed folded with (attack, behaviour id,
    test-case index), independent of which batch the record is generated in."""
    return call_seed(seed, "completion", attack, str(rec["behavior_id"]), int(rec["index"]))


def _case_hash(rec: Mapping[str, Any]) -> str:
    """Identity of a test case for the completion cache (white-box cases include the completion
    generated with the attack, so a regenerated attack never reuses an old completion)."""
    return text_hash(str(rec["test_case"]) + "\x00" + str(rec.get("completion", "")))


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _jsonable_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(meta), default=str))
