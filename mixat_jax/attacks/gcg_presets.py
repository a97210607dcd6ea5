"""`GCGConfig` and the named GCG presets (spec mixat.md §6.4, peers.md §1–§2).

Presets:
  * ``nanogcg``: nanoGCG 0.3.0 defaults — 250 steps, "x"×20 init, width 512, top-k 256, one swap
    per candidate at a random position, the step's best candidate always replaces the current
    suffix (nanoGCG's ``buffer_size=0``), best-over-steps reported.
  * ``harmbench``: HarmBench GCG — 500 steps, "! "×20 init, width 512, top-k 256, one swap at
    evenly spread positions, HarmBench's candidate filter (``filter_mode="harmbench"``), always
    accept the step's argmin, refusal check (32 greedy tokens) every 50 steps once the loss is
    below 0.05.
  * ``mixat_train``: the MixAT training variant of ``harmbench`` (100 steps; the last step's suffix
    is the training test case).

Retokenisation filter (``filter_ids``, issue #17), two modes:
  * ``filter_mode="topm"`` (default, ``nanogcg``, ``mixat_train``): the ``filter_topm`` lowest-loss
    candidates are checked in loss order *in the full prompt context* (decode the suffix, render
    the prompt, re-encode: same ids); the first that passes is taken; when none of them passes,
    the suffix is left unchanged for that step.
  * ``filter_mode="harmbench"`` (``harmbench`` preset): HarmBench ``gcg.py``: the *whole*
    candidate set is filtered with HarmBench's check (the suffix decoded and re-encoded on its
    own, no special tokens) and the argmin of the survivors is taken; when every candidate fails,
    all are kept (the overall argmin is taken, unchecked).

Deliberate default (no preset): ``accept_worse=False`` keeps the best suffix found so far (never
accepts a worse candidate), which with ``buffer_size=0`` equals nanoGCG's ``buffer_size=1``.
"""

from __future__ import annotations

import dataclasses

POSITIONS = ("random", "spread")
FILTER_MODES = ("topm", "harmbench")
PROBE_FILTERS = ("mask", "switch")


@dataclasses.dataclass(frozen=True)
class GCGConfig:
    """GCG hyper-parameters (names follow nanoGCG / HarmBench)."""

    num_steps: int = 250
    optim_str_init: str = " ".join(["x"] * 20)
    suffix_len: int | None = None  # if set, the init must tokenise to exactly this many tokens
    search_width: int = 512
    topk: int = 256
    n_replace: int = 1
    positions: str = "random"  # "random" (nanoGCG) | "spread" (HarmBench arange)
    batch_size: int | None = None  # candidates per forward chunk (lax.map); None = search_width
    buffer_size: int = 0
    accept_worse: bool = False  # True: the step's best candidate always replaces the suffix
    use_mellowmax: bool = False
    mellowmax_alpha: float = 1.0
    early_stop: bool = False  # stop once every target token is the argmax
    allow_non_ascii: bool = False
    filter_ids: bool = True  # retokenisation check in the full prompt context
    filter_topm: int = 16  # best candidates checked per step (first that passes is taken)
    filter_mode: str = "topm"  # "topm" | "harmbench" (module docstring)
    add_space_before_target: bool = False
    check_refusal: bool = False
    eval_steps: int = 50
    check_refusal_min_loss: float = 0.05
    refusal_max_new_tokens: int = 32
    system_prompt: str | None = None
    max_seq_len: int = 1024  # budget for prompt + suffix + target tokens
    length_multiple: int = 16  # pad prefix/rest lengths to this (fewer recompiles across calls)
    # Suffix-prefix reuse (exact: same losses up to float rounding, fewer FLOPs). A candidate
    # whose first swapped position is p shares the current suffix's first p tokens, cached once
    # per step. "spread" positions (known at trace time): candidates grouped into
    # ``prefix_buckets`` static buckets by p. "random" positions (one behaviour per call):
    # candidates sorted by p on device, chunks (at most search_width / (2 * reuse_levels) each)
    # run from the largest of ``reuse_levels`` evenly spaced prefix lengths <= their smallest p,
    # one compiled branch per level. More levels: more reuse, longer compile.
    reuse_suffix_prefix: bool = True
    prefix_buckets: int = 4
    reuse_levels: int = 8
    # Probe sampling (Zhao et al. 2024; nanoGCG 0.3.0 ProbeSamplingConfig; ``gcg_probe``), off
    # while ``probe_draft`` is "": a draft sharing the target's tokenizer (a local model
    # directory / GGUF file, or "@target" = the attacked model) scores every candidate, the
    # target a probe set of search_width // probe_sampling_factor and the draft's best
    # max(1, floor((1 - alpha) * search_width / probe_r)) (alpha = (1 + Spearman rho) / 2).
    # ``probe_draft_layers`` > 0 keeps the draft's first N layers (a truncated-layer draft).
    # ``probe_filter``: the data-dependent filtered set as a "mask" over its largest size or
    # "switch" between ``probe_filter_sizes`` compiled sizes (one behaviour per call; with
    # several behaviours the step is vmapped and uses the mask).
    probe_draft: str = ""
    probe_draft_layers: int = 0
    probe_r: float = 8.0
    probe_sampling_factor: int = 16
    probe_filter: str = "switch"  # measured faster (bench/gcg_probe_vs_nanogcg.py, issue #14)
    probe_filter_sizes: int = 4

    def __post_init__(self):
        positive = ("num_steps", "search_width", "topk", "n_replace", "filter_topm", "eval_steps")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"GCGConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.positions not in POSITIONS:
            raise ValueError(
                f"GCGConfig.positions must be one of {POSITIONS}, got {self.positions!r}"
            )
        if self.filter_mode not in FILTER_MODES:
            raise ValueError(
                f"GCGConfig.filter_mode must be one of {FILTER_MODES}, got {self.filter_mode!r}"
            )
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"GCGConfig.batch_size must be >= 1 or None, got {self.batch_size}")
        if self.buffer_size < 0:
            raise ValueError(f"GCGConfig.buffer_size must be >= 0, got {self.buffer_size}")
        if self.accept_worse and self.buffer_size > 1:
            raise ValueError("accept_worse=True needs buffer_size <= 1 (a buffer keeps the best)")
        if self.suffix_len is not None and self.suffix_len < 1:
            raise ValueError(f"GCGConfig.suffix_len must be >= 1 or None, got {self.suffix_len}")
        if self.mellowmax_alpha <= 0:
            raise ValueError(f"mellowmax_alpha must be > 0, got {self.mellowmax_alpha}")
        if not self.optim_str_init:
            raise ValueError("GCGConfig.optim_str_init is empty; give the initial string")
        if self.prefix_buckets < 1 or self.reuse_levels < 1:
            raise ValueError(
                "GCGConfig.prefix_buckets and reuse_levels must be >= 1, got "
                f"{self.prefix_buckets} and {self.reuse_levels}"
            )
        if self.probe_filter not in PROBE_FILTERS:
            raise ValueError(
                f"GCGConfig.probe_filter must be one of {PROBE_FILTERS}, got {self.probe_filter!r}"
            )
        if self.probe_r <= 0 or self.probe_sampling_factor < 1 or self.probe_filter_sizes < 1:
            raise ValueError(
                "GCGConfig.probe_r must be > 0 and probe_sampling_factor, probe_filter_sizes >= 1"
            )
        if self.probe_draft_layers < 0:
            raise ValueError(
                f"GCGConfig.probe_draft_layers must be >= 0, got {self.probe_draft_layers}"
            )
        if self.probe_draft and self.search_width // self.probe_sampling_factor < 2:
            raise ValueError(
                f"probe sampling needs search_width // probe_sampling_factor >= 2 (a probe set "
                f"to rank); got {self.search_width} // {self.probe_sampling_factor}"
            )
        if self.max_seq_len < 2 or self.length_multiple < 1:
            raise ValueError("GCGConfig.max_seq_len must be >= 2 and length_multiple >= 1")

    def replace(self, **changes) -> GCGConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, GCGConfig] = {
    "nanogcg": GCGConfig(accept_worse=True),
    "harmbench": GCGConfig(
        num_steps=500,
        optim_str_init=" ".join(["!"] * 20),
        positions="spread",
        filter_mode="harmbench",
        accept_worse=True,
        check_refusal=True,
    ),
    "mixat_train": GCGConfig(
        num_steps=100,
        optim_str_init=" ".join(["!"] * 20),
        positions="spread",
        accept_worse=True,
        check_refusal=True,
    ),
}


def preset(name: str, **overrides) -> GCGConfig:
    """A named preset with field overrides, e.g. ``preset("harmbench", num_steps=10)``."""
    if name not in PRESETS:
        raise ValueError(f"unknown GCG preset {name!r}; use one of {sorted(PRESETS)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(GCGConfig)}
    if unknown:
        raise ValueError(f"unknown GCGConfig fields: {sorted(unknown)}")
    return PRESETS[name].replace(**overrides)
