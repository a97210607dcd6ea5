"""The embedded DAT demo: distributional adversarial training on the synthetic safety world
(DAT spec dat.md §1–§2), measured before and after next to CAT (and MixAT with `:compare`).

Stages, each in its own sub-directory of the workdir and each resumable (re-running the command
continues; a finished stage is skipped or answered from its cache):
  1. base: the shipped unsafe demo base (`mixat_jax/demo/assets/base`), as the MixAT demo;
  2. surrogate: the shipped tiny LLaDA-style diffusion LM of the world's request/response
     distribution (`demo.surrogate`; `demo.rebuild_surrogate=True` trains it into
     `OUT/surrogate`);
  3. stage_a: DAT Stage A (`dat.stage_a.run`) against the base on the world's TRAINING behaviours
     and their targets (`OUT/world/train_behaviors.csv`, `train_targets.json`): N inpainted
     prompts per behaviour, keyword judge (the training secrets), K kept;
  4. train_<variant>: LoRA training with `training.loop` — `dat` on `OUT/stage_a/selected.jsonl`,
     `cat` (and `mixat` with `:compare`) on the world's training behaviours — with the MixAT
     demo's steps, LoRA, batch and attack budget;
  5. eval_<model>: the MixAT demo's attacks (DirectRequest, HumanJailbreaks, GCG, Continuous)
     plus `Inpainting` (the evaluation's attack with the surrogate, on the HELD-OUT behaviours'
     targets) over `synthetic.heldout_behaviors` (4 held-out topics x 4 held-out phrasings),
     keyword judge (the held-out secrets), bootstrap CIs; benign-task accuracy;
  6. report.json / report.md / report_asr.png / report_training.png.
Every number in the report is measured in this run.
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

from mixat_jax.dat import stage_a
from mixat_jax.dat.sample_config import SampleConfig, SamplerSpec
from mixat_jax.demo import run as mixat_demo
from mixat_jax.demo.base import build_base, shipped_base_dir
from mixat_jax.demo.surrogate import SURROGATE_SPEC, build_surrogate, shipped_surrogate_dir
from mixat_jax.evaluation import pipeline
from mixat_jax.mesh import MeshConfig
from mixat_jax.training import run_config
from mixat_jax.training.synthetic import (
    EVAL_TOPICS,
    TRAIN_TOPICS,
    heldout_behaviors,
    safety_world,
    world_secrets,
)

ATTACKS = (*mixat_demo.ATTACKS, "Inpainting")
VARIANTS = ("dat", "cat", "mixat", "discrete_only")
AFTER = "dat"


def log(msg: str) -> None:
    print(f"[dat demo] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ validation
def parse_variants(demo) -> list[str]:
    variants = [v.strip() for v in str(demo.variants).split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or AFTER not in variants or len(set(variants)) != len(variants):
        raise ValueError(
            f"demo.variants={demo.variants!r}: list 'dat' and optionally {', '.join(VARIANTS[1:])}"
            " once each, e.g. 'dat,cat'"
        )
    return [AFTER, *[v for v in variants if v != AFTER]]


def sample_config(demo, surrogate: Path, base: Path, files: tuple[Path, Path, list[str]]):
    """Stage A's `SampleConfig` (validated: K <= N and the rest, before anything is written)."""
    csv_path, tgt_path, markers = files
    n = int(demo.stage_a_num_samples)
    return SampleConfig(
        diffusion_model=str(surrogate),
        target_model=str(base),
        target_adapter=None,
        behaviors=str(csv_path),
        targets=str(tgt_path),
        limit=int(demo.stage_a_limit) or None,
        num_samples=n,
        num_selected=int(demo.stage_a_num_selected),
        prompt_length=int(demo.prompt_length),
        sampler=SamplerSpec(steps=int(demo.prompt_length)),
        judge="keyword",
        judge_markers=tuple(markers),
        max_new_tokens=int(demo.max_new_tokens),
        seed=int(demo.stage_a_seed),
        batch_size=max(1, n),
        gen_batch_size=max(1, n),
        dtype="float32",
        mesh=MeshConfig(data=1, fsdp=1, tensor=1),
    )


def parse_attacks(demo) -> list[str]:
    """`demo.attacks` (default: all of ATTACKS); Inpainting is required (the report's key)."""
    attacks = [a.strip() for a in str(demo.attacks).split(",") if a.strip()]
    bad = [a for a in attacks if a not in ATTACKS]
    if bad or "Inpainting" not in attacks or len(set(attacks)) != len(attacks):
        raise ValueError(
            f"demo.attacks={demo.attacks!r}: choose from {','.join(ATTACKS)} (each once), "
            "Inpainting included"
        )
    return attacks


def check_demo(demo) -> None:
    parse_attacks(demo)
    names = ("stage_a_num_samples", "stage_a_num_selected", "inpainting_samples", "prompt_length",
             "max_new_tokens", "n_bootstrap")  # fmt: skip
    for name in names:
        if int(demo[name]) < 1:
            raise ValueError(f"demo.{name} must be >= 1, got {demo[name]}")
    if int(demo.stage_a_num_selected) > int(demo.stage_a_num_samples):
        raise ValueError(
            f"demo.stage_a_num_selected (K={demo.stage_a_num_selected}) exceeds "
            f"demo.stage_a_num_samples (N={demo.stage_a_num_samples}); keep K <= N"
        )
    if int(demo.prompt_length) < int(SURROGATE_SPEC["prompt_length"]):
        raise ValueError(
            f"demo.prompt_length={demo.prompt_length} is shorter than the surrogate's prompt span "
            f"({SURROGATE_SPEC['prompt_length']}); use {SURROGATE_SPEC['prompt_length']}"
        )


# ------------------------------------------------------------------------------ world files
def write_training_behaviors(world: dict, csv_path: Path, tgt_path: Path) -> None:
    """The world's TRAINING behaviours (HarmBench-style CSV) and their targets (JSON id -> list)."""
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    by_id: dict[str, dict[str, Any]] = {}
    for row in world["train_adv"]:
        entry = by_id.setdefault(row.behavior_id, {"behavior": row.behavior, "targets": []})
        entry["targets"].append(row.target)
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Behavior", "FunctionalCategory", "SemanticCategory", "Tags",
                    "ContextString", "BehaviorID"])  # fmt: skip
        for bid, e in by_id.items():
            w.writerow([e["behavior"], "standard", "synthetic", "", "", bid])
    tgt_path.write_text(json.dumps({b: e["targets"] for b, e in by_id.items()}, indent=1) + "\n")


# ------------------------------------------------------------------------------ measurement
def eval_config(demo, model: Path, adapter: Path | None, surrogate: Path, files):
    c = mixat_demo.eval_config(demo, model, adapter, *files)
    c.attacks = ",".join(parse_attacks(demo))
    c.diffusion_model = str(surrogate)
    c.attack.Inpainting.update(
        {
            "num_samples": int(demo.inpainting_samples),
            "prompt_length": int(demo.prompt_length),
            "steps": int(demo.prompt_length),
            "batch_size": 64,
            "seed": 0,
        }
    )
    c.title = "dat demo"
    return c


def alo_without(alo: dict[str, Any], drop: str) -> float | None:
    """ALO-ASR over every attack but `drop`, from the evaluation's success matrix."""
    attacks = [a for a in alo["attacks"] if a != drop]
    if not attacks:
        return None
    hits = [max(alo["success"][a][b] for a in attacks) for b in alo["behaviors"]]
    return float(np.mean(hits))


def measure(name: str, demo, base: Path, adapter, surrogate: Path, world, files, out: Path):
    log(f"measuring {name}: {demo.attacks} on {len(world['eval_behaviors'])} held-out "
        "behaviours")  # fmt: skip
    t0 = time.time()
    pipeline.run(eval_config(demo, base, adapter, surrogate, files), out / f"eval_{name}")
    alo = json.loads((out / f"eval_{name}" / "alo_asr.json").read_text())
    util = mixat_demo.benign_accuracy(base, adapter, world, int(demo.max_new_tokens))
    m = {
        "alo_asr": alo["alo_asr"],
        "alo_asr_without_inpainting": alo_without(alo, "Inpainting"),
        "asr": alo["asr"],
        "ci95": alo["ci95"],
        "utility": util,
        "seconds": time.time() - t0,
    }
    log(f"{name}: ALO-ASR {m['alo_asr']:.3f} (without Inpainting "
        f"{m['alo_asr_without_inpainting']:.3f}), Inpainting ASR {m['asr']['Inpainting']:.3f}, "
        f"benign accuracy {util['accuracy']:.3f} ({m['seconds']:.0f}s)")  # fmt: skip
    return m


# ------------------------------------------------------------------------------ stages
def variant_config(config, variant: str, selected: Path) -> ml_collections.ConfigDict:
    """The run config of one trained variant: the demo's budget; dat/cat without rewrites."""
    c = ml_collections.ConfigDict(config.to_dict())
    if variant in ("dat", "cat"):
        c.discrete.schedule = "none"
    if variant == "dat":
        c.dat.selected = str(selected)
    return c


def stage_a_report(stage_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Stage A's counts plus a leak check: selected prompts naming a held-out topic."""
    rows = [json.loads(x) for x in (stage_dir / "selected.jsonl").read_text().splitlines() if x]
    heldout = [r for r in rows if any(t.split(" ", 1)[1] in r["prompt"] for t in EVAL_TOPICS)]
    return {
        "num_behaviors": len({r["behavior_id"] for r in rows}),
        "num_selected": len(rows),
        "selected_judged_harmful": float(np.mean([r["judge_score"] >= 0.5 for r in rows])),
        "selected_mentioning_heldout_topic": len(heldout),
        "num_candidates": summary.get("num_candidates"),
        "examples": [{"behavior": r["behavior"], "prompt": r["prompt"],
                      "judge_score": r["judge_score"]} for r in rows[:: max(1, len(rows) // 12)]],
    }  # fmt: skip


def check_training_configs(config, variants: list[str], selected: Path) -> None:
    """Every variant's run config validates (one-line errors) before any stage runs."""
    for v in variants:
        c = variant_config(config, v, selected)
        del c["demo"]
        c.model = "demo-base"
        c.variant = v
        run_config.from_config_dict(c)


def run_dat_demo(config, workdir: str | Path | None = None) -> dict[str, Any]:
    demo = config.demo
    out = Path(workdir or demo.workdir)
    variants = parse_variants(demo)
    check_demo(demo)
    seed = int(config.data.synthetic_seed)
    surrogate = None if demo.rebuild_surrogate else shipped_surrogate_dir()
    if surrogate is None and not demo.rebuild_surrogate:
        raise ValueError(
            "the shipped surrogate mixat_jax/demo/assets/surrogate is missing; regenerate it "
            "with python -m mixat_jax.demo.surrogate --out mixat_jax/demo/assets/surrogate or "
            "pass --config.demo.rebuild_surrogate=True"
        )
    surrogate = surrogate or out / "surrogate"
    base = None if demo.rebuild_base else shipped_base_dir()
    if base is None and not demo.rebuild_base:
        raise ValueError("the shipped demo base is missing; pass --config.demo.rebuild_base=True")
    base = base or out / "base"
    train_csv, train_tgt = (
        out / "world" / "train_behaviors.csv",
        out / "world" / "train_targets.json",
    )
    secrets = world_secrets(seed)
    markers = sorted(secrets[t] for t in TRAIN_TOPICS)
    sample_cfg = sample_config(demo, surrogate, base, (train_csv, train_tgt, markers))
    selected = out / "stage_a" / "selected.jsonl"
    check_training_configs(config, variants, selected)

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    stages: dict[str, float] = {}

    def timed(name: str, fn):
        t = time.time()
        result = fn()
        stages[name] = round(time.time() - t, 1)
        return result

    world = safety_world(seed)
    if not (base / "config.json").exists():
        log(f"building the unsafe base model in {base}")
        timed("base", lambda: build_base(base, steps=int(demo.base_steps)))
    if not (surrogate / "config.json").exists():
        log(f"training the diffusion surrogate in {surrogate} ({demo.surrogate_steps} steps)")
        timed("surrogate", lambda: build_surrogate(
            surrogate, base_dir=base, steps=int(demo.surrogate_steps), log=log))  # fmt: skip
    log(f"base model {base}; diffusion surrogate {surrogate}")
    eval_world = {**world, "eval_behaviors": heldout_behaviors(seed)}
    files = mixat_demo.write_world(eval_world, out / "world")
    write_training_behaviors(world, train_csv, train_tgt)

    log(f"Stage A: {sample_cfg.num_samples} inpainted prompts per training behaviour, keep "
        f"{sample_cfg.num_selected}")  # fmt: skip
    summary = timed("stage_a", lambda: stage_a.run(sample_cfg, out / "stage_a"))
    models = {"base": timed("eval_base", lambda: measure(
        "base", demo, base, None, surrogate, eval_world, files, out))}  # fmt: skip
    training = {}
    for v in variants:
        c = variant_config(config, v, selected)
        adapter = timed(f"train_{v}", lambda c=c, v=v: mixat_demo.train_variant(c, v, base, out))
        training[v] = mixat_demo.training_curve(out / f"train_{v}")
        models[v] = timed(f"eval_{v}", lambda v=v, a=adapter: measure(
            v, demo, base, a, surrogate, eval_world, files, out))  # fmt: skip
    before, after = models["base"], models[AFTER]
    report = {
        "alo_asr_before": before["alo_asr"],
        "alo_asr_after": after["alo_asr"],
        "utility_before": before["utility"]["accuracy"],
        "utility_after": after["utility"]["accuracy"],
        "inpainting_asr_before": before["asr"]["Inpainting"],
        "inpainting_asr_after": after["asr"]["Inpainting"],
        "asr_before": before["asr"],
        "asr_after": after["asr"],
        "ci95_before": before["ci95"],
        "ci95_after": after["ci95"],
        "trained_variant": AFTER,
        "attacks": parse_attacks(demo),
        "models": models,
        "training": training,
        "stage_a": stage_a_report(out / "stage_a", summary),
        "base_model": str(base),
        "surrogate_model": str(surrogate),
        "num_behaviors": len(eval_world["eval_behaviors"]),
        "num_benign": len(world["eval_benign"]),
        "asr_judge": mixat_demo.ASR_JUDGE,
        "utility_judge": mixat_demo.UTILITY_JUDGE,
        "stage_seconds": stages,
        "seconds": time.time() - t0,
    }
    write_report(out, report)
    log(f"ALO-ASR {report['alo_asr_before']:.2f} -> {report['alo_asr_after']:.2f}; Inpainting ASR "
        f"{report['inpainting_asr_before']:.2f} -> {report['inpainting_asr_after']:.2f}; benign "
        f"accuracy {report['utility_before']:.2f} -> {report['utility_after']:.2f}; report in "
        f"{out / 'report.md'}")  # fmt: skip
    return report


# ------------------------------------------------------------------------------ report
def fmt_ci(value: float | None, ci: list[float] | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{value:.2f}"


def write_report(out: Path, report: dict[str, Any]) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    sa = report["stage_a"]
    lines = [
        "# DAT demo: synthetic safety world", "",
        f"Base model: `{report['base_model']}`; diffusion surrogate: `{report['surrogate_model']}`; "
        f"held-out forbidden behaviours: {report['num_behaviors']}; benign eval questions: "
        f"{report['num_benign']}; ASR judge: {report['asr_judge']}; utility (benign accuracy) "
        f"judge: {report['utility_judge']}. 95% bootstrap CIs over "
        "behaviours in brackets.", "",
        f"Stage A: {sa['num_selected']} selected prompts for {sa['num_behaviors']} training "
        f"behaviours ({sa['num_candidates']} candidates), {sa['selected_judged_harmful']:.2f} of "
        f"them judged harmful against the base; {sa['selected_mentioning_heldout_topic']} name a "
        "held-out topic.", "",
        "| model | ALO-ASR | ALO-ASR w/o Inpainting | "
        + " | ".join(f"ASR {a}" for a in report["attacks"]) + " | benign accuracy |",
        "|---|---|---|" + "---|" * len(report["attacks"]) + "---|",
    ]  # fmt: skip
    for name, m in report["models"].items():
        asr = " | ".join(fmt_ci(m["asr"].get(a), m["ci95"]["asr"].get(a))
                         for a in report["attacks"])  # fmt: skip
        lines.append(f"| {name} | {fmt_ci(m['alo_asr'], m['ci95']['alo_asr'])} | "
                     f"{fmt_ci(m['alo_asr_without_inpainting'], None)} | {asr} | "
                     f"{m['utility']['accuracy']:.2f} |")  # fmt: skip
    lines += ["", "Stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in
                                                report["stage_seconds"].items()),
              f"Total time: {report['seconds']:.0f} s.", ""]  # fmt: skip
    (out / "report.md").write_text("\n".join(lines))
    try:
        plot_report(out, report)
    except Exception as e:  # noqa: BLE001 - plots are a convenience; the JSON/markdown carry the numbers
        log(f"plotting failed ({e}); report.json and report.md are complete")


def plot_report(out: Path, report: dict[str, Any]) -> None:
    import matplotlib  # lazy: plotting only at the end of the demo

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["models"])
    attacks = report["attacks"]
    cols = [*attacks, "ALO"]
    fig, ax = plt.subplots(figsize=(9, 4))
    w = 0.8 / len(names)
    for i, n in enumerate(names):
        m = report["models"][n]
        vals = [m["asr"].get(a) or 0.0 for a in attacks] + [m["alo_asr"]]
        cis = [m["ci95"]["asr"].get(a) for a in attacks] + [m["ci95"]["alo_asr"]]
        err = np.array([[v - c[0], c[1] - v] if c else [0.0, 0.0]
                        for v, c in zip(vals, cis, strict=True)]).T  # fmt: skip
        bars = ax.bar(np.arange(len(cols)) + i * w, vals, w, yerr=np.maximum(err, 0),
                      capsize=2, label=f"{n} (benign acc {m['utility']['accuracy']:.2f})")  # fmt: skip
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(np.arange(len(cols)) + w * (len(names) - 1) / 2, cols)
    ax.set_ylabel("attack success rate (95% CI)")
    ax.set_ylim(0, 1.1)
    ax.legend(fontsize=8)
    ax.set_title("Held-out robustness before/after DAT and CAT (Inpainting = surrogate prompts)")
    fig.tight_layout()
    fig.savefig(out / "report_asr.png", dpi=120)
    plt.close(fig)
    mixat_demo.plot_training(plt, report["training"], out / "report_training.png")
