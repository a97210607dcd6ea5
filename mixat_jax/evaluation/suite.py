"""Attack registry of the evaluation suite: attack kind → (config class, factory) and its plan.

Implements the attack list of the MixAT robustness protocol (spec mixat.md §8.1: DirectRequest,
PAP, TAP, PAIR, AutoDAN, GCG, HumanJailbreaks) and of DAT's (dat.md §4, §6: past tense,
translation, GCG, PAIR, direct, BoN, inpainting), plus the white-box continuous embedding attack
(mixat.md §5) as an evaluation attack. Each entry of `config.attack` is a block
`{kind: <registered kind>, <settings>}`; the settings are the fields of the kind's config
dataclass (`REGISTRY[kind].config`, starting from the protocol's values `REGISTRY[kind].base`;
written and read by `config_types`, unset = placeholder), the kind's evaluation-only `extras` and
the completion settings of `GENERATION_KEYS`.

`plan_attack` validates a block without touching any model (so a typo fails before any attack
runs); `build_attack` calls the kind's factory, which returns the attack object itself: its
`generate_test_cases(behaviors, *, seed) -> {behaviour id: [TestCase or str]}` gives the test
cases (`as_test_cases` turns a `str` into a `TestCase`), and an attack whose spec says
`judge_inputs` also maps completions before judging (`judge_inputs(completions)`).

Helper LLMs (attacker, scorer, mutator, rewriter, reformulator, translator) and the diffusion
model are local models obtained from the `SuiteContext` (`helper(role)`, `diffusion_model()`);
the target model is `SuiteContext.target`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ml_collections import config_dict

from mixat_jax import config_types
from mixat_jax.attacks.autodan import AutoDAN, AutoDANConfig
from mixat_jax.attacks.bon import BoN, BoNConfig
from mixat_jax.attacks.continuous import ContinuousAttackConfig
from mixat_jax.attacks.direct import DirectRequest
from mixat_jax.attacks.gcg_presets import GCGConfig, preset
from mixat_jax.attacks.inpainting import Inpainting, InpaintingConfig
from mixat_jax.attacks.llm_interface import TestCase
from mixat_jax.attacks.pair import PAIR, GeneratorJudge, JudgeConfig, PAIRConfig
from mixat_jax.attacks.pap import PAP, PAPConfig
from mixat_jax.attacks.rewrites import (
    PastTenseAttack,
    PastTenseConfig,
    TranslationAttack,
    TranslationConfig,
)
from mixat_jax.attacks.synonyms import wordnet_synonyms
from mixat_jax.attacks.tap import TAP, TAPConfig
from mixat_jax.attacks.templates import HumanJailbreaks, HumanJailbreaksConfig, builtin_templates
from mixat_jax.evaluation.white_box import GCG_TEST_CASES, ContinuousAttack, GCGAttack, TargetCE

# Completion settings any block may set: sampling instead of greedy decoding, and several
# samples per test case (sampling-aware evaluation, dat.md §4.1 "1000 Direct").
GENERATION_KEYS: dict[str, Any] = {"gen_temperature": 0.0, "gen_top_p": 1.0, "n_samples": 1}

ALL_HELPER_ROLES: tuple[str, ...] = (
    "attacker",
    "scorer",
    "mutator",
    "rewriter",
    "reformulator",
    "translator",
)


class SuiteContext(Protocol):
    """What attack factories need from the pipeline: the target generator, helper generators by
    role, the diffusion model, the target model's generation length and batch size."""

    @property
    def target(self) -> Any: ...

    def helper(self, role: str) -> Any: ...

    def diffusion_model(self) -> tuple[Any, Any]: ...

    @property
    def max_new_tokens(self) -> int: ...

    @property
    def batch_size(self) -> int: ...

    @property
    def system_prompt(self) -> str | None: ...


@dataclass(frozen=True)
class AttackSpec:
    """One registered attack kind.

    `config`: the attack's config dataclass (None: the kind takes no settings); `factory(plan,
    ctx)`: the attack object; `base(extras)`: the config the block's settings are applied to
    (the evaluation protocol's values; default `config()`); `extras`: evaluation-only settings
    and their defaults (`choices` restricts some); `helpers`: helper-model roles (config field
    `<role>_model`); `per_behavior`: one behaviour per attack call (a kill loses at most one
    behaviour's search); `target_dependent`: test cases depend on the target (adaptive /
    white-box); `white_box_completions`: the attack generates the completions itself;
    `judge_inputs`: the attack maps completions before judging; `preset_placeholders`: the
    default block leaves every setting unset (None = the value of the block's preset);
    `diffusion`: needs `--config.diffusion_model` (a masked-diffusion LM).
    """

    config: type | None
    factory: Callable[[AttackPlan, SuiteContext], Any]
    base: Callable[[Mapping[str, Any]], Any] | None = None
    extras: Mapping[str, Any] = field(default_factory=dict)
    choices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    helpers: tuple[str, ...] = ()
    per_behavior: bool = False
    target_dependent: bool = False
    white_box_completions: bool = False
    judge_inputs: bool = False
    preset_placeholders: bool = False
    diffusion: bool = False

    def base_config(self, extras: Mapping[str, Any]) -> Any:
        """The config a block's settings start from."""
        assert self.config is not None
        return self.base(extras) if self.base is not None else self.config()


@dataclass(frozen=True)
class AttackPlan:
    """A validated attack block: `settings` holds the typed config object (`cfg`), the extras
    and the generation keys, all with their defaults filled in."""

    name: str
    kind: str
    settings: dict[str, Any]
    block: dict[str, Any]

    @property
    def spec(self) -> AttackSpec:
        return REGISTRY[self.kind]

    @property
    def helpers(self) -> tuple[str, ...]:
        return self.spec.helpers

    @property
    def chunk_size(self) -> int | None:
        """Behaviours per attack call (None = the pipeline's `behavior_chunk`)."""
        if "behaviors_per_run" in self.settings:
            return max(1, int(self.settings["behaviors_per_run"]))
        return 1 if self.spec.per_behavior else None

    @property
    def white_box_completions(self) -> bool:
        return self.spec.white_box_completions

    @property
    def target_dependent(self) -> bool:
        return self.spec.target_dependent


# ------------------------------------------------------------------------------ factories


def _direct(plan: AttackPlan, ctx: SuiteContext) -> DirectRequest:
    return DirectRequest()


def _bon(plan: AttackPlan, ctx: SuiteContext) -> BoN:
    return BoN(plan.settings["cfg"])


def _human_jailbreaks(plan: AttackPlan, ctx: SuiteContext) -> HumanJailbreaks:
    return HumanJailbreaks(plan.settings["cfg"])


def _pap(plan: AttackPlan, ctx: SuiteContext) -> PAP:
    return PAP(ctx.helper("rewriter"), plan.settings["cfg"])


def _scorer(plan: AttackPlan, ctx: SuiteContext) -> GeneratorJudge:
    tokens = int(plan.settings["scorer_max_new_tokens"])
    jcfg = dataclasses.replace(JudgeConfig(), max_new_tokens=tokens) if tokens else JudgeConfig()
    return GeneratorJudge(ctx.helper("scorer"), jcfg)


def _pair(plan: AttackPlan, ctx: SuiteContext) -> PAIR:
    scorer = _scorer(plan, ctx)
    return PAIR(ctx.helper("attacker"), ctx.target, scorer, plan.settings["cfg"])


def _tap(plan: AttackPlan, ctx: SuiteContext) -> TAP:
    scorer = _scorer(plan, ctx)
    return TAP(ctx.helper("attacker"), ctx.target, scorer, plan.settings["cfg"])


def _autodan(plan: AttackPlan, ctx: SuiteContext) -> AutoDAN:
    """AutoDAN-HGA from AutoDAN's reference initial prompt (``initial="autodan"``) or the
    project's templates (``"project"``, first ``num_templates``); ``word_level=False``: plain GA."""
    s = plan.settings
    templates = None
    if s["initial"] == "project":
        templates = builtin_templates()
        if int(s["num_templates"]):
            templates = templates[: int(s["num_templates"])]
    fitness = TargetCE(ctx.target, batch_size=int(s["fitness_batch_size"]) or None)
    return AutoDAN(
        ctx.helper("mutator"),
        fitness,
        s["cfg"],
        target=ctx.target,
        templates=templates,
        synonyms=wordnet_synonyms if bool(s["word_level"]) else None,
    )


def _past_tense(plan: AttackPlan, ctx: SuiteContext) -> PastTenseAttack:
    return PastTenseAttack(ctx.helper("reformulator"), plan.settings["cfg"])


def _translation(plan: AttackPlan, ctx: SuiteContext) -> TranslationAttack:
    """Responses are back-translated to English for the judge (dat.md §6.2) unless
    `back_translate` is False; 0 back-translation tokens = the evaluation's max_new_tokens."""
    s = plan.settings
    tokens = int(s["back_translate_max_new_tokens"]) or ctx.max_new_tokens
    back = tokens if bool(s["back_translate"]) else None
    return TranslationAttack(ctx.helper("translator"), s["cfg"], back_translate_tokens=back)


def _gcg(plan: AttackPlan, ctx: SuiteContext) -> GCGAttack:
    cfg = plan.settings["cfg"]
    if cfg.system_prompt is None and ctx.system_prompt:
        cfg = dataclasses.replace(cfg, system_prompt=ctx.system_prompt)
    return GCGAttack(ctx.target, cfg, test_case=str(plan.settings["test_case"]), label=plan.name)


def _continuous(plan: AttackPlan, ctx: SuiteContext) -> ContinuousAttack:
    return ContinuousAttack(
        ctx.target,
        plan.settings["cfg"],
        max_new_tokens=ctx.max_new_tokens,
        batch_size=ctx.batch_size,
    )


def _inpainting(plan: AttackPlan, ctx: SuiteContext) -> Inpainting:
    model, tokenizer = ctx.diffusion_model()
    return Inpainting(model, tokenizer, plan.settings["cfg"])


# The registry, in the order of `default_blocks`. Protocol values that differ from a config
# dataclass's own defaults live in `base` (here only): MixAT's TAP budgets (`mixat_eval`),
# HarmBench's evaluation PAP (2,048 new tokens, `harmbench_eval`) and the deterministic
# continuous attack (no LoRA dropout: the evaluated model is deterministic).
REGISTRY: dict[str, AttackSpec] = {
    "DirectRequest": AttackSpec(None, _direct),
    "HumanJailbreaks": AttackSpec(HumanJailbreaksConfig, _human_jailbreaks),
    "PAP": AttackSpec(
        PAPConfig, _pap, base=lambda extras: PAPConfig.harmbench_eval(), helpers=("rewriter",)
    ),
    "GCG": AttackSpec(
        GCGConfig,
        _gcg,
        base=lambda extras: preset(str(extras["preset"])),
        extras={"preset": "harmbench", "test_case": "final", "behaviors_per_run": 1},
        choices={"test_case": GCG_TEST_CASES},
        per_behavior=True,
        target_dependent=True,
        preset_placeholders=True,
    ),
    "PAIR": AttackSpec(
        PAIRConfig,
        _pair,
        extras={"scorer_max_new_tokens": JudgeConfig.max_new_tokens},
        helpers=("attacker", "scorer"),
        target_dependent=True,
    ),
    "TAP": AttackSpec(
        TAPConfig,
        _tap,
        base=lambda extras: TAPConfig.mixat_eval(),
        extras={"scorer_max_new_tokens": JudgeConfig.max_new_tokens},
        helpers=("attacker", "scorer"),
        target_dependent=True,
    ),
    "AutoDAN": AttackSpec(
        AutoDANConfig,
        _autodan,
        extras={
            "initial": "autodan",
            "word_level": True,
            "num_templates": 0,
            "fitness_batch_size": 0,
        },
        choices={"initial": ("autodan", "project")},
        helpers=("mutator",),
        per_behavior=True,
        target_dependent=True,
    ),
    "PastTense": AttackSpec(PastTenseConfig, _past_tense, helpers=("reformulator",)),
    "Translation": AttackSpec(
        TranslationConfig,
        _translation,
        extras={"back_translate": True, "back_translate_max_new_tokens": 0},
        helpers=("translator",),
        judge_inputs=True,
    ),
    "Continuous": AttackSpec(
        ContinuousAttackConfig,
        _continuous,
        base=lambda extras: ContinuousAttackConfig(dropout=False),
        target_dependent=True,
        white_box_completions=True,
    ),
    "BoN": AttackSpec(BoNConfig, _bon),
    "Inpainting": AttackSpec(InpaintingConfig, _inpainting, diffusion=True),
}

ATTACK_KINDS: tuple[str, ...] = tuple(REGISTRY)


# ------------------------------------------------------------------------------ parsing


def _config_from_block(cls: type, block: Mapping[str, Any], name: str, base: Any) -> Any:
    """`base` with the block's settings (typed and checked by `config_types`)."""
    valid = sorted(f.name for f in dataclasses.fields(cls) if f.init)
    for key in block:
        if key not in valid:
            raise ValueError(
                f"attack {name!r}: unknown setting {key!r}; valid settings: {', '.join(valid)}"
            )
    return config_types.from_config_dict(
        cls, block, unset="placeholder", base=base, path=f"attack {name!r}"
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def plan_attack(name: str, block: Mapping[str, Any] | None) -> AttackPlan:
    """Validate one attack block (no model is loaded). `block` may be None for a registered
    kind used with its defaults."""
    block = {k: v for k, v in dict(block or {}).items() if v is not None}
    kind = str(block.get("kind", name))
    if kind not in REGISTRY:
        raise ValueError(
            f"unknown attack {name!r} (kind {kind!r}); registered attacks: {', '.join(ATTACK_KINDS)}"
        )
    spec = REGISTRY[kind]
    gen = {k: block.pop(k) for k in GENERATION_KEYS if k in block}
    extras = {**spec.extras, **{k: v for k, v in block.items() if k in spec.extras}}
    rest = {k: v for k, v in block.items() if k not in spec.extras and k != "kind"}
    settings: dict[str, Any] = {**GENERATION_KEYS, **gen, **extras}
    if int(settings["n_samples"]) < 1 or float(settings["gen_temperature"]) < 0:
        raise ValueError(f"attack {name!r}: need n_samples >= 1 and gen_temperature >= 0")
    if spec.white_box_completions and (settings["n_samples"] != 1 or settings["gen_temperature"]):
        raise ValueError(f"attack {name!r} decodes greedily itself; drop n_samples/gen_temperature")
    for key, value in extras.items():
        if key in spec.choices and str(value) not in spec.choices[key]:
            allowed = " or ".join(repr(c) for c in spec.choices[key])
            raise ValueError(f"attack {name!r}: {key} must be {allowed}")
        if isinstance(value, int) and not isinstance(value, bool) and int(value) < 0:
            raise ValueError(f"attack {name!r}: {key} must be >= 0, got {value}")
    if spec.config is None:
        if rest:
            raise ValueError(f"attack {name!r}: unknown setting(s) {sorted(rest)} for {kind}")
    else:
        base = spec.base_config(extras)
        settings["cfg"] = _config_from_block(spec.config, rest, name, base)
    return AttackPlan(name=name, kind=kind, settings=settings, block=_jsonable({**block, **gen}))


def parse_attack_names(spec: str | Sequence[str]) -> list[str]:
    """`"A,B , C"` or a sequence → unique names in order; empty entries dropped."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for n in (str(x).strip() for x in names):
        if n and n not in out:
            out.append(n)
    return out


# ------------------------------------------------------------------------------ running


def build_attack(plan: AttackPlan, ctx: SuiteContext) -> Any:
    """The attack object of a validated plan (loads helper models through `ctx`)."""
    return plan.spec.factory(plan, ctx)


def as_test_cases(raw: Mapping[str, Sequence[TestCase | str]]) -> dict[str, list[TestCase]]:
    """An attack's `generate_test_cases` output with every plain `str` made a `TestCase`."""
    return {
        bid: [tc if isinstance(tc, TestCase) else TestCase(tc) for tc in cases]
        for bid, cases in raw.items()
    }


# ------------------------------------------------------------------------------ defaults


def default_block(kind: str) -> dict[str, Any]:
    """Every setting of one attack kind with its protocol default, as a flat config block. GCG
    settings are placeholders (None = the value of the block's `preset`)."""
    if kind not in REGISTRY:
        raise ValueError(f"unknown attack kind {kind!r}; registered: {', '.join(ATTACK_KINDS)}")
    spec = REGISTRY[kind]
    block: dict[str, Any] = {"kind": kind}
    if not spec.white_box_completions:
        block.update(GENERATION_KEYS)
    block.update(spec.extras)
    if spec.config is not None:
        cfg = config_types.to_config_dict(spec.base_config(spec.extras), unset="placeholder")
        for key, value in cfg.items(preserve_field_references=True):
            unset = config_dict.placeholder(cfg.get_type(key))
            block[key] = unset if spec.preset_placeholders else value
    return block


def default_blocks() -> dict[str, dict[str, Any]]:
    """Default config block per registered kind (HarmBench / MixAT / DAT settings)."""
    return {kind: default_block(kind) for kind in ATTACK_KINDS}
