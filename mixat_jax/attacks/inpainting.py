"""Inpainting attack: prompts sampled by a masked-diffusion LM conditioned on the target response
(Lüdke et al. 2025; DAT spec dat.md §3, §4.1 "1024 inpainting", §5.4 sampler).

For each behaviour, `num_samples` prompts of `prompt_length` tokens are inpainted in front of
`answer_prefix + target` by a LLaDA / Dream checkpoint (`diffusion.inpaint.inpaint_prompts`)
with the Lüdke/AAPL sampler: `steps` denoising steps at `temperature` (0: the diversity comes
from conditioning dropout), `remasking`, conditioning dropout and global remasking every
`global_remask_every` steps. Each prompt is one test case (a contextual behaviour's context is
prepended, HarmBench formatting, :mod:`direct`), with the sampler's path log-likelihood in its
`meta`. The DAT evaluation uses 1024 prompts per behaviour (AdversariaLLM's
`num_samples_per_behavior`); they are sampled here instead of read from a pre-generated file.

The prompts depend on the diffusion model and the target strings only, not on the evaluated
model. The same behaviours, seed and config give the same prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mixat_jax.attacks.direct import with_context
from mixat_jax.attacks.llm_interface import BehaviorLike, TestCase, call_seed, validate_behaviors
from mixat_jax.diffusion.inpaint import default_sampler, inpaint_prompts
from mixat_jax.diffusion.sampler import REMASKING_MODES
from mixat_jax.models.diffusion_config import require_diffusion

__all__ = ["Inpainting", "InpaintingConfig"]


@dataclass(frozen=True)
class InpaintingConfig:
    """Inpainting budgets and sampler (DAT evaluation: 1024 samples; spec §5.4 sampler)."""

    num_samples: int = 1024
    prompt_length: int = 32
    steps: int = 32
    temperature: float = 0.0
    remasking: str = "low_confidence"
    cond_dropout: bool = True
    global_remask_every: int = 8
    answer_prefix: str = "\nAnswer: "
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_samples", "prompt_length", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.remasking not in REMASKING_MODES:
            raise ValueError(
                f"unknown remasking mode {self.remasking!r}; use one of {'|'.join(REMASKING_MODES)}"
            )
        if self.global_remask_every < 0:
            raise ValueError(f"global_remask_every must be >= 0, got {self.global_remask_every}")


class Inpainting:
    """`num_samples` inpainted prompts per behaviour from a masked-diffusion `model`."""

    name = "Inpainting"

    def __init__(
        self, model: Any, tokenizer: Any, cfg: InpaintingConfig | None = None, *, mesh: Any = None
    ) -> None:
        require_diffusion(model.cfg, "the Inpainting attack's model")
        self.model, self.tokenizer, self.mesh = model, tokenizer, mesh
        self.cfg = cfg or InpaintingConfig()

    def generate_test_cases(
        self, behaviors: Sequence[BehaviorLike], *, seed: int = 0
    ) -> dict[str, list[TestCase]]:
        """Prompts conditioned on each behaviour's target; sampler seed = f(cfg.seed, seed)."""
        validate_behaviors(behaviors)
        for b in behaviors:
            if not b.target or not str(b.target).strip():
                raise ValueError(f"behaviour {b.id!r} has no target string to inpaint a prompt for")
        cfg = self.cfg
        sampler = default_sampler(
            self.model.cfg,
            cfg.prompt_length,
            steps=cfg.steps,
            temperature=cfg.temperature,
            remasking=cfg.remasking,
            cond_dropout=cfg.cond_dropout,
            global_remask_every=cfg.global_remask_every,
        )
        samples = inpaint_prompts(
            self.model,
            self.tokenizer,
            [b.target for b in behaviors],
            prompt_length=cfg.prompt_length,
            num_samples=cfg.num_samples,
            sampler=sampler,
            seed=call_seed(cfg.seed, seed),
            answer_prefix=cfg.answer_prefix,
            batch_size=cfg.batch_size,
            mesh=self.mesh,
        )
        return {
            b.id: [
                TestCase(
                    with_context(b.context, s.prompt), meta={"log_likelihood": s.log_likelihood}
                )
                for s in row
            ]
            for b, row in zip(behaviors, samples, strict=True)
        }
