"""MixAT evaluation protocol (spec mixat.md §8.1): 40 HarmBench behaviours × 7 attacks.

    python -m mixat_jax.evaluate --config configs/eval/mixat.py \
        --config.model=DIR [--config.adapter=LORA_DIR] \
        --config.behaviors=harmbench_behaviors_text_test.csv \
        --config.targets=harmbench_targets_text.json \
        --config.judge_model=HarmBench-Llama-2-13b-cls_DIR \
        --config.attacker_model=DIR --config.scorer_model=DIR \
        --config.mutator_model=DIR --config.rewriter_model=DIR --workdir OUT

Behaviours: the fixed 40-behaviour subset (`subset=mixat40`) of the HarmBench test split; use
`--config.subset=no_copyright` for the 240-behaviour RUN_ALL set. Attacks: DirectRequest,
PAP (10 techniques -> 10 test cases; T 1.0, top-p 0.7, top-k 50, <= 2,048 new tokens as in
HarmBench's PAP config), TAP (depth 3, width 3, branching 4), PAIR (20 streams x 3 steps),
AutoDAN (AutoDAN-HGA: 100 steps, population 64, AutoDAN's reference initial prompt, word-level
synonym crossover; see attacks/autodan.py for what differs), GCG (HarmBench preset, 500 steps,
width 512, 20-token "! " init, HarmBench's candidate filter) and HumanJailbreaks (HarmBench's
own 114 templates, all of them; the project's 11 are an opt-in extra:
`--config.attack.HumanJailbreaks.template_set=harmbench+project`). Judge: the HarmBench
classifier; greedy completions of 512 new tokens. The reference used Mixtral-8x7B as PAIR/TAP
attacker, GPT-4o as their judge and Mistral-7B-Instruct-v0.2 as the AutoDAN mutator: here all
are local models (`--config.<role>_model=DIR`, or '@target' for the target itself).

Utility (spec §8.2, issue #13): XSTest v2 (the packaged 450 prompts, greedy, 512 new tokens)
in the reference's three classes and MixAT's HarmLess (the packaged 40 prompts, greedy, 1,000 new
tokens, no system prompt), both judged by a local chat model with the reference prompts
(`--config.utility_judge.model=DIR`; the reference used Meta-Llama-3-8B-Instruct for HarmLess and
GPT-4 for XSTest, 16 / 4 judge tokens). Without a judge model:
`--config.utility_judge.kind=string` (refusal substrings; no partial-refusal class).
ARC-Easy, ARC-Challenge and MMLU (spec §8.2, dat.md §4.4: lm-evaluation-harness, default 0-shot
task configs, accuracy) run on the target + adapter through the harness (`config.lm_eval`;
needs `pip install 'lm-eval>=0.4.9'` and the hub datasets, or `--config.lm_eval.tasks=''`).
"""

from mixat_jax.evaluation.run_config import base_config


def get_config():
    c = base_config()
    c.allow_builtin_behaviors = False
    c.subset = "mixat40"
    c.attacks = "DirectRequest,PAP,TAP,PAIR,AutoDAN,GCG,HumanJailbreaks"
    c.max_new_tokens = 512
    c.judge = "harmbench"
    c.helpers_default_to_target = False
    c.xstest = "xstest_v2"
    c.harmless = "mixat"
    c.harmless_max_new_tokens = 1000
    c.utility_judge.kind = "model"
    c.lm_eval.tasks = "arc_easy,arc_challenge,mmlu"
    c.lm_eval.num_fewshot = 0
    a = c.attack
    a.PAP.update({"num_techniques": 10, "max_new_tokens": 2048, "top_k": 50, "top_p": 0.7})
    a.TAP.update({"depth": 3, "width": 3, "branching_factor": 4})
    a.PAIR.update({"n_streams": 20, "n_steps": 3})
    a.AutoDAN.update(
        {"num_steps": 100, "population_size": 64, "initial": "autodan", "word_level": True}
    )
    a.GCG.update(
        {"preset": "harmbench", "num_steps": 500, "search_width": 512, "filter_mode": "harmbench"}
    )
    a.HumanJailbreaks.update({"template_set": "harmbench", "num_templates": 0})
    return c
