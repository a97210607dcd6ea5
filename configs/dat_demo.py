"""Embedded CPU demo of DAT (DAT spec dat.md §1–§2) on the synthetic safety world.

    python -m mixat_jax.train --config configs/dat_demo.py --workdir runs/dat_demo
                                                                    # DAT and CAT, same budget
    python -m mixat_jax.train --config configs/dat_demo.py:compare --workdir runs/dat_demo_compare
                                                                    # + MixAT

No downloads. The unsafe tiny base chat model (`mixat_jax/demo/assets/base`) and a tiny
LLaDA-style masked-diffusion surrogate of the world's request/response distribution
(`mixat_jax/demo/assets/surrogate`, regenerate with `python -m mixat_jax.demo.surrogate --out DIR`;
`--config.demo.rebuild_surrogate=True` trains it into the workdir) ship with the package. Stages
(`mixat_jax.demo.dat_run`): Stage A against the base on the world's training behaviours (N
inpainted prompts each, keyword judge, K kept), DAT training on the selected prompts and CAT on
the original behaviours with the MixAT demo's steps / LoRA / attack budget, and the MixAT demo's
measurement (DirectRequest, HumanJailbreaks-style templates, GCG, continuous) plus the Inpainting
attack (surrogate prompts for the held-out behaviours' targets) on 16 held-out behaviours (4
held-out topics x 4 held-out phrasings), with bootstrap CIs, and benign accuracy. Outputs:
report.json (alo_asr_before/after, utility_before/after, inpainting_asr_before/after, per-model
per-attack ASRs with CIs, training curves, stage timings), report.md, report_asr.png,
report_training.png, and each stage's own directory.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs.demo import get_config as mixat_demo_config  # noqa: E402


def get_config(arg=None):
    arg = (arg or "").strip()
    if arg not in ("", "compare"):
        raise ValueError(f"configs/dat_demo.py argument {arg!r} unknown; use '' or 'compare'")
    c = mixat_demo_config()  # the MixAT demo's model, steps, LoRA, batch and attack budget
    c.demo.update(
        {
            "kind": "dat",
            "workdir": "runs/dat_demo" if not arg else "runs/dat_demo_compare",
            "variants": "dat,cat" if not arg else "dat,cat,mixat",
            # the diffusion surrogate (shipped; or trained into the workdir)
            "rebuild_surrogate": False,
            "surrogate_steps": 1500,
            # Stage A (N inpainted prompts per training behaviour, K kept; P-token prompt span)
            "stage_a_num_samples": 32,
            "stage_a_num_selected": 8,
            "stage_a_limit": 0,  # 0 = all 30 training behaviours
            "stage_a_seed": 0,
            "prompt_length": 32,
            # evaluation: the MixAT demo's attacks + Inpainting (surrogate prompts per held-out
            # behaviour)
            "attacks": "DirectRequest,HumanJailbreaks,GCG,Continuous,Inpainting",
            "inpainting_samples": 16,
        }
    )
    return c
