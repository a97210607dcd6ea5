"""Utility-only evaluation (spec mixat.md §8.2): XSTest over-refusal (+ optional multiple choice).

    python -m mixat_jax.evaluate --config configs/eval/xstest.py --config.model=DIR \
        [--config.adapter=LORA_DIR] --config.xstest=xstest_v2_prompts.csv \
        [--config.mc=cais/mmlu --config.mc_config=all] --workdir OUT

XSTest v2 (`--config.xstest=xstest_v2` = the packaged 450 prompts, or a CSV path), greedy
completions of 512 new tokens, classified per split (250 safe, 200 unsafe contrast prompts) into
full compliance / full refusal / partial refusal. Judge (`utility_judge`, recorded in
utility.json): the refusal-substring fallback by default (compliance / refusal only), or the
reference prompt on a local chat model with `--config.utility_judge.kind=model
--config.utility_judge.model=DIR`. `--config.harmless=mixat` adds MixAT's HarmLess answered rate.
Multiple choice: log-likelihood accuracy (lm-evaluation-harness 0-shot format).
"""

from mixat_jax.evaluation.run_config import base_config


def get_config():
    c = base_config()
    c.attacks = ""
    c.max_new_tokens = 512
    return c
