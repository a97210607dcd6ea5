"""The robustness + utility evaluation pipeline behind `python -m mixat_jax.evaluate`.

Implements the MixAT evaluation protocol (spec mixat.md §8: HarmBench behaviours, the attack
suite, greedy completions with the chat template, judging, per-attack ASR and ALO-ASR, XSTest and
multiple-choice utility) and DAT's (dat.md §4, §6: past tense, translation, StrongREJECT judge),
as resumable stages in one work directory:

1. behaviours (`mixat_jax.behaviors`: HarmBench / JailbreakBench / StrongREJECT / AdvBench
   CSVs, a `datasets` id, or a small built-in list), subset preset and limit;
2. test cases per attack (`suite.py`), cached in `OUT/test_cases.jsonl`;
3. completions from the target model (batched JAX generation, greedy unless an attack block
   sets `gen_temperature`), cached in `OUT/cache/generations.jsonl`;
4. judgements, cached in `OUT/cache/judgements.jsonl`;
5. `OUT/completions.jsonl` (behaviour id, attack, test case, completion, judge, label),
   `OUT/alo_asr.json`, `OUT/report.md`, `OUT/alo_asr.png`, optional `OUT/utility.json`;
   XSTest / HarmLess (#13): completions cached in `OUT/cache/{xstest,harmless}.jsonl`, the
   `utility_judge`'s labels in `OUT/cache/{xstest,harmless}_judgements.jsonl`, per-prompt rows
   in `OUT/xstest.jsonl` / `OUT/harmless.jsonl`; lm-evaluation-harness tasks (`config.lm_eval`,
   #13, `harness_stage.py`) in `OUT/lm_eval.json`, keyed on the target's content and the task
   settings (an unchanged re-run runs nothing).

Every check of user input (files, attack blocks, judge model, helper models) runs in `resolve`
(`run_config.py`) before any model is loaded or any attack runs; `Evaluation` (`stages.py`) runs
the stages, `outputs.py` writes the files. Deliberate choices over the reference
(spec §11.21): missing (attack, behaviour) pairs are listed, never silently skipped; all
HumanJailbreaks templates are used; the judge is recorded in every output record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TextIO

import ml_collections

from mixat_jax.evaluation.models import ModelPool, build_judge
from mixat_jax.evaluation.outputs import run_manifest, write_utility_report
from mixat_jax.evaluation.progress import ENV_INTERRUPT, SimulatedInterrupt
from mixat_jax.evaluation.run_config import (
    BUILTIN_BEHAVIORS,
    JUDGES,
    MODEL_JUDGES,
    TARGET_ALIAS,
    Resolved,
    base_config,
    default_target,
    judge_name,
    resolve,
)
from mixat_jax.evaluation.stages import Evaluation

__all__ = [
    "BUILTIN_BEHAVIORS",
    "ENV_INTERRUPT",
    "JUDGES",
    "MODEL_JUDGES",
    "TARGET_ALIAS",
    "Evaluation",
    "ModelPool",
    "Resolved",
    "SimulatedInterrupt",
    "base_config",
    "build_judge",
    "default_target",
    "judge_name",
    "resolve",
    "run",
    "run_manifest",
    "write_utility_report",
]


def run(
    cfg: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    target: Any | None = None,
    interrupt: str | None = None,
    stream: TextIO | None = None,
) -> dict[str, Any]:
    """Resolve and run an evaluation (see module docstring); returns ALO-ASR, utility, stats."""
    res = resolve(cfg, workdir)
    return Evaluation(res, target=target, interrupt=interrupt, stream=stream).run()
