"""Shared training-config fields with the reference MixAT hyper-parameters (spec §3.1, §5, §7).

Every ``configs/*_mixat.py`` / ``cat.py`` / ``discrete_only.py`` / ``tiny.py`` starts from
:func:`base_config` and changes only what the reference configs change (model, chat template via
the tokenizer, schedule). Field names keep the reference's names (``eps``, ``iters``,
``away_weight``, ``toward_cutoff``, ...). ``""`` / ``0`` mean "not set".

Reference data files (HarmBench adversarial-training split) are looked up in
``$MIXAT_DATA_DIR`` (default ``data/harmbench``); UltraChat comes from the ``datasets`` hub id
unless ``--config.data.utility`` names a local file.
"""

from __future__ import annotations

import os

import ml_collections

DATA_DIR = os.environ.get("MIXAT_DATA_DIR", "data/harmbench")


def base_config() -> ml_collections.ConfigDict:
    """All fields, reference values (MixAT, Zephyr-7B-style; the model is left empty)."""
    c = ml_collections.ConfigDict()
    # Model: a local HF directory or hub id (downloaded only because the user named it).
    c.model = ""
    c.dtype = "bfloat16"  # frozen base weights; LoRA, optimizer, delta are fp32 (spec §11.15)
    c.system_prompt = ""  # "" = the chat template's default
    c.remat = True  # jax.checkpoint per decoder block: ~4x less activation memory (bench/results)
    c.tiny_model = ml_collections.ConfigDict({"enabled": False})
    # Run.
    c.variant = "mixat"  # mixat | cat | discrete_only | sft (spec §6.1)
    c.seed = 42
    c.steps = 0  # total optimizer steps; 0 = epochs x micro-batches / grad_accum
    c.epochs = 2
    c.grad_accum = 8  # micro-batches per optimizer step (effective batch 64 rows)
    c.checkpoint_every = 50
    c.keep_checkpoints = 1
    c.stop_after = 0  # debug: exit (with a checkpoint) after this many steps of this process
    c.log_every = 1
    c.compilation_cache_dir = ""  # persistent XLA cache ("" = off)
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    # LoRA (spec §3.1): r 64, alpha 16, dropout 0.1, all linear layers except lm_head.
    c.lora = ml_collections.ConfigDict(
        {"r": 64, "alpha": 16.0, "dropout": 0.1, "targets": "all-linear"}
    )
    # AdamW 2e-4 cosine, wd 1e-3, clip 0.3, warm-up effectively 0 (spec §11.14).
    c.optim = ml_collections.ConfigDict(
        {
            "learning_rate": 2e-4,
            "b1": 0.9,
            "b2": 0.999,
            "adam_epsilon": 1e-8,
            "weight_decay": 1e-3,
            "max_grad_norm": 0.3,
            "warmup_ratio": 0.0,
            "lr_scheduler_type": "cosine",
        }
    )
    # Continuous attack (spec §5): 10 sign steps of 1e-4, eps 0.075 relative to mean ||E_v||.
    c.attack = ml_collections.ConfigDict(
        {
            "eps": 0.075,
            "iters": 10,
            "lr": 1e-4,
            "optimizer": "sign",
            "relative_lr": False,
            "init": "zero",
            "best_iterate": False,
            "dropout": True,  # LoRA dropout in attack passes, as the reference (spec §11.2)
            "max_targets": 0,
        }
    )
    # C-AdvUL (trainer_hparams, spec §4).
    c.loss = ml_collections.ConfigDict(
        {
            "away_weight": 0.5,
            "toward_weight": 0.5,
            "utility_weight": 1.0,
            "away_cutoff": -5.0,
            "toward_cutoff": 0.5,
            "cutoff_slope": 1e-3,
            "away_loss_type": "negative_cross_entropy",
        }
    )
    c.train_dropout = True
    c.adv_max_targets = 0
    # "step": the attacks of all micro-batches of an optimizer step run as one batched call
    # (same δ per row as "microbatch", which attacks one micro-batch at a time: less memory).
    c.attack_batching = "step"
    # Static micro-batch (spec §11.7, §12): 1 adversarial pair + 7 utility rows, L 256 (384 for
    # the adversarial pair so PAP rewrites fit).
    c.batch = ml_collections.ConfigDict(
        {
            "adv_slots": 1,
            "util_slots": 7,
            "max_len": 256,
            "max_len_adv": 384,
            "composition": "fixed",
            "micro_batch_size": 0,
        }
    )
    # Data (spec §2).
    c.data = ml_collections.ConfigDict(
        {
            "source": "harmbench",
            "behaviors": f"{DATA_DIR}/adv_training_behaviors.csv",
            "targets": f"{DATA_DIR}/adv_training_targets.json",
            "safe_responses": f"{DATA_DIR}/adv_training_behaviors_safe_responses.csv",
            "refusal": "Sorry, I can't do that.",
            "split": "train",
            "utility": "HuggingFaceH4/ultrachat_200k",
            "utility_split": "train_sft",
            "utility_limit": 20000,  # the mixture uses a ~8.5k prefix (spec §2.3)
            "max_first_user_chars": 768,
            "utility_train_on": "after_first_response",  # reference masking (spec §11.17)
            "adv_probability": 0.125,
            "interleave_seed": 42,
            "synthetic_seed": 0,
        }
    )
    # Discrete rewrites (spec §6): schedule flags 0 continuous / 1 PAP / 2 GCG per micro-batch.
    c.discrete = ml_collections.ConfigDict(
        {
            "schedule": "uniform50_epoch2",
            "technique_per": "microbatch",  # one PAP technique per micro-batch (reference) | row
            "pap_pool": "data/pap_pool.jsonl",  # python -m mixat_jax.pap_pool ... | "template"
            "num_techniques": 40,
            "template_n_per_technique": 2,
            "gcg": ml_collections.ConfigDict(
                {"preset": "mixat_train", "batch_size": 128, "max_seq_len": 512}
            ),
        }
    )
    return c


# Reference base models (spec §7) and whether the reference ships a MixAT+GCG config for them.
MODELS = {
    "zephyr_7b": ("HuggingFaceH4/zephyr-7b-beta", True),
    "mistral_7b_instruct": ("mistralai/Mistral-7B-Instruct-v0.1", False),
    "llama3_8b": ("meta-llama/Meta-Llama-3-8B-Instruct", True),
    "llama3_1_8b": ("meta-llama/Llama-3.1-8B-Instruct", False),
    "qwen2_5_14b": ("Qwen/Qwen2.5-14B-Instruct", True),
    "qwen2_5_32b": ("Qwen/Qwen2.5-32B-Instruct", False),
}


def model_id(name: str) -> str:
    if name not in MODELS:
        raise ValueError(f"model {name!r} unknown; use one of {sorted(MODELS)}")
    return MODELS[name][0]


def with_gcg(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """MixAT+GCG: 45% PAP, 10% GCG (100 HarmBench steps), 45% continuous only (spec §6.2)."""
    c.discrete.schedule = "uniform45_10_epoch2"
    return c


def mixat_config(name: str, arg: str | None) -> ml_collections.ConfigDict:
    """The reference MixAT config of model ``name``; ``arg == "gcg"`` gives MixAT+GCG (only
    where the reference has one: Zephyr, Llama-3, Qwen2.5-14B)."""
    arg = (arg or "").strip()
    if arg not in ("", "gcg"):
        raise ValueError(f"config argument {arg!r} unknown; use ':gcg' or nothing")
    if arg == "gcg" and not MODELS[name][1]:
        gcg = sorted(k for k, (_, has) in MODELS.items() if has)
        raise ValueError(
            f"the reference has no MixAT+GCG config for {name}; ':gcg' exists for {gcg}"
        )
    c = base_config()
    c.model = model_id(name)
    return with_gcg(c) if arg == "gcg" else c
