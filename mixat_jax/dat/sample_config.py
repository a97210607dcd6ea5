"""Stage A's configuration (DAT spec §2.2): frozen dataclasses whose fields ARE the config keys.

`configs/dat/sample.py` is `config_types.to_config_dict(SampleConfig(...))`; `from_config_dict`
turns a ConfigDict back into a validated `SampleConfig` (unknown keys, wrong types and bad values
are one-line ValueErrors naming the key and the fix, raised before any model or file is read).
Defaults are the paper's values: LLaDA-8B-Base sampler with the Lüdke/AAPL settings, N = 1000
draws and K = 16 kept per behaviour, P = 32, StrongREJECT judge (needs `judge_model`), 256 new
tokens, selection by judge score then target loss. `""` / `0` mean "not set" for optional
strings and counts. `RESUME_FREE_KEYS` may change between a run and its resumption.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from mixat_jax import config_types
from mixat_jax.diffusion.sampler import REMASKING_MODES
from mixat_jax.mesh import MeshConfig

SELECTIONS = ("judge", "likelihood", "low_likelihood")
JUDGES = ("strongreject", "harmbench", "refusal", "keyword")
MODEL_JUDGES = ("strongreject", "harmbench")
DTYPES = ("float32", "bfloat16")
RESUME_FREE_KEYS = ("stop_after_units", "log_every")
LLADA_8B_BASE = "GSAI-ML/LLaDA-8B-Base"
LLAMA3_8B_INSTRUCT = "meta-llama/Meta-Llama-3-8B-Instruct"


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """`config.sampler`: the inpainting sampler (spec §2.2 step 2, the Lüdke/AAPL defaults)."""

    steps: int = 32
    temperature: float = 0.0
    remasking: str = "low_confidence"
    cond_dropout: bool = True
    global_remask_every: int = 8
    global_remask_count: int = 8

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"sampler.steps must be >= 1, got {self.steps}")
        if not self.temperature >= 0.0:
            raise ValueError(f"sampler.temperature must be >= 0, got {self.temperature}")
        if self.remasking not in REMASKING_MODES:
            raise ValueError(
                f"sampler.remasking {self.remasking!r} unknown; use one of "
                f"{'|'.join(REMASKING_MODES)}"
            )
        if self.global_remask_every < 0 or self.global_remask_count < 1:
            raise ValueError(
                "need sampler.global_remask_every >= 0 and sampler.global_remask_count >= 1"
            )


@dataclasses.dataclass(frozen=True)
class TinySpec:
    """`config.tiny` (`configs/dat/sample.py:tiny`): random tiny LLaDA-layout and causal
    checkpoints plus the synthetic world's training behaviours/targets, built at run time into
    `cache_dir` (default `<workdir>/tiny`) and used instead of the model and data paths."""

    vocab_size: int = 384
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 4
    corpus_chars: int = 20_000
    seed: int = 0
    world_seed: int = 0
    cache_dir: str = ""


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """Every Stage A setting (contract: .arch/DAT_BRIEF.md "Stage A")."""

    diffusion_model: str = LLADA_8B_BASE
    target_model: str = LLAMA3_8B_INSTRUCT
    target_adapter: str | None = None
    behaviors: str = ""  # HarmBench-style CSV (BehaviorID, Behavior, ...)
    targets: str = ""  # JSON: BehaviorID -> list of affirmative targets
    limit: int | None = None  # first `limit` behaviours (0 = all)
    num_samples: int = 1000  # N draws per behaviour
    num_selected: int = 16  # K kept per behaviour
    prompt_length: int = 32  # P inpainted tokens
    sampler: SamplerSpec = SamplerSpec()
    answer_prefix: str = "\nAnswer: "
    judge: Literal["strongreject", "harmbench", "refusal", "keyword"] = "strongreject"
    judge_model: str | None = None  # local checkpoint of the strongreject / harmbench judge
    judge_markers: tuple[str, ...] = ()  # keyword judge: "a,b,c"
    judge_threshold: float = 0.5
    max_new_tokens: int = 256
    selection: Literal["judge", "likelihood", "low_likelihood"] = "judge"
    diversity_threshold: float = 0.0  # 0 = off; else drop candidates more similar than this
    seed: int = 0
    batch_size: int = 200  # diffusion rows per sampler call = draws per work unit
    gen_batch_size: int = 50  # target-model rows per generation call
    dtype: str = "bfloat16"
    mesh: MeshConfig = config_types.field(MeshConfig(data=-1, fsdp=1, tensor=1), exclude=("rules",))
    system_prompt: str | None = None
    tiny: TinySpec | None = None
    log_every: int = 1  # progress line every this many units
    stop_after_units: int = 0  # debug: stop (as on a signal) after this many units; 0 = never

    def __post_init__(self) -> None:
        for name in ("num_samples", "num_selected", "prompt_length", "batch_size",
                     "gen_batch_size", "max_new_tokens", "log_every"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_selected > self.num_samples:
            raise ValueError(
                f"num_selected (K={self.num_selected}) exceeds num_samples "
                f"(N={self.num_samples}); keep K <= N"
            )
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0 (0 = all behaviours), got {self.limit}")
        if self.stop_after_units < 0:
            raise ValueError(f"stop_after_units must be >= 0, got {self.stop_after_units}")
        if self.selection not in SELECTIONS:
            raise ValueError(
                f"unknown selection {self.selection!r}; use one of {'|'.join(SELECTIONS)}"
            )
        if self.judge not in JUDGES:
            raise ValueError(f"unknown judge {self.judge!r}; use one of {'|'.join(JUDGES)}")
        if self.judge == "keyword" and not self.judge_markers:
            raise ValueError(
                "judge 'keyword' needs judge_markers (comma-separated strings that mark a "
                "harmful completion)"
            )
        if not 0.0 <= self.judge_threshold <= 1.0:
            raise ValueError(f"judge_threshold must be in [0, 1], got {self.judge_threshold}")
        if not 0.0 <= self.diversity_threshold <= 1.0:
            raise ValueError(
                f"diversity_threshold must be in [0, 1] (0 = off), got {self.diversity_threshold}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} unknown; use one of {'|'.join(DTYPES)}")

    def check_runnable(self) -> None:
        """What a run needs beyond valid values (the reference config leaves the judge model
        to the command line): one-line ValueErrors."""
        if self.judge in MODEL_JUDGES and not self.judge_model:
            raise ValueError(
                f"judge {self.judge!r} needs a judge model: pass --config.judge_model=<local "
                "checkpoint dir>, or use judge=refusal|keyword"
            )
        if self.tiny is None:
            for name in ("diffusion_model", "target_model", "behaviors", "targets"):
                if not getattr(self, name):
                    raise ValueError(
                        f"{name} is required (a path or hub id); set --config.{name}=... or use "
                        "configs/dat/sample.py:tiny"
                    )


def to_config_dict(cfg: SampleConfig):
    """The ConfigDict of a `SampleConfig` (training's "empty" encoding: "" / 0 = not set)."""
    return config_types.to_config_dict(cfg)


def from_config_dict(config) -> SampleConfig:
    """A validated `SampleConfig` from a ConfigDict / nested mapping."""
    return config_types.from_config_dict(SampleConfig, config)


def resume_view(config_json: dict) -> dict:
    """The config keys that must match for a workdir to be resumed (or re-run as a no-op)."""
    return {k: v for k, v in config_json.items() if k not in RESUME_FREE_KEYS}
