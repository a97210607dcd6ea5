"""What identifies a cached record of an evaluation run (spec mixat.md §8.1 pipeline, resumable).

A cached test case, completion or XSTest completion is reused only when the fingerprint of what
produced it matches the current run (`cache.py`): the attack's block, seed, helper / diffusion
models and (for adaptive and white-box attacks) the target; the target model, system prompt and
sampling settings for completions. Models are identified by resolved path, adapter and dtype.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mixat_jax.evaluation.cache import fingerprint
from mixat_jax.evaluation.run_config import TARGET_ALIAS, Resolved
from mixat_jax.evaluation.suite import AttackPlan


def model_id(res: Resolved, path: str) -> list[str]:
    """Identity of a model directory ('@target' = the target with its adapter and dtype)."""
    c = res.cfg
    if path == TARGET_ALIAS:
        return [str(Path(c.model).resolve()), str(c.adapter), str(c.dtype)]
    return [str(Path(path).resolve()), str(c.helper_dtype)]


def attack_fingerprint(res: Resolved, plan: AttackPlan) -> str:
    """Identity of an attack's test cases (sampling settings of the completions excluded)."""
    c = res.cfg
    block = {k: v for k, v in plan.block.items() if k not in ("gen_temperature", "gen_top_p")}
    payload: dict[str, Any] = {
        "kind": plan.kind,
        "block": block,
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
    return fingerprint(payload)


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
    """Identity of the XSTest completions (target, system prompt, length)."""
    c = res.cfg
    return fingerprint(
        {"target": model_id(res, TARGET_ALIAS), "sp": c.system_prompt, "tokens": max_new_tokens}
    )
