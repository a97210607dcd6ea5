"""Tiny evaluation suite: every attack with minimal budgets, for tests and automation.

    python -m mixat_jax.evaluate --config configs/eval/tiny.py --config.model=DIR --workdir OUT

Runs DirectRequest, HumanJailbreaks, PAP, GCG, PAIR, TAP, AutoDAN, PastTense, Translation and
the continuous embedding attack and BoN on 2 built-in behaviours (no data files needed), 8 new tokens,
refusal-substring judge. Attacker, scorer, mutator, rewriter, reformulator and translator models
default to the target model itself (override with --config.<role>_model=DIR). The Inpainting
attack has tiny budgets here too but needs a masked-diffusion model, so it is not in the default
list: add it with `--config.attacks=...,Inpainting --config.diffusion_model=DIR` (a tiny one:
`python -m mixat_jax.tiny_model --layout llada --out DIR`).
"""

from mixat_jax.evaluation.run_config import base_config


def get_config():
    c = base_config()
    c.attacks = "DirectRequest,HumanJailbreaks,PAP,GCG,PAIR,TAP,AutoDAN,PastTense,Translation,Continuous,BoN"
    c.limit = 2
    c.max_new_tokens = 8
    c.gen_batch_size = 4
    c.gen_length_multiple = 256
    c.helpers_default_to_target = True
    c.judge = "refusal"
    c.n_bootstrap = 200
    a = c.attack
    # The project's short templates keep prompts tiny (HarmBench's are ~2k characters each).
    a.HumanJailbreaks.update({"template_set": "project", "num_templates": 2})
    a.PAP.update({"num_techniques": 2, "max_new_tokens": 8, "max_retries": 0, "n_per_technique": 1})
    a.GCG.update(
        {"preset": "harmbench", "num_steps": 2, "search_width": 16, "topk": 16, "behaviors_per_run": 2,
         "optim_str_init": "! ! ! !", "filter_topm": 4, "max_seq_len": 512}
    )  # fmt: skip
    a.PAIR.update(
        {"n_streams": 1, "n_steps": 1, "attack_max_new_tokens": 8, "max_retries": 0,
         "target_max_new_tokens": 8, "scorer_max_new_tokens": 8}
    )  # fmt: skip
    a.TAP.update(
        {"depth": 1, "width": 1, "branching_factor": 1, "attack_max_new_tokens": 8,
         "max_retries": 0, "target_max_new_tokens": 8, "scorer_max_new_tokens": 8}
    )  # fmt: skip
    a.AutoDAN.update(
        {"num_steps": 2, "population_size": 4, "mutator_max_new_tokens": 8,
         "target_max_new_tokens": 8, "num_templates": 2}
    )  # fmt: skip
    a.PastTense.update({"n_rewrites": 2, "max_new_tokens": 8, "max_retries": 0})
    a.Translation.update(
        {"languages": "French,Zulu", "max_rewrites": 2, "max_new_tokens": 8, "max_retries": 0,
         "back_translate_max_new_tokens": 8}
    )  # fmt: skip
    a.Continuous.update({"iters": 2, "eps": 0.075, "lr": 1e-4})
    a.BoN.update({"n_augmentations": 2})
    a.Inpainting.update({"num_samples": 3, "prompt_length": 8, "steps": 8, "batch_size": 8})
    return c
