"""Frozen run configuration, built ONCE from the ml_collections ConfigDict (DESIGN.md rule 7).

``from_config_dict(config)`` turns a ``configs/*.py`` ConfigDict (fields and reference values in
``configs/common.py``; MixAT spec §3.1, §5, §6, §7) into nested frozen dataclasses: the library
types that already exist (``MeshConfig``, ``LoraConfig``, ``OptimConfig``, ``StepConfig``,
``BatchLayout``, ``GCGConfig``) plus the run-level specs below. Every user-facing check of a
config value happens here, before any model or data is touched; a bad value is one ``ValueError``.

ConfigDict conventions (as in ``configs/eval``): ``""`` and ``0`` mean "not set" for optional
strings and counts (``steps=0`` = derive from ``epochs``; ``stop_after=0`` = never).

``RESUME_FREE_KEYS`` are the fields a resumed run may change (logging/checkpoint cadence and
debug stops); every other field must equal the workdir's ``config.json`` to resume there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from mixat_jax.attacks.continuous import ContinuousAttackConfig
from mixat_jax.attacks.gcg_presets import GCGConfig
from mixat_jax.attacks.gcg_presets import preset as gcg_preset
from mixat_jax.mesh import MeshConfig
from mixat_jax.models.config import LoraConfig
from mixat_jax.training.batches import BatchLayout
from mixat_jax.training.optim import OptimConfig
from mixat_jax.training.step_config import VARIANTS, LossConfig, StepConfig

DATA_SOURCES = ("harmbench", "synthetic")
TECHNIQUE_PER = ("microbatch", "row")
PAP_TEMPLATE = "template"  # discrete.pap_pool value: build template rewrites (no generator model)
NO_DISCRETE_VARIANTS = ("cat", "sft")
RESUME_FREE_KEYS = (
    "checkpoint_every",
    "keep_checkpoints",
    "stop_after",
    "log_every",
    "compilation_cache_dir",
)
_GCG_FIELDS = {f.name for f in dataclasses.fields(GCGConfig)}


@dataclasses.dataclass(frozen=True)
class TinyModelSpec:
    """A random tiny checkpoint built by ``tiny_model.build_tiny_checkpoint`` (no downloads)."""

    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    seed: int = 0
    cache_dir: str = ""  # "" = <workdir>/tiny_model


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Adversarial rows (HarmBench files / dataset ids, or the synthetic world) + utility rows."""

    source: str = "harmbench"
    behaviors: str = ""
    targets: str = ""
    safe_responses: str = ""
    refusal: str = "Sorry, I can't do that."
    split: str = "train"
    utility: str = "HuggingFaceH4/ultrachat_200k"
    utility_split: str = "train_sft"
    utility_limit: int | None = None
    max_first_user_chars: int | None = 768
    utility_train_on: str = "after_first_response"
    adv_probability: float = 0.125
    interleave_seed: int = 42
    synthetic_seed: int = 0


@dataclasses.dataclass(frozen=True)
class DiscreteSpec:
    """Discrete rewrites on the host (spec §6): schedule, PAP pool sampling, GCG settings."""

    schedule: str = "none"
    technique_per: str = "microbatch"
    pap_pool: str = ""
    num_techniques: int = 40
    template_n_per_technique: int = 2
    gcg: GCGConfig = GCGConfig()


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: str
    tiny: TinyModelSpec | None
    dtype: str
    remat: bool
    system_prompt: str | None
    variant: str
    seed: int
    steps: int | None
    epochs: int
    grad_accum: int
    checkpoint_every: int
    keep_checkpoints: int
    stop_after: int | None
    log_every: int
    compilation_cache_dir: str
    mesh: MeshConfig
    lora: LoraConfig
    optim: OptimConfig
    step: StepConfig
    layout: BatchLayout
    data: DataSpec
    discrete: DiscreteSpec


def _opt_int(x: Any) -> int | None:
    return None if x in (None, 0, "") else int(x)


def _opt_str(x: Any) -> str | None:
    return None if x in (None, "") else str(x)


def _need(c: Mapping[str, Any], *names: str) -> None:
    missing = [n for n in names if n not in c]
    if missing:
        raise ValueError(f"config lacks fields {missing}; start from configs/common.base_config()")


def _gcg(c: Mapping[str, Any]) -> GCGConfig:
    fields = {k: v for k, v in c.items() if k != "preset"}
    unknown = sorted(set(fields) - _GCG_FIELDS)
    if unknown:
        raise ValueError(f"config.discrete.gcg has unknown fields {unknown}")
    fields = {k: (None if v in ("", None) and k in ("batch_size", "system_prompt") else v)
              for k, v in fields.items()}  # fmt: skip
    if fields.get("suffix_len") == 0:
        fields["suffix_len"] = None
    return gcg_preset(str(c.get("preset", "mixat_train")), **fields)


def from_config_dict(c: Mapping[str, Any]) -> RunConfig:
    """Validated frozen RunConfig from a ConfigDict (or nested plain dict) of configs/common.py."""
    c = c.to_dict() if hasattr(c, "to_dict") else dict(c)
    _need(c, "model", "variant", "seed", "steps", "epochs", "grad_accum", "mesh", "lora", "optim",
          "attack", "loss", "batch", "data", "discrete")  # fmt: skip
    variant = str(c["variant"])
    if variant not in VARIANTS:
        raise ValueError(f"config.variant={variant!r} unknown; use one of {VARIANTS}")
    tiny_c = c.get("tiny_model") or {}
    tiny = None
    if tiny_c.get("enabled", False):
        tiny = TinyModelSpec(**{k: v for k, v in tiny_c.items() if k != "enabled"})
    elif not str(c["model"]).strip():
        raise ValueError("config.model is empty; pass --config.model=DIR (or a hub id)")
    for name in ("epochs", "grad_accum", "checkpoint_every", "log_every", "keep_checkpoints"):
        if int(c.get(name, 1)) < 1:
            raise ValueError(f"config.{name} must be >= 1; got {c.get(name)}")
    if int(c["steps"]) < 0 or int(c.get("stop_after", 0)) < 0:
        raise ValueError("config.steps and config.stop_after must be >= 0 (0 = not set)")
    m = c["mesh"]
    mesh = MeshConfig(data=int(m["data"]), fsdp=int(m["fsdp"]), tensor=int(m["tensor"]))
    lo = c["lora"]
    lora = LoraConfig.make(r=lo["r"], alpha=lo["alpha"], dropout=lo["dropout"],
                           targets=lo["targets"])  # fmt: skip
    o = c["optim"]
    optim = OptimConfig(
        learning_rate=float(o["learning_rate"]),
        b1=float(o["b1"]),
        b2=float(o["b2"]),
        eps=float(o["adam_epsilon"]),
        weight_decay=float(o["weight_decay"]),
        max_grad_norm=float(o["max_grad_norm"]),
        warmup_ratio=float(o["warmup_ratio"]),
        schedule=str(o["lr_scheduler_type"]),
    )
    a = c["attack"]
    attack = ContinuousAttackConfig(
        eps=float(a["eps"]),
        iters=int(a["iters"]),
        lr=float(a["lr"]),
        optimizer=str(a["optimizer"]),
        relative_lr=bool(a["relative_lr"]),
        init=str(a["init"]),
        best_iterate=bool(a["best_iterate"]),
        dropout=bool(a["dropout"]),
        max_targets=_opt_int(a.get("max_targets")),
    )
    lc = c["loss"]
    loss = LossConfig(**{k: (str(v) if k == "away_loss_type" else float(v)) for k, v in lc.items()})
    step = StepConfig(
        variant=variant,
        attack=attack,
        loss=loss,
        train_dropout=bool(c.get("train_dropout", True)),
        adv_max_targets=_opt_int(c.get("adv_max_targets")),
        attack_batching=str(c.get("attack_batching", "step")),
    )
    b = c["batch"]
    layout = BatchLayout(
        adv_slots=int(b["adv_slots"]),
        util_slots=int(b["util_slots"]),
        max_len_adv=int(b["max_len_adv"]),
        max_len_util=int(b["max_len"]),
        composition=str(b["composition"]),
        micro_batch_size=_opt_int(b.get("micro_batch_size")),
        adv_overflow="skip",
        util_overflow="skip",
    )
    d = c["data"]
    data = DataSpec(
        source=str(d["source"]),
        behaviors=str(d["behaviors"]),
        targets=str(d["targets"]),
        safe_responses=str(d["safe_responses"]),
        refusal=str(d["refusal"]),
        split=str(d["split"]),
        utility=str(d["utility"]),
        utility_split=str(d["utility_split"]),
        utility_limit=_opt_int(d["utility_limit"]),
        max_first_user_chars=_opt_int(d["max_first_user_chars"]),
        utility_train_on=str(d["utility_train_on"]),
        adv_probability=float(d["adv_probability"]),
        interleave_seed=int(d["interleave_seed"]),
        synthetic_seed=int(d.get("synthetic_seed", 0)),
    )
    if data.source not in DATA_SOURCES:
        raise ValueError(f"config.data.source={data.source!r} unknown; use one of {DATA_SOURCES}")
    if data.source == "harmbench" and not (data.behaviors and data.targets):
        raise ValueError("config.data.behaviors and config.data.targets are required for harmbench")
    ds = c["discrete"]
    discrete = DiscreteSpec(
        schedule=str(ds["schedule"]),
        technique_per=str(ds["technique_per"]),
        pap_pool=str(ds["pap_pool"]),
        num_techniques=int(ds["num_techniques"]),
        template_n_per_technique=int(ds.get("template_n_per_technique", 2)),
        gcg=_gcg(ds["gcg"]),
    )
    if discrete.technique_per not in TECHNIQUE_PER:
        raise ValueError(
            f"config.discrete.technique_per={discrete.technique_per!r}; use one of {TECHNIQUE_PER}"
        )
    if not 1 <= discrete.num_techniques <= 40:
        raise ValueError(f"config.discrete.num_techniques must be in [1, 40]; got "
                         f"{discrete.num_techniques}")  # fmt: skip
    if variant in NO_DISCRETE_VARIANTS and discrete.schedule.lower() not in ("none", "continuous"):
        raise ValueError(
            f"variant {variant!r} runs no discrete attack but discrete.schedule="
            f"{discrete.schedule!r}; set --config.discrete.schedule=none"
        )
    return RunConfig(
        model=str(c["model"]),
        tiny=tiny,
        dtype=str(c.get("dtype", "bfloat16")),
        remat=bool(c.get("remat", False)),
        system_prompt=_opt_str(c.get("system_prompt")),
        variant=variant,
        seed=int(c["seed"]),
        steps=_opt_int(c["steps"]),
        epochs=int(c["epochs"]),
        grad_accum=int(c["grad_accum"]),
        checkpoint_every=int(c["checkpoint_every"]),
        keep_checkpoints=int(c["keep_checkpoints"]),
        stop_after=_opt_int(c.get("stop_after")),
        log_every=int(c["log_every"]),
        compilation_cache_dir=str(c.get("compilation_cache_dir", "")),
        mesh=mesh,
        lora=lora,
        optim=optim,
        step=step,
        layout=layout,
        data=data,
        discrete=discrete,
    )


def resume_view(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config without :data:`RESUME_FREE_KEYS` (what must match to resume a workdir)."""
    return {k: v for k, v in dict(config).items() if k not in RESUME_FREE_KEYS}
