"""Judges for jailbreak completions (HarmBench classifier, refusal substrings, rubric, keyword)
and the utility checks' compliance judges (XSTest three classes, HarmLess; `compliance`).

See `base` for the `Judgement` record / `Judge` protocol and `registry.make_judge` for names.
"""

from mixat_jax.judges.base import HARMFUL, SAFE, UNPARSABLE, Judge, Judgement
from mixat_jax.judges.compliance import (
    ModelComplianceJudge,
    StringComplianceJudge,
    parse_harmless_answer,
    parse_xstest_class,
)
from mixat_jax.judges.harmbench_cls import (
    HarmBenchClassifier,
    render_classifier_prompt,
    sanitize_generation,
)
from mixat_jax.judges.refusal import KeywordJudge, RefusalJudge, refusal_substrings
from mixat_jax.judges.registry import JUDGE_NAMES, make_judge
from mixat_jax.judges.strongreject import StrongRejectJudge, parse_rubric

__all__ = [
    "HARMFUL",
    "JUDGE_NAMES",
    "SAFE",
    "UNPARSABLE",
    "HarmBenchClassifier",
    "Judge",
    "Judgement",
    "KeywordJudge",
    "ModelComplianceJudge",
    "RefusalJudge",
    "StringComplianceJudge",
    "StrongRejectJudge",
    "make_judge",
    "parse_harmless_answer",
    "parse_rubric",
    "parse_xstest_class",
    "refusal_substrings",
    "render_classifier_prompt",
    "sanitize_generation",
]
