"""The training run's configuration: frozen dataclasses whose fields ARE the config keys.

``configs/*.py`` start from ``configs/common.base_config()`` = ``config_types.to_config_dict(
RunConfig())``: every key and every reference value (MixAT spec §3.1, §5, §6, §7) is written
once, here or in the library dataclasses this tree reuses (``StepConfig`` with its
``ContinuousAttackConfig`` and ``LossConfig``, ``OptimConfig``, ``BatchLayout``,
``MeshConfig``). How those appear in the ConfigDict is declared at their fields below
(``config_types.field``): ``StepConfig``'s fields are top-level keys (``variant``, ``attack``,
``loss``, ``train_dropout``, ``adv_max_targets``, ``attack_batching``), ``OptimConfig.eps`` /
``.schedule`` are ``adam_epsilon`` / ``lr_scheduler_type`` (the reference's names),
``BatchLayout.max_len_util`` is ``batch.max_len``. ``""`` and ``0`` mean "not set" for optional
strings and counts (``steps=0`` = derive from ``epochs``; ``stop_after=0`` = never);
``tiny_model`` is ``{"enabled": False}`` unless a tiny random checkpoint is requested. The
``dat`` block (:class:`DatSpec`, DAT spec §2.3) is set only with ``variant="dat"`` (Stage A's
``selected.jsonl`` as the adversarial rows; :func:`check_dat`).

:func:`from_config_dict` turns a ConfigDict into a validated ``RunConfig``: unknown keys, wrong
types and bad values are one-line ``ValueError``s, raised before any model or data is touched.

``RESUME_FREE_KEYS`` are the fields a resumed run may change (logging/checkpoint cadence and
debug stops); every other field must equal the workdir's ``config.json`` to resume there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mixat_jax import config_types
from mixat_jax.attacks.gcg_presets import GCGConfig
from mixat_jax.attacks.gcg_presets import preset as gcg_preset
from mixat_jax.mesh import MeshConfig
from mixat_jax.models.config import LoraConfig
from mixat_jax.training import data as data_lib
from mixat_jax.training.batches import BatchLayout
from mixat_jax.training.optim import OptimConfig
from mixat_jax.training.step_config import StepConfig

DATA_SOURCES = ("harmbench", "synthetic")
TECHNIQUE_PER = ("microbatch", "row")
PAP_TEMPLATE = "template"  # discrete.pap_pool value: build template rewrites (no generator model)
NO_DISCRETE_VARIANTS = ("cat", "dat", "sft")
DAT_VARIANT = "dat"
RESUME_FREE_KEYS = (
    "checkpoint_every",
    "keep_checkpoints",
    "stop_after",
    "log_every",
    "compilation_cache_dir",
)
HARMBENCH_DIR = "data/harmbench"  # default of $MIXAT_DATA_DIR (configs/common.py)
HARMBENCH_FILES = {
    "behaviors": "adv_training_behaviors.csv",
    "targets": "adv_training_targets.json",
    "safe_responses": "adv_training_behaviors_safe_responses.csv",
}
_GCG_FIELDS = {f.name for f in dataclasses.fields(GCGConfig)}


def harmbench_paths(data_dir: str) -> dict[str, str]:
    """``config.data`` paths of the HarmBench adversarial-training split in ``data_dir``."""
    return {key: f"{data_dir}/{name}" for key, name in HARMBENCH_FILES.items()}


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
class LoraSpec:
    """``config.lora`` (spec §3.1): ``LoraConfig`` with ``targets`` as written in a config:
    ``"all-linear"`` (every linear layer but lm_head) or ``"q_proj|v_proj"``."""

    r: int = LoraConfig.r
    alpha: float = LoraConfig.alpha
    dropout: float = LoraConfig.dropout
    targets: str = "all-linear"

    def __post_init__(self) -> None:
        self.build()  # LoraConfig.make's checks (rank, target names)

    def build(self) -> LoraConfig:
        return LoraConfig.make(r=self.r, alpha=self.alpha, dropout=self.dropout,
                               targets=self.targets)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Adversarial rows (HarmBench files / dataset ids, or the synthetic world) + utility rows
    (spec §2): UltraChat, a ~8.5k-row prefix of the first 20k rows in the mixture (§2.3),
    trained from the first response on (reference masking, §11.17)."""

    source: str = "harmbench"
    behaviors: str = harmbench_paths(HARMBENCH_DIR)["behaviors"]
    targets: str = harmbench_paths(HARMBENCH_DIR)["targets"]
    safe_responses: str = harmbench_paths(HARMBENCH_DIR)["safe_responses"]
    refusal: str = data_lib.SAFE_RESPONSE
    split: str = "train"
    utility: str = data_lib.ULTRACHAT_ID
    utility_split: str = "train_sft"
    utility_limit: int | None = 20000
    max_first_user_chars: int | None = data_lib.MAX_FIRST_USER_CHARS
    utility_train_on: str = "after_first_response"
    adv_probability: float = data_lib.ADV_PROBABILITY
    interleave_seed: int = data_lib.INTERLEAVE_SEED
    synthetic_seed: int = 0

    def __post_init__(self) -> None:
        if self.source not in DATA_SOURCES:
            raise ValueError(
                f"config.data.source={self.source!r} unknown; use one of {DATA_SOURCES}"
            )
        if self.source == "harmbench" and not (self.behaviors and self.targets):
            raise ValueError(
                "config.data.behaviors and config.data.targets are required for harmbench"
            )


def _gcg(block: Mapping[str, Any]) -> GCGConfig:
    """The ``discrete.gcg`` block: a GCG ``preset`` name plus field overrides."""
    fields = {k: v for k, v in block.items() if k != "preset"}
    unknown = sorted(set(fields) - _GCG_FIELDS)
    if unknown:
        raise ValueError(f"config.discrete.gcg has unknown fields {unknown}")
    fields = {k: (None if v in ("", None) and k in ("batch_size", "system_prompt") else v)
              for k, v in fields.items()}  # fmt: skip
    if fields.get("suffix_len") == 0:
        fields["suffix_len"] = None
    return gcg_preset(str(block.get("preset", "mixat_train")), **fields)


@dataclasses.dataclass(frozen=True)
class DiscreteSpec:
    """Discrete rewrites on the host (spec §6): schedule flags (0 continuous / 1 PAP / 2 GCG
    per micro-batch), PAP pool sampling (one technique per micro-batch, as the reference, or
    per ``row``; ``pap_pool`` from ``python -m mixat_jax.pap_pool`` or ``"template"``), and the
    ``gcg`` block: a GCG preset plus overrides (MixAT+GCG: 100 HarmBench steps)."""

    schedule: str = "uniform50_epoch2"
    technique_per: str = "microbatch"
    pap_pool: str = "data/pap_pool.jsonl"
    num_techniques: int = 40
    template_n_per_technique: int = 2
    gcg: dict[str, Any] = dataclasses.field(
        default_factory=lambda: {"preset": "mixat_train", "batch_size": 128, "max_seq_len": 512}
    )

    def __post_init__(self) -> None:
        if self.technique_per not in TECHNIQUE_PER:
            raise ValueError(
                f"config.discrete.technique_per={self.technique_per!r}; use one of {TECHNIQUE_PER}"
            )
        if not 1 <= self.num_techniques <= 40:
            raise ValueError(f"config.discrete.num_techniques must be in [1, 40]; got "
                             f"{self.num_techniques}")  # fmt: skip
        self.gcg_config  # noqa: B018 (validates the block)

    @property
    def gcg_config(self) -> GCGConfig:
        return _gcg(self.gcg)


@dataclasses.dataclass(frozen=True)
class DatSpec:
    """DAT Stage B (DAT spec §2.2 step 6, §2.3): the adversarial rows are Stage A's selected
    prompts (``python -m mixat_jax.dat_sample`` writes ``OUT/selected.jsonl``), each an
    ``AdvRow(behavior_id, <inpainted prompt>, target, <refusal of the original behaviour>)``.

    ``selected``: that file (required by ``variant="dat"``, an error with any other variant);
    ``include_original``: also keep the configured adversarial rows (HarmBench files or the
    synthetic world) next to the selected ones (default: the selected prompts replace them, as
    the paper's enlarged set of 16 per behaviour does).

    Re-selection ablation (§2.2 "Periodic refresh", not in the paper; off by default):
    ``reselect_every_epoch`` re-scores ``candidates`` (Stage A's ``samples.jsonl``; ``""`` = the
    one next to ``selected``) at the start of every epoch e >= 1 by teacher-forced target loss
    under the current parameters and keeps, per behaviour, as many lowest-loss candidates as
    ``selected`` holds for it (so every epoch has the same rows count and micro-batch plan); the
    set is written to ``WORKDIR/dat_reselect/epoch_{e}.jsonl`` before use and re-read on resume.
    ``reselect_batch_size``: candidate rows per scoring call (a multiple of the data-parallel
    device count).
    """

    selected: str = ""
    include_original: bool = False
    reselect_every_epoch: bool = False
    candidates: str = ""
    reselect_batch_size: int = 32

    def __post_init__(self) -> None:
        if self.reselect_batch_size < 1:
            raise ValueError(f"reselect_batch_size must be >= 1; got {self.reselect_batch_size}")

    @property
    def candidates_path(self) -> str:
        """Stage A's candidates file: ``candidates`` or ``samples.jsonl`` beside ``selected``."""
        if self.candidates:
            return self.candidates
        return str(Path(self.selected).with_name("samples.jsonl"))


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A training run (reference MixAT values, Zephyr-7B-style; the model is left empty).

    ``dtype``: frozen base weights (LoRA, optimizer and δ are fp32, spec §11.15); ``remat``:
    ``jax.checkpoint`` per decoder block (~4x less activation memory); ``grad_accum``:
    micro-batches per optimizer step (8 x (1 adversarial pair + 7 utility rows) = 64 rows);
    ``stop_after``: debug, exit (with a checkpoint) after this many steps of this process;
    ``compilation_cache_dir``: persistent XLA cache (``""`` = off). The continuous attack runs
    for all micro-batches of a step in one batched call (``attack_batching="step"``).
    """

    model: str = ""  # a local HF directory or hub id (downloaded only because the user named it)
    tiny_model: TinyModelSpec | None = None
    dtype: str = "bfloat16"
    remat: bool = True
    system_prompt: str | None = None  # None: the chat template's default
    seed: int = 42
    steps: int | None = None  # total optimizer steps; None = epochs x micro-batches / grad_accum
    epochs: int = 2
    grad_accum: int = 8
    checkpoint_every: int = 50
    keep_checkpoints: int = 1
    stop_after: int | None = None
    log_every: int = 1
    compilation_cache_dir: str = ""
    mesh: MeshConfig = config_types.field(MeshConfig(), exclude=("rules",))
    lora: LoraSpec = LoraSpec()
    optim: OptimConfig = config_types.field(
        OptimConfig(), rename={"eps": "adam_epsilon", "schedule": "lr_scheduler_type"}
    )
    step: StepConfig = config_types.field(StepConfig(), inline=True, exclude=("pmap_axis_name",))
    batch: BatchLayout = config_types.field(
        BatchLayout(adv_overflow="skip", util_overflow="skip"),
        rename={"max_len_util": "max_len"},
        exclude=("pad_id", "adv_overflow", "util_overflow"),
    )
    data: DataSpec = DataSpec()
    discrete: DiscreteSpec = dataclasses.field(default_factory=DiscreteSpec)
    dat: DatSpec = DatSpec()

    @property
    def variant(self) -> str:
        return self.step.variant


def check_run(cfg: RunConfig) -> None:
    """Run-level checks (across blocks; ``RunConfig()`` alone has no model yet)."""
    if cfg.tiny_model is None and not cfg.model.strip():
        raise ValueError("config.model is empty; pass --config.model=DIR (or a hub id)")
    for name in ("epochs", "grad_accum", "checkpoint_every", "log_every", "keep_checkpoints"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"config.{name} must be >= 1; got {getattr(cfg, name)}")
    if (cfg.steps or 0) < 0 or (cfg.stop_after or 0) < 0:
        raise ValueError("config.steps and config.stop_after must be >= 0 (0 = not set)")
    schedule = cfg.discrete.schedule
    if cfg.variant in NO_DISCRETE_VARIANTS and schedule.lower() not in ("none", "continuous"):
        raise ValueError(
            f"variant {cfg.variant!r} runs no discrete attack but discrete.schedule="
            f"{schedule!r}; set --config.discrete.schedule=none"
        )
    check_dat(cfg)


def check_dat(cfg: RunConfig) -> None:
    """``variant="dat"`` needs ``dat.selected``; a ``dat`` block needs ``variant="dat"``."""
    if cfg.variant == DAT_VARIANT:
        if not cfg.dat.selected.strip():
            raise ValueError(
                "variant 'dat' trains on Stage A's prompts but config.dat.selected is empty; "
                "pass --config.dat.selected=OUT/selected.jsonl (from python -m "
                "mixat_jax.dat_sample --workdir OUT)"
            )
        return
    changed = [f.name for f in dataclasses.fields(DatSpec)
               if getattr(cfg.dat, f.name) != getattr(DatSpec(), f.name)]  # fmt: skip
    if changed:
        raise ValueError(
            f"config.dat.{changed[0]} is set but variant is {cfg.variant!r}; use "
            f"--config.variant=dat to train on Stage A's prompts (or unset config.dat)"
        )


def from_config_dict(c: Any) -> RunConfig:
    """Validated frozen RunConfig from a ConfigDict (or nested plain dict) of configs/*.py."""
    cfg = config_types.from_config_dict(RunConfig, c)
    check_run(cfg)
    return cfg


def resume_view(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config without :data:`RESUME_FREE_KEYS` (what must match to resume a workdir)."""
    return {k: v for k, v in dict(config).items() if k not in RESUME_FREE_KEYS}
