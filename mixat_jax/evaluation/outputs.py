"""What an evaluation run writes, as plain functions of its records (spec mixat.md §8.1 step 5,
§8.2): `config.json` (`run_manifest`), `completions.jsonl` (`final_records`), `alo_asr.json`,
`report.md` and `alo_asr.png` (`write_outputs`), `utility.json` and a utility-only `report.md`.
"""

from __future__ import annotations

import importlib.metadata
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mixat_jax.evaluation.alo_asr import compute_alo_asr
from mixat_jax.evaluation.cache import write_json_atomic, write_jsonl_atomic
from mixat_jax.evaluation.fingerprints import attack_fingerprint, model_fingerprints
from mixat_jax.evaluation.report import (
    compliance_lines,
    harness_lines,
    model_lines,
    write_report,
)
from mixat_jax.evaluation.run_config import Resolved

# (attack, behaviour id, test-case index) -> record
RecordKey = tuple[str, str, int]


def run_manifest(res: Resolved) -> dict[str, Any]:
    """The content of OUT/config.json: the config plus what it resolved to."""
    versions = {}
    for pkg in ("jax", "flax", "transformers"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "config": res.cfg.to_dict(),
        "judge": res.judge_name,
        "behaviors": {"n": len(res.behaviors), "ids": [b.id for b in res.behaviors]},
        "targets_defaulted": res.targets_defaulted,
        "attacks": [
            {
                "name": p.name,
                "kind": p.kind,
                "block": p.block,
                "fingerprint": attack_fingerprint(res, p),
            }
            for p in res.plans
        ],
        "helpers": res.helper_paths,
        "model_fingerprints": model_fingerprints(res),
        "versions": versions,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def final_records(
    res: Resolved,
    cases: Mapping[str, Mapping[str, list[dict[str, Any]]]],
    gens: Mapping[RecordKey, Mapping[str, Any]],
    judged: Mapping[RecordKey, Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """The rows of completions.jsonl, in plan, behaviour and test-case order: every test case
    (`cases[attack][behaviour id]`) that has a completion and a judgement."""
    out = []
    for plan in res.plans:
        for b in res.behaviors:
            for rec in cases[plan.name].get(b.id, []):
                key = (plan.name, b.id, int(rec["index"]))
                g, j = gens.get(key), judged.get(key)
                if g is None or j is None:
                    continue
                row = {
                    "behavior_id": b.id,
                    "attack": plan.name,
                    "index": key[2],
                    "test_case": rec["test_case"],
                    "completion": g["completion"],
                    "judge": j["judge"],
                    "label": j["label"],
                }
                if "judge_input" in g:
                    row["judge_input"] = g["judge_input"]
                if rec.get("meta"):
                    row["attack_meta"] = rec["meta"]
                if j.get("meta"):
                    row["judge_meta"] = j["meta"]
                out.append(row)
    return out


def write_outputs(
    res: Resolved, rows: list[dict[str, Any]], utility: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """completions.jsonl, alo_asr.json, report.md, alo_asr.png (runs with attacks) and
    utility.json; returns the ALO-ASR result (None without attacks)."""
    cfg, out = res.cfg, res.workdir
    result = None
    title = cfg.title or f"Robustness report: {Path(cfg.model).name}"
    if res.plans:
        write_jsonl_atomic(out / "completions.jsonl", rows)
        result = compute_alo_asr(
            rows,
            behaviors=res.behaviors,
            attacks=[p.name for p in res.plans],
            judge=res.judge_name,
            n_bootstrap=int(cfg.n_bootstrap),
            seed=int(cfg.seed),
        )
        models = model_fingerprints(res)
        write_json_atomic(out / "alo_asr.json", result)
        write_report(result, out, utility=utility, title=title, models=models)
    elif utility:
        write_utility_report(out / "report.md", utility, title, models=model_fingerprints(res))
    if utility:
        write_json_atomic(out / "utility.json", utility)
    return result


def _flat(prefix: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, Mapping):
        return [kv for k, v in value.items() for kv in _flat(f"{prefix}.{k}" if prefix else k, v)]
    return [] if isinstance(value, list | tuple) else [(prefix, value)]


def write_utility_report(
    path: Path,
    utility: Mapping[str, Any],
    title: str,
    models: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """report.md for a utility-only run (no attacks)."""
    lines = [f"# {title}", "", "## Utility", ""] + compliance_lines(utility)
    lines += harness_lines(utility)
    lines += ["| metric | value |", "|---|---|"]
    for k, v in _flat("", {k: v for k, v in utility.items() if k != "lm_eval"}):
        lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    if models:
        lines += [""] + model_lines(models)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
