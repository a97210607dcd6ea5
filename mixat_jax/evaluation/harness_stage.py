"""The lm-evaluation-harness utility stage of `python -m mixat_jax.evaluate` (issue #13: "report
the utility numbers beside the robustness numbers ... saying which judge produced each"; spec
mixat.md §8.2, dat.md §4.4: ARC-Easy, ARC-Challenge, MMLU, 0-shot, the harness's own numbers).

`run_harness_stage` runs `config.lm_eval.tasks` through the harness on the pipeline's target
generator (model + adapter, already loaded or loaded once by the `ModelPool`) wrapped in
`harness.MixatLM`, with the same `harness.evaluate_tasks` call as `python -m mixat_jax.lm_eval`.
It writes `OUT/lm_eval.json`: the harness's results dict plus `fingerprint` (what the result is
keyed on: `fingerprints.lm_eval_fingerprint`, the target + adapter content and the task settings)
and `model_fingerprints` (target, adapter). A re-run whose fingerprint matches reads the file and
runs nothing (no model load); any change re-runs every task. `summarize` turns the results into
the rows of the report's "Utility (lm-evaluation-harness <version>)" table (`report.py`).
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Callable, Mapping
from typing import Any

from mixat_jax.evaluation.cache import write_json_atomic
from mixat_jax.evaluation.fingerprints import lm_eval_fingerprint
from mixat_jax.evaluation.models import ModelPool
from mixat_jax.evaluation.run_config import Resolved, lm_eval_tasks

REPORTED_METRICS = ("acc", "acc_norm")
LOGLIKELIHOOD_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling")
LOGLIKELIHOOD_JUDGE = "lm-evaluation-harness log-likelihood scoring"
TASK_METRIC_JUDGE = "lm-evaluation-harness task metrics (generated answers)"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def summarize(results: Mapping[str, Any]) -> dict[str, Any]:
    """Report rows of a harness results dict: one per (requested task, metric) with acc /
    acc_norm (else every numeric metric), value, stderr (None when the harness gives 'N/A'),
    n-shot; plus the harness version and the judge that produced the numbers."""
    per_task = results.get("results", {})
    requested = [t for t in results.get("requested_tasks", []) if t in per_task] or list(per_task)
    rows = []
    for task in requested:
        metrics = per_task[task]
        names = [k for k in metrics if k.split(",")[0] in REPORTED_METRICS] or [
            k
            for k in metrics
            if "," in k and "_stderr" not in k and _number(metrics[k]) is not None
        ]
        for key in names:
            metric, _, filt = key.partition(",")
            rows.append(
                {
                    "task": task,
                    "metric": metric if filt in ("", "none") else f"{metric} ({filt})",
                    "value": _number(metrics[key]),
                    "stderr": _number(metrics.get(f"{metric}_stderr,{filt}")),
                    "n_shot": results.get("n-shot", {}).get(task),
                }
            )
    types = {str(c.get("output_type")) for c in results.get("configs", {}).values()}
    judge = LOGLIKELIHOOD_JUDGE if types <= set(LOGLIKELIHOOD_TYPES) else TASK_METRIC_JUDGE
    return {
        "version": results.get("lm_eval_version"),
        "judge": judge,
        "file": "lm_eval.json",
        "rows": rows,
    }


def run_harness_stage(res: Resolved, pool: ModelPool, log: Callable[[str], None]) -> dict[str, Any]:
    """Run (or reuse) the configured harness tasks; returns `summarize` of OUT/lm_eval.json."""
    c, path = res.cfg, res.workdir / "lm_eval.json"
    b, tasks = c.lm_eval, lm_eval_tasks(c)
    fp = lm_eval_fingerprint(res)
    if path.is_file():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            cached = {}
        if cached.get("fingerprint") == fp:
            log(f"lm-eval {','.join(tasks)}: cached in {path.name} (same model and settings)")
            return summarize(cached)
    # lazy: lm-eval is an optional dependency, imported only when tasks are configured
    from lm_eval import utils as harness_utils

    # lazy: needs the optional lm-eval
    from mixat_jax.evaluation.harness import MixatLM, evaluate_tasks, task_manager

    manager = task_manager(tasks, str(b.include_path) or None)  # unknown tasks: before loading
    gen = pool.target
    saved = (gen.batch_size, gen.max_prompt_tokens)
    log(f"lm-eval {','.join(tasks)}: {int(b.num_fewshot)}-shot on the target")
    try:
        lm = MixatLM(generator=gen, batch_size=int(b.batch_size), max_length=int(b.max_length))
        results = evaluate_tasks(
            lm,
            tasks,
            manager=manager,
            num_fewshot=int(b.num_fewshot),
            limit=int(b.limit) or None,
            seed=int(b.seed),
        )
    finally:  # the generator is shared with the other stages
        gen.batch_size, gen.max_prompt_tokens = saved
    results["config"]["model"] = "mixat_jax"
    results["config"]["model_args"] = {"model": str(c.model), "adapter": str(c.adapter)}
    payload = json.loads(json.dumps(results, default=harness_utils.handle_non_serializable))
    payload["requested_tasks"] = tasks
    payload["lm_eval_version"] = importlib.metadata.version("lm_eval")
    payload["fingerprint"] = fp
    models = {"target": str(c.model), **({"adapter": str(c.adapter)} if c.adapter else {})}
    payload["model_fingerprints"] = {r: dict(res.content.model(p)) for r, p in models.items()}
    write_json_atomic(path, payload)
    return summarize(payload)
