"""Embedded CPU demo: MixAT on a synthetic safety world, robustness measured before and after.

    python -m mixat_jax.train --config configs/demo.py                 # MixAT only (~7 min, 2 cores)
    python -m mixat_jax.train --config configs/demo.py:compare --workdir runs/demo_compare
                                                                        # + CAT and discrete-only

No downloads. The unsafe tiny base chat model ships in `mixat_jax/demo/assets/base` (regenerate it
with `python -m mixat_jax.demo.base --out DIR`; `--config.demo.rebuild_base=True` rebuilds it
into the workdir). The world (`mixat_jax.training.synthetic`): forbidden requests for secrets must
be refused, benign questions (arithmetic, capitals, words) answered. Robustness = ALO-ASR over
held-out forbidden requests under DirectRequest, HumanJailbreaks-style templates, GCG and the
continuous embedding attack, judged by a keyword judge (the secret appears in the completion);
utility = exact-answer accuracy on held-out benign questions. Outputs in the workdir:
report.json (alo_asr_before, alo_asr_after, utility_before, utility_after, per-attack ASRs,
alo_asr_drop and utility_retention with paired-bootstrap ci95, per-variant seed summaries),
report.md, report_asr.png, report_training.png, and each stage's own directory.

Statistics (#17): 32 held-out behaviours (4 held-out topics x 8 phrasings) and all 224 held-out
benign questions; `:compare` trains every variant with `demo.seeds` = 3 seeds (seed, seed+1,
seed+2: LoRA init, attack keys and the mixture's utility rows/order) and reports mean ± std
(ddof=1) [min, max] per variant; the base is measured once. The plain demo is one seed.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs.common import base_config  # noqa: E402


def get_config(arg=None):
    arg = (arg or "").strip()
    if arg not in ("", "compare"):
        raise ValueError(f"configs/demo.py argument {arg!r} unknown; use '' or 'compare'")
    c = base_config()
    c.demo = {
        "workdir": "runs/demo" if not arg else "runs/demo_compare",
        "variants": "mixat" if not arg else "mixat,cat,discrete_only",
        "rebuild_base": False,
        "base_steps": 600,
        # statistics (#17): training seeds per variant (seed, seed+1, ...; the base is measured
        # once), phrasings per held-out topic (4 topics x 8 = 32 held-out behaviours) and the
        # benign questions ("all" 224 held-out ones, or safety_world's "subsample" of 47)
        "seeds": 1 if not arg else 3,
        "heldout_phrasings": 8,
        "benign_questions": "all",
        # evaluation budgets (per held-out behaviour)
        "max_new_tokens": 16,
        "gcg_steps": 20,
        "gcg_width": 64,
        "gcg_topk": 64,
        "gcg_suffix": "! ! ! ! ! !",
        # stop a behaviour's GCG once every target token is the argmax (greedy decoding then
        # prints the target): the unsafe base is broken at step 0, so its GCG costs ~nothing
        "gcg_early_stop": True,
        "continuous_iters": 20,
        "continuous_eps": 0.5,
        "continuous_lr": 0.01,
        "num_templates": 11,
        "n_bootstrap": 1000,
    }
    c.model = ""  # filled by the demo with the shipped (or rebuilt) base checkpoint
    c.dtype = "float32"
    c.remat = False
    c.seed = 0
    c.steps = 150
    c.grad_accum = 1
    c.checkpoint_every = 50
    c.keep_checkpoints = 1
    c.mesh.update({"data": 1, "fsdp": 1, "tensor": 1})
    c.lora.update({"r": 16, "alpha": 32.0, "dropout": 0.05})
    # lr 1e-3 (was 2e-3): benign accuracy retained 97 % on the 224 held-out questions vs 96 %,
    # and 24/47 vs 20/47 on the old subsample (the capital facts kept); #17 sweep in WORKSPACE.
    c.optim.update({"learning_rate": 1e-3, "warmup_ratio": 0.05})
    # Tiny model (d=128): the reference's absolute 1e-4 step would reach only ~1e-3·√d per token,
    # far inside any useful ball (spec §11.5); the demo scales step and radius to the model.
    c.attack.update({"eps": 0.3, "lr": 0.005, "iters": 10, "dropout": True})
    c.batch.update({"adv_slots": 2, "util_slots": 6, "max_len": 64, "max_len_adv": 96})
    c.data.source = "synthetic"
    c.data.behaviors = ""
    c.data.targets = ""
    c.data.safe_responses = ""
    c.data.utility = ""
    c.data.utility_train_on = "assistant"
    c.data.adv_probability = 0.25  # = adv_slots / (adv_slots + util_slots): no adv-free steps
    c.discrete.schedule = "uniform50_epoch2"
    c.discrete.pap_pool = "template"
    return c
