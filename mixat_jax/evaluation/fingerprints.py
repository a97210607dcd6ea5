"""What identifies a cached record of an evaluation run (spec mixat.md §8.1 pipeline, resumable).

A cached test case, completion or XSTest completion is reused only when the fingerprint of what
produced it matches the current run (`cache.py`): the attack's block, seed, helper / diffusion
models and (for adaptive and white-box attacks) the target; the target model, system prompt and
sampling settings for completions; the judge and its model for judgements. Models are
identified by the content of their files (`content_hash.py`: weights, config, tokenizer; the
adapter's likewise) and their dtype, never by path (issue #17: an adapter retrained in place must
not reuse the previous adapter's completions).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
from pathlib import Path
from typing import Any

from mixat_jax.evaluation.cache import fingerprint
from mixat_jax.evaluation.run_config import (
    MODEL_JUDGES,
    TARGET_ALIAS,
    Resolved,
    lm_eval_tasks,
    utility_judge_name,
)
from mixat_jax.evaluation.suite import AttackPlan
from mixat_jax.judges.compliance import judge_prompt


def model_id(res: Resolved, path: str) -> list[str]:
    """Identity of a model ('@target' = the target with its adapter and dtype): content
    fingerprints (sha256) of its files, and the dtype it is loaded in."""
    c = res.cfg
    if path == TARGET_ALIAS:
        adapter = res.content.model(c.adapter)["sha256"] if c.adapter else ""
        return [res.content.model(c.model)["sha256"], adapter, str(c.dtype)]
    return [res.content.model(path)["sha256"], str(c.helper_dtype)]


def judge_fingerprint(res: Resolved) -> str:
    """Identity of the judge: its recorded name and, for model judges, its model's content."""
    c = res.cfg
    payload: dict[str, Any] = {"judge": res.judge_name}
    if c.judge in MODEL_JUDGES:
        payload["model"] = model_id(res, str(c.judge_model))
    return fingerprint(payload)


def model_fingerprints(res: Resolved) -> dict[str, dict[str, Any]]:
    """role -> {path, sha256, files: {name: sha256}, bytes} of every model the run uses (target,
    adapter, helpers by role, judge, diffusion model): what the report lists."""
    c = res.cfg
    paths: dict[str, str] = {"target": str(c.model)}
    if c.adapter:
        paths["adapter"] = str(c.adapter)
    for role, path in sorted(res.helper_paths.items()):
        paths[role] = str(c.model) if path == TARGET_ALIAS else path
    if c.judge in MODEL_JUDGES:
        paths["judge"] = str(c.model) if c.judge_model == TARGET_ALIAS else str(c.judge_model)
    if any(p.spec.diffusion for p in res.plans):
        paths["diffusion_model"] = str(c.diffusion_model)
    for p in res.plans:
        if draft := probe_draft_path(p):
            paths[f"probe_draft_{p.name}"] = draft
    uj = c.utility_judge
    if uj.kind == "model" and (c.xstest or c.harmless):
        paths["utility_judge"] = str(c.model) if uj.model == TARGET_ALIAS else str(uj.model)
    out = {role: dict(res.content.model(path)) for role, path in paths.items()}
    for role, path in res.helper_paths.items():
        if path == TARGET_ALIAS:
            out[role]["same_as"] = "target"
    return out


def attack_fingerprint(res: Resolved, plan: AttackPlan) -> str:
    """Identity of an attack's test cases (sampling settings of the completions excluded)."""
    c = res.cfg
    block = {k: v for k, v in plan.block.items() if k not in ("gen_temperature", "gen_top_p")}
    cfg = plan.settings.get("cfg")
    payload: dict[str, Any] = {
        "kind": plan.kind,
        "block": block,
        # the resolved settings too: a changed default or preset (e.g. GCG's filter_mode) must
        # not reuse test cases made under the old one
        "settings": dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else None,
        "seed": int(c.seed),
        "helpers": {r: model_id(res, res.helper_paths[r]) for r in plan.helpers},
    }
    if plan.target_dependent:
        payload["target"] = model_id(res, TARGET_ALIAS)
        payload["system_prompt"] = c.system_prompt
    if plan.white_box_completions:
        payload["max_new_tokens"] = int(c.max_new_tokens)
    if plan.spec.diffusion:
        payload["diffusion_model"] = model_id(res, str(c.diffusion_model))
    draft = probe_draft_path(plan)
    if draft:  # GCG probe sampling's draft model: keyed by content like every other model
        payload["probe_draft"] = res.content.model(draft)["sha256"]
    return fingerprint(payload)


def probe_draft_path(plan: AttackPlan) -> str:
    """The local draft model of a GCG plan with probe sampling ("" when off or `@target`, whose
    content the target's fingerprint already covers)."""
    draft = str(getattr(plan.settings.get("cfg"), "probe_draft", "") or "")
    return "" if draft in ("", TARGET_ALIAS) else draft


def generation_fingerprint(res: Resolved, plan: AttackPlan) -> str:
    """Identity of an attack's completions and of what the judge reads of them."""
    c = res.cfg
    s = plan.settings
    payload: dict[str, Any] = {
        "target": model_id(res, TARGET_ALIAS),
        "system_prompt": c.system_prompt,
        "max_new_tokens": int(c.max_new_tokens),
        "temperature": float(s["gen_temperature"]),
        "top_p": float(s["gen_top_p"]),
    }
    if plan.spec.judge_inputs:  # back-translation: the judge reads the translator's output
        payload["back_translate"] = [
            bool(s["back_translate"]),
            int(s["back_translate_max_new_tokens"]),
            model_id(res, res.helper_paths["translator"]),
        ]
    return fingerprint(payload)


def xstest_fingerprint(res: Resolved, max_new_tokens: int) -> str:
    """Identity of the XSTest (and HarmLess) completions (target, system prompt, length)."""
    c = res.cfg
    return fingerprint(
        {"target": model_id(res, TARGET_ALIAS), "sp": c.system_prompt, "tokens": max_new_tokens}
    )


def utility_judge_fingerprint(res: Resolved, task: str) -> str:
    """Identity of the XSTest / HarmLess judgements (#13): the judge's name (kind, model dir,
    token budget), the reference prompt it sends and, for the model judge, its model's content."""
    c = res.cfg
    uj = c.utility_judge
    payload: dict[str, Any] = {"judge": utility_judge_name(c, task), "task": task}
    if uj.kind == "model":
        prompt = judge_prompt(task)
        payload["prompt"] = [prompt.system, prompt.user]
        payload["model"] = model_id(res, str(uj.model))
    return fingerprint(payload)


def _tree_digest(root: str) -> str:
    """SHA-256 over (relative path, bytes) of every non-hidden file under `root` (task YAMLs
    and the local data they read)."""
    h = hashlib.sha256()
    base = Path(root)
    for f in sorted(p for p in base.rglob("*") if p.is_file()):
        rel = f.relative_to(base).as_posix()
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        h.update(rel.encode() + b"\x00" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def lm_eval_fingerprint(res: Resolved) -> str:
    """Identity of OUT/lm_eval.json (#13): the target + adapter content and dtype, the task
    settings (names, shots, limit, max length, seed), the content of `include_path` and the
    lm-eval version (batch size excluded: it does not change the scores)."""
    b = res.cfg.lm_eval
    return fingerprint(
        {
            "target": model_id(res, TARGET_ALIAS),
            "tasks": lm_eval_tasks(res.cfg),
            "num_fewshot": int(b.num_fewshot),
            "limit": int(b.limit),
            "max_length": int(b.max_length),
            "seed": int(b.seed),
            "include_path": _tree_digest(str(b.include_path)) if b.include_path else "",
            "lm_eval": importlib.metadata.version("lm_eval"),
        }
    )
