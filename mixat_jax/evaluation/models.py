"""Models of an evaluation run: the `ModelPool` (target and helper generators and the diffusion
model, loaded on first use and shared by path; the attack suite's `SuiteContext`) and judge
construction (`build_judge`; `build_utility_judge` for XSTest / HarmLess, #13).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mixat_jax.evaluation.run_config import (
    TARGET_ALIAS,
    Resolved,
    judge_markers,
    utility_judge_name,
)
from mixat_jax.hf.load import load_pretrained
from mixat_jax.judges import (
    HarmBenchClassifier,
    KeywordJudge,
    ModelComplianceJudge,
    RefusalJudge,
    StringComplianceJudge,
    StrongRejectJudge,
)
from mixat_jax.judges.base import Judge
from mixat_jax.sampling import TextGenerator


class ModelPool:
    """Target and helper `TextGenerator`s and the diffusion model, loaded on first use and shared
    by path; also what the attack factories read (`suite.SuiteContext`)."""

    def __init__(self, res: Resolved, target: Any | None = None) -> None:
        self.res = res
        self._target = target
        self._helpers: dict[str, Any] = {}
        self._diffusion: tuple[Any, Any] | None = None

    def _kw(self, batch_size: int) -> dict[str, Any]:
        c = self.res.cfg
        return {
            "batch_size": batch_size,
            "length_multiple": int(c.gen_length_multiple),
            "max_prompt_tokens": int(c.max_prompt_tokens),
        }

    @property
    def target(self) -> Any:
        if self._target is None:
            c = self.res.cfg
            self._target = TextGenerator.from_pretrained(
                c.model,
                adapter=c.adapter or None,
                dtype=c.dtype or None,
                system_prompt=c.system_prompt or None,
                **self._kw(int(c.gen_batch_size)),
            )
        return self._target

    @property
    def max_new_tokens(self) -> int:
        return int(self.res.cfg.max_new_tokens)

    @property
    def batch_size(self) -> int:
        return int(self.res.cfg.gen_batch_size)

    @property
    def system_prompt(self) -> str | None:
        return self.res.cfg.system_prompt or None

    def load(self, path: str, batch_size: int) -> Any:
        if path == TARGET_ALIAS:
            return self.target
        if path not in self._helpers:
            self._helpers[path] = TextGenerator.from_pretrained(
                path, dtype=self.res.cfg.helper_dtype or None, **self._kw(batch_size)
            )
        return self._helpers[path]

    def helper(self, role: str) -> Any:
        return self.load(self.res.helper_paths[role], self.batch_size)

    def diffusion_model(self) -> tuple[Any, Any]:
        """(model, tokenizer) of `config.diffusion_model` (checked to be a diffusion LM by
        `resolve`), in `helper_dtype`."""
        if self._diffusion is None:
            c = self.res.cfg
            self._diffusion = load_pretrained(
                c.diffusion_model, dtype=c.helper_dtype or None, kind="diffusion"
            )
        return self._diffusion

    def release(self, keep: Sequence[str] = ()) -> None:
        """Drop the diffusion model and the helper models except those of roles in `keep`."""
        kept = {self.res.helper_paths[r] for r in keep if r in self.res.helper_paths}
        self._helpers = {p: g for p, g in self._helpers.items() if p in kept}
        self._diffusion = None


def build_judge(res: Resolved, pool: ModelPool) -> Judge:
    """The configured judge; model judges run on a local checkpoint (or the target)."""
    c = res.cfg
    if c.judge == "refusal":
        return RefusalJudge()
    if c.judge == "keyword":
        return KeywordJudge(judge_markers(c), name=res.judge_name)
    gen = pool.load(c.judge_model, int(c.judge_batch_size))
    bs = int(c.judge_batch_size)
    if c.judge == "harmbench":
        return HarmBenchClassifier(gen, batch_size=bs, name=res.judge_name)
    return StrongRejectJudge(
        gen, threshold=float(c.judge_threshold), batch_size=bs, name=res.judge_name
    )


def build_utility_judge(res: Resolved, pool: ModelPool, task: str) -> Any:
    """The XSTest / HarmLess judge of `config.utility_judge`: the string fallback, or the
    reference prompt on a local chat model loaded like the other judge models (`pool.load`)."""
    uj = res.cfg.utility_judge
    name = utility_judge_name(res.cfg, task)
    if uj.kind == "string":
        return StringComplianceJudge(task, name=name)
    bs = int(uj.batch_size)
    return ModelComplianceJudge(
        task,
        pool.load(str(uj.model), bs),
        max_new_tokens=int(uj.max_new_tokens),
        batch_size=bs,
        name=name,
    )
