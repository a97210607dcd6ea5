"""Shared training config: every field with the reference MixAT hyper-parameters (spec §3.1, §5,
§7).

The fields and their reference values are the defaults of the dataclasses in
``mixat_jax/training/run_config.py`` (``RunConfig`` and the blocks it holds; each default is
written once, there): :func:`base_config` is ``config_types.to_config_dict(RunConfig())`` plus
what depends on the environment. Every ``configs/*_mixat.py`` / ``cat.py`` /
``discrete_only.py`` / ``tiny.py`` starts from it and changes only what the reference configs
change (model, chat template via the tokenizer, schedule). Field names keep the reference's
names (``eps``, ``iters``, ``away_weight``, ``toward_cutoff``, ``adam_epsilon``, ...).
``""`` / ``0`` mean "not set".

Reference data files (HarmBench adversarial-training split) are looked up in
``$MIXAT_DATA_DIR`` (default ``data/harmbench``); UltraChat comes from the ``datasets`` hub id
unless ``--config.data.utility`` names a local file.
"""

from __future__ import annotations

import os

import ml_collections

from mixat_jax.config_types import to_config_dict
from mixat_jax.training.run_config import HARMBENCH_DIR, RunConfig, harmbench_paths

DATA_DIR = os.environ.get("MIXAT_DATA_DIR", HARMBENCH_DIR)


def base_config() -> ml_collections.ConfigDict:
    """All fields, reference values (MixAT, Zephyr-7B-style; the model is left empty)."""
    c = to_config_dict(RunConfig())
    c.data.update(harmbench_paths(DATA_DIR))
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


def dat_config(name: str) -> ml_collections.ConfigDict:
    """DAT Stage B on model ``name`` (DAT spec §2.3): CAT's upstream values (``configs/cat.py:
    NAME,upstream``: eps 0.05, 5 epochs, 10 attack steps) with DAT's App. B differences (lr 1e-4,
    bf16, utility weight 0.45; batch 8 = 1 adversarial + 7 utility rows per micro-batch x
    grad-accum 8; max length 256), reading Stage A's ``selected.jsonl`` from
    ``$MIXAT_DAT_SELECTED`` or ``runs/dat_sample_<name>/selected.jsonl``. The provenance of every
    value is in ``configs/dat/<name>.py``."""
    c = base_config()
    c.model = model_id(name)
    c.dtype = "bfloat16"
    c.variant = "dat"
    c.discrete.schedule = "none"
    c.discrete.pap_pool = ""
    c.attack.eps = 0.05
    c.epochs = 5
    c.optim.learning_rate = 1e-4
    c.loss.utility_weight = 0.45
    c.grad_accum = 8
    c.batch.update({"adv_slots": 1, "util_slots": 7, "max_len": 256, "max_len_adv": 256})
    c.dat.selected = os.environ.get("MIXAT_DAT_SELECTED", f"runs/dat_sample_{name}/selected.jsonl")
    return c
