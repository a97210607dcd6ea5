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
from mixat_jax.demo.base import build_base, shipped_base_dir
from mixat_jax.evaluation import pipeline
from mixat_jax.evaluation.run_config import base_config
from mixat_jax.sampling import TextGenerator
from mixat_jax.training import loop
from mixat_jax.training.synthetic import is_correct, safety_world

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
        "utility": util,
        "seconds": time.time() - t0,
    }


def train_variant(config, variant: str, model: Path, out: Path) -> Path:
    c = ml_collections.ConfigDict(config.to_dict())
    del c["demo"]
    c.model = str(model)
    c.variant = variant
    if variant == "cat":
        c.discrete.schedule = "none"
    wd = out / f"train_{variant}"
    log(f"training {variant} ({c.steps} steps) in {wd}")
    status = loop.run(c, wd)
    if status != "finished":
        code = {"preempted": cli_lib.EXIT_PREEMPTED, "interrupted": cli_lib.EXIT_INTERRUPTED}
        raise cli_lib.Stopped(
            f"training {variant} {status}; re-run the same command to resume", code.get(status, 1)
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


def write_report(out: Path, report: dict[str, Any]) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# MixAT demo: synthetic safety world", ""]
    lines += [
        f"Base model: `{report['base_model']}`; held-out forbidden behaviours: {report['num_behaviors']}; "
        f"benign eval questions: {report['num_benign']}; ASR judge: {report['asr_judge']}; "
        f"utility (benign accuracy) judge: {report['utility_judge']}.",
        "",
        "| model | ALO-ASR | " + " | ".join(f"ASR {a}" for a in ATTACKS) + " | benign accuracy |",
        "|---|---|" + "---|" * len(ATTACKS) + "---|",
    ]
    for name, m in report["models"].items():
        asr = " | ".join("-" if m["asr"].get(a) is None else f"{m['asr'][a]:.2f}" for a in ATTACKS)
        lines.append(f"| {name} | {m['alo_asr']:.2f} | {asr} | {m['utility']['accuracy']:.2f} |")
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


def run_demo(config, workdir: str | Path | None = None) -> dict[str, Any]:
    demo = config.demo
    out = Path(workdir or demo.workdir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    world = safety_world(int(config.data.synthetic_seed))
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
    models = {"base": measure("base", demo, base, None, world, files, out)}
    training = {}
    for v in variants:
        adapter = train_variant(config, v, base, out)
        training[v] = training_curve(out / f"train_{v}")
        models[v] = measure(v, demo, base, adapter, world, files, out)
    first = variants[0] if variants else "base"
    report = {
        "alo_asr_before": models["base"]["alo_asr"],
        "alo_asr_after": models[first]["alo_asr"],
        "utility_before": models["base"]["utility"]["accuracy"],
        "utility_after": models[first]["utility"]["accuracy"],
        "asr_before": models["base"]["asr"],
        "asr_after": models[first]["asr"],
        "trained_variant": first,
        "models": models,
        "training": training,
        "base_model": str(base),
        "num_behaviors": len(world["eval_behaviors"]),
        "num_benign": len(world["eval_benign"]),
        "asr_judge": ASR_JUDGE,
        "utility_judge": UTILITY_JUDGE,
        "seconds": time.time() - t0,
    }
    write_report(out, report)
    log(
        f"ALO-ASR {report['alo_asr_before']:.2f} -> {report['alo_asr_after']:.2f}; benign accuracy "
        f"{report['utility_before']:.2f} -> {report['utility_after']:.2f}; report in {out / 'report.md'}"
    )
    return report
