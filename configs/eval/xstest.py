"""Utility-only evaluation (spec mixat.md §8.2): XSTest over-refusal (+ optional multiple choice).

    python -m mixat_jax.evaluate --config configs/eval/xstest.py --config.model=DIR \
        [--config.adapter=LORA_DIR] --config.xstest=xstest_v2_prompts.csv \
        [--config.mc=cais/mmlu --config.mc_config=all] --workdir OUT

Compliance rate on the 250 safe prompts and refusal rate on the 200 unsafe contrast prompts,
judged by the refusal-substring compliance judge (recorded in utility.json); greedy completions
of 512 new tokens. Multiple choice: log-likelihood accuracy (lm-evaluation-harness 0-shot format).
"""

from mixat_jax.evaluation.run_config import base_config


def get_config():
    c = base_config()
    c.attacks = ""
    c.max_new_tokens = 512
    return c
