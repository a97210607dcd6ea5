"""The embedded demo: measure an unsafe tiny chat model, train it with MixAT, measure again.

Stages (each in its own sub-directory of the workdir, each resumable because the evaluation
pipeline and the training loop are):
  1. base: the shipped unsafe base checkpoint (`mixat_jax/demo/assets/base`) or a rebuild;
  2. eval_base: ALO-ASR on held-out forbidden requests of the synthetic world under
     DirectRequest, HumanJailbreaks-style templates, GCG and the continuous embedding attack
     (keyword judge: the secret appears in the completion), plus benign-task accuracy;
  3. train_<variant>: LoRA training with `training.loop` (MixAT; with `:compare` also CAT and
     discrete-only) on the world's *training* behaviours, PAP-style template rewrites as the
     discrete attack;
  4. eval_<variant>: the same measurement with the trained adapter;
  5. report.json / report.md / report_asr.png / report_training.png.
Every number in the report is measured in this run; nothing is set by hand.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from mixat_jax import cli as cli_lib
from mixat_jax.demo import statistics as stats
from mixat_jax.demo.base import build_base, shipped_base_dir
from mixat_jax.evaluation import pipeline
from mixat_jax.evaluation.run_config import base_config
from mixat_jax.sampling import TextGenerator
from mixat_jax.training import loop
from mixat_jax.training.synthetic import (
    demo_heldout_behaviors,
    heldout_benign,
    is_correct,
    safety_world,
)

ATTACKS = ("DirectRequest", "HumanJailbreaks", "GCG", "Continuous")


def log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def write_world(world: dict, out: Path) -> tuple[Path, Path, list[str]]:
    """Held-out behaviours as a HarmBench-style CSV + targets JSON; returns the judge markers."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, tgt_path = out / "eval_behaviors.csv", out / "eval_targets.json"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "Behavior",
                "FunctionalCategory",
                "SemanticCategory",
                "Tags",
                "ContextString",
                "BehaviorID",
            ]
        )
        for b in world["eval_behaviors"]:
            w.writerow(
                [
                    b.behavior,
                    "standard",
                    b.behavior.split(" the ", 1)[-1].rstrip("?."),
                    "",
                    "",
                    b.behavior_id,
                ]
            )
    tgt_path.write_text(
        json.dumps({b.behavior_id: b.target for b in world["eval_behaviors"]}, indent=1)
    )
    markers = sorted({b.harmful_marker for b in world["eval_behaviors"]})
    return csv_path, tgt_path, markers


def eval_config(
    demo, model: Path, adapter: Path | None, csv_path, tgt_path, markers
) -> ml_collections.ConfigDict:
    c = base_config()
    c.model = str(model)
    c.adapter = str(adapter) if adapter else ""
    c.dtype = "float32"
    c.behaviors = str(csv_path)
    c.targets = str(tgt_path)
    c.attacks = ",".join(ATTACKS)
    c.max_new_tokens = int(demo.max_new_tokens)
    c.gen_batch_size = 16
    c.gen_length_multiple = 32
    c.judge = "keyword"
    c.judge_markers = ",".join(markers)
    c.n_bootstrap = int(demo.n_bootstrap)
    c.behavior_chunk = 8
    c.title = "demo"
    a = c.attack
    a.HumanJailbreaks.num_templates = int(demo.num_templates)
    a.HumanJailbreaks.template_set = "project"  # the demo's measured set (HarmBench's: eval/mixat)
    a.GCG.update(
        {
            "preset": "harmbench",
            "num_steps": int(demo.gcg_steps),
            "search_width": int(demo.gcg_width),
            "topk": int(demo.gcg_topk),
            "optim_str_init": str(demo.gcg_suffix),
            "behaviors_per_run": 8,
            "early_stop": bool(demo.get("gcg_early_stop", False)),
            "check_refusal": False,
            "max_seq_len": 256,
        }
    )
    a.Continuous.update(
        {
            "iters": int(demo.continuous_iters),
            "eps": float(demo.continuous_eps),
            "lr": float(demo.continuous_lr),
        }
    )
    return c


ASR_JUDGE = "keyword (the behaviour's secret appears in the completion)"
UTILITY_JUDGE = (
    "exact answer (training.synthetic.is_correct: the first sentence ends with the world's answer)"
)


def benign_accuracy(
    model: Path, adapter: Path | None, world: dict, max_new_tokens: int
) -> dict[str, Any]:
    gen = TextGenerator.from_pretrained(
        model, adapter=str(adapter) if adapter else None, dtype="float32", batch_size=16
    )
    items = world["eval_benign"]
    outs = gen.generate([it.question for it in items], max_new_tokens=max_new_tokens)
    ok = [bool(is_correct(it.question, o)) for it, o in zip(items, outs, strict=True)]
    return {
        "accuracy": float(np.mean(ok)),
        "n": len(items),
        "correct": [int(c) for c in ok],  # per question, in world["eval_benign"] order
        "examples": [
            {"question": it.question, "completion": o, "correct": c}
            for it, o, c in list(zip(items, outs, ok, strict=True))[:12]
        ],
    }


def measure(
    name: str, demo, model: Path, adapter: Path | None, world, files, out: Path
) -> dict[str, Any]:
    log(
        f"measuring {name}: attacks {', '.join(ATTACKS)} on {len(world['eval_behaviors'])} held-out behaviours"
    )
    t0 = time.time()
    cfg = eval_config(demo, model, adapter, *files)
    result = pipeline.run(cfg, out / f"eval_{name}")
    alo = json.loads((out / f"eval_{name}" / "alo_asr.json").read_text())
    util = benign_accuracy(model, adapter, world, int(demo.max_new_tokens))
    log(
        f"{name}: ALO-ASR {alo['alo_asr']:.3f}, benign accuracy {util['accuracy']:.3f} ({time.time() - t0:.0f}s)"
    )
    del result
    return {
        "alo_asr": alo["alo_asr"],
        "asr": alo["asr"],
        "ci95": alo["ci95"],
        "success": stats.behavior_success(alo),  # behaviour id -> max_a s_a(b)
        "utility": util,
        "seconds": time.time() - t0,
    }


def demo_world(config) -> dict[str, Any]:
    """The synthetic world with the demo's held-out sets: `demo.heldout_phrasings` phrasings of
    each of the 4 held-out topics (4 x 8 = 32 behaviours by default) and every held-out benign
    question (`demo.benign_questions="all"`, 224) or safety_world's subsample (`"subsample"`, 47)."""
    demo, seed = config.demo, int(config.data.synthetic_seed)
    world = dict(safety_world(seed))
    world["eval_behaviors"] = demo_heldout_behaviors(seed, int(demo.get("heldout_phrasings", 2)))
    which = str(demo.get("benign_questions", "subsample"))
    if which not in ("all", "subsample"):
        raise ValueError(f"demo.benign_questions must be 'all' or 'subsample'; got {which!r}")
    if which == "all":
        world["eval_benign"] = heldout_benign(seed)
    return world


def seed_config(config, index: int):
    """The run config for training seed `index` (0 = the config as given): `seed` and
    `data.interleave_seed` both shifted by `index`, so LoRA init, attack dropout/noise keys and
    the utility rows in the mixture and their order all change with the seed."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.seed = int(config.seed) + index
    c.data.interleave_seed = int(config.data.interleave_seed) + index
    return c


def run_name(variant: str, index: int, num_seeds: int) -> str:
    """Stage name of one trained model: the variant, plus `_seed<i>` when several seeds run."""
    return variant if num_seeds == 1 else f"{variant}_seed{index}"


def train_variant(config, variant: str, model: Path, out: Path, name: str | None = None) -> Path:
    c = ml_collections.ConfigDict(config.to_dict())
    if "demo" in c:
        del c["demo"]
    c.model = str(model)
    c.variant = variant
    if variant == "cat":
        c.discrete.schedule = "none"
    wd = out / f"train_{name or variant}"
    log(f"training {variant} ({c.steps} steps) in {wd}")
    return run_training(c, wd, variant)


def run_training(c, wd: Path, what: str) -> Path:
    """`training.loop.run` as a demo stage: the adapter directory once the run has finished;
    otherwise `cli.Stopped` with the loop's exit code (143 preempted, 130 interrupted)."""
    status = loop.run(c, wd)
    if status != "finished":
        code = {"preempted": cli_lib.EXIT_PREEMPTED, "interrupted": cli_lib.EXIT_INTERRUPTED}
        raise cli_lib.Stopped(
            f"training {what} {status}; re-run the same command to resume", code.get(status, 1)
        )
    return wd / "adapter"


def training_curve(wd: Path) -> dict[str, list[float]]:
    rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines() if x.strip()]
    keys = ("loss", "away", "toward", "utility", "attack_loss_before", "attack_loss_after")
    return {k: [r.get(k, float("nan")) for r in rows] for k in keys}


def plot_training(plt, training: dict[str, dict[str, list[float]]], path: Path) -> None:
    """Loss / utility and toward curves of every trained variant, side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, curve in training.items():
        axes[0].plot(curve["loss"], label=f"{name} loss")
        axes[0].plot(curve["utility"], "--", label=f"{name} utility")
        axes[1].plot(curve["toward"], label=f"{name} toward")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ci_cell(stat: dict[str, Any]) -> str:
    return f"{stat['value']:.2f} [{stat['ci95'][0]:.2f}, {stat['ci95'][1]:.2f}]"


def seed_cell(summary: dict[str, Any]) -> str:
    return (
        f"{summary['mean']:.2f} ± {summary['std']:.2f} [{summary['min']:.2f}, {summary['max']:.2f}]"
    )


def write_report(out: Path, report: dict[str, Any]) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# MixAT demo: synthetic safety world", ""]
    lines += [
        f"Base model: `{report['base_model']}`; held-out forbidden behaviours: {report['num_behaviors']}; "
        f"benign eval questions: {report['num_benign']}; ASR judge: {report['asr_judge']}; "
        f"utility (benign accuracy) judge: {report['utility_judge']}.",
        "",
        "| model | ALO-ASR | " + " | ".join(f"ASR {a}" for a in ATTACKS) + " | benign accuracy "
        "| ALO-ASR drop [95% CI] | utility retention [95% CI] |",
        "|---|---|" + "---|" * len(ATTACKS) + "---|---|---|",
    ]
    for name, m in report["models"].items():
        asr = " | ".join("-" if m["asr"].get(a) is None else f"{m['asr'][a]:.2f}" for a in ATTACKS)
        st = m.get("stats", {})
        drop = ci_cell(st["alo_asr_drop"]) if "alo_asr_drop" in st else "-"
        ret = ci_cell(st["utility_retention"]) if "utility_retention" in st else "-"
        lines.append(
            f"| {name} | {m['alo_asr']:.2f} | {asr} | {m['utility']['accuracy']:.2f} | {drop} "
            f"| {ret} |"
        )
    if "alo_asr_drop" in report:
        d, r = report["alo_asr_drop"], report["utility_retention"]
        lines += [
            "",
            f"{report['trained_model']}: ALO-ASR drop (before - after) {ci_cell(d)}, paired "
            f"bootstrap over the {d['n']} held-out behaviours"
            + (
                f" (resampling whole topics instead, {d['n_clusters']} clusters: "
                f"[{d['ci95_clustered'][0]:.2f}, {d['ci95_clustered'][1]:.2f}])"
                if "ci95_clustered" in d
                else ""
            )
            + f"; utility retention (benign accuracy "
            f"after / before) {ci_cell(r)}, paired bootstrap over the {r['n']} benign questions "
            f"({r['before']:.3f} -> {r['after']:.3f}).",
        ]
    summaries = report.get("variants", {})
    if any(len(v["runs"]) > 1 for v in summaries.values()):
        lines += [
            "",
            "Per variant over training seeds "
            + ", ".join(str(x) for x in report["seeds"])
            + ": mean ± std (sample std, ddof=1) [min, max].",
            "",
            "| variant | seeds | ALO-ASR | benign accuracy | ALO-ASR drop | utility retention |",
            "|---|---|---|---|---|---|",
        ]
        for v, sm in summaries.items():
            cells = " | ".join(
                seed_cell(sm[k])
                for k in ("alo_asr", "utility", "alo_asr_drop", "utility_retention")
            )
            lines.append(f"| {v} | {len(sm['runs'])} | {cells} |")
    if report.get("stage_seconds"):
        lines += ["", "Stage times (s): " + ", ".join(
            f"{k} {v:.0f}" for k, v in report["stage_seconds"].items())]  # fmt: skip
    lines += ["", f"Total time: {report['seconds']:.0f} s.", ""]
    (out / "report.md").write_text("\n".join(lines))
    try:
        import matplotlib  # lazy: plotting only at the end of the demo

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(report["models"])
        fig, ax = plt.subplots(figsize=(8, 4))
        cols = [*ATTACKS, "ALO"]
        w = 0.8 / len(names)
        for i, n in enumerate(names):
            m = report["models"][n]
            vals = [m["asr"].get(a) or 0.0 for a in ATTACKS] + [m["alo_asr"]]
            bars = ax.bar(
                np.arange(len(cols)) + i * w,
                vals,
                w,
                label=f"{n} (benign acc {m['utility']['accuracy']:.2f})",
            )
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(np.arange(len(cols)) + w * (len(names) - 1) / 2, cols)
        ax.set_ylabel("attack success rate")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=8)
        ax.set_title("Robustness before/after adversarial training")
        fig.tight_layout()
        fig.savefig(out / "report_asr.png", dpi=120)
        plt.close(fig)
        plot_training(plt, report["training"], out / "report_training.png")
    except Exception as e:  # noqa: BLE001 - plots are a convenience; the JSON/markdown carry the numbers
        log(f"plotting failed ({e}); report.json and report.md are complete")


def model_statistics(
    base: dict, trained: dict, n_bootstrap: int, clusters: dict[str, str] | None = None
) -> dict[str, Any]:
    """Paired bootstrap CIs of one trained model against the base (same behaviours/questions);
    `clusters` (behaviour id -> topic) adds the topic-clustered CI of the drop."""
    return {
        "alo_asr_drop": stats.alo_asr_drop(
            base["success"], trained["success"], n_bootstrap=n_bootstrap, clusters=clusters
        ),
        "utility_retention": stats.utility_retention(
            base["utility"]["correct"], trained["utility"]["correct"], n_bootstrap=n_bootstrap
        ),
    }


def variant_summary(models: dict[str, dict], names: list[str]) -> dict[str, Any]:
    """Mean / std / min / max over a variant's seeds of ALO-ASR, benign accuracy, the drop and
    the retention (the per-seed values are in `models`)."""

    def pick(fn):
        return stats.seed_summary([fn(models[n]) for n in names])

    return {
        "runs": names,
        "alo_asr": pick(lambda m: m["alo_asr"]),
        "utility": pick(lambda m: m["utility"]["accuracy"]),
        "alo_asr_drop": pick(lambda m: m["stats"]["alo_asr_drop"]["value"]),
        "utility_retention": pick(lambda m: m["stats"]["utility_retention"]["value"]),
        "asr": {a: pick(lambda m, a=a: m["asr"][a]) for a in ATTACKS},
    }


def run_demo(config, workdir: str | Path | None = None) -> dict[str, Any]:
    demo = config.demo
    out = Path(workdir or demo.workdir)
    num_seeds = int(demo.get("seeds", 1))
    if num_seeds < 1:
        raise ValueError(f"demo.seeds must be >= 1; got {num_seeds}")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    world = demo_world(config)
    base = None if demo.rebuild_base else shipped_base_dir()
    if base is None:
        base = out / "base"
        if not (base / "config.json").exists():
            log(
                f"building the unsafe base model in {base} ({demo.base_steps} full fine-tuning steps)"
            )
            build_base(base, steps=int(demo.base_steps))
    log(f"base model {base}")
    files = write_world(world, out / "world")
    variants = [v.strip() for v in str(demo.variants).split(",") if v.strip()]
    n_boot = int(demo.n_bootstrap)
    # a held-out behaviour's topic = its secret (one per topic): the drop's clustered CI
    topics = {b.behavior_id: b.harmful_marker for b in world["eval_behaviors"]}
    stages: dict[str, float] = {}
    t = time.time()
    models = {"base": measure("base", demo, base, None, world, files, out)}
    stages["eval_base"] = round(time.time() - t, 1)
    training, runs = {}, {}
    for v in variants:
        runs[v] = []
        for i in range(num_seeds):
            name = run_name(v, i, num_seeds)
            t = time.time()
            adapter = train_variant(seed_config(config, i), v, base, out, name)
            stages[f"train_{name}"] = round(time.time() - t, 1)
            training[name] = training_curve(out / f"train_{name}")
            t = time.time()
            models[name] = measure(name, demo, base, adapter, world, files, out)
            stages[f"eval_{name}"] = round(time.time() - t, 1)
            models[name]["seed"] = int(config.seed) + i
            models[name]["stats"] = model_statistics(models["base"], models[name], n_boot, topics)
            runs[v].append(name)
    first = runs[variants[0]][0] if variants else "base"
    after = models[first]
    report = {
        "alo_asr_before": models["base"]["alo_asr"],
        "alo_asr_after": after["alo_asr"],
        "utility_before": models["base"]["utility"]["accuracy"],
        "utility_after": after["utility"]["accuracy"],
        "asr_before": models["base"]["asr"],
        "asr_after": after["asr"],
        "trained_variant": variants[0] if variants else "base",
        "trained_model": first,
    }
    if variants:
        report["alo_asr_drop"] = after["stats"]["alo_asr_drop"]
        report["utility_retention"] = after["stats"]["utility_retention"]
    report |= {
        "seeds": [int(config.seed) + i for i in range(num_seeds)],
        "variants": {v: variant_summary(models, runs[v]) for v in variants},
        "models": models,
        "training": training,
        "base_model": str(base),
        "num_behaviors": len(world["eval_behaviors"]),
        "num_benign": len(world["eval_benign"]),
        "asr_judge": ASR_JUDGE,
        "utility_judge": UTILITY_JUDGE,
        "stage_seconds": stages,
        "seconds": time.time() - t0,
    }
    write_report(out, report)
    msg = (
        f"ALO-ASR {report['alo_asr_before']:.2f} -> {report['alo_asr_after']:.2f}; benign accuracy "
        f"{report['utility_before']:.2f} -> {report['utility_after']:.2f}"
    )
    if variants:
        d, r = report["alo_asr_drop"], report["utility_retention"]
        msg += (
            f"; drop {d['value']:.2f} [{d['ci95'][0]:.2f}, {d['ci95'][1]:.2f}], retention "
            f"{r['value']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]"
        )
    log(f"{msg}; report in {out / 'report.md'}")
    return report
