"""Per-micro-batch discrete rewrite of the adversarial rows (MixAT spec §6.2–6.5, §11.10–13).

For micro-batch ``m`` with schedule flag ``f`` (0 continuous only, 1 PAP, 2 GCG):

* PAP (``f == 1``): a persuasion technique is drawn uniformly from the first ``num_techniques``
  taxonomy entries — once per micro-batch (the reference, §11.11) or once per row
  (``technique_per="row"``) — and a random cached rewrite of (behaviour, technique) is taken from
  the offline pool (``mixat_jax.pap_pool``; spec §6.3 "self-contained replacement"). A pool
  without that technique for the behaviour falls back to another of its rewrites
  (``pap_missing``); a behaviour absent from the pool keeps its instruction (``pap_absent``).
* GCG (``f == 2``): ``run_gcg_batch`` against the CURRENT parameters (the model is built on
  demand), the last step's test case is the instruction (spec §6.4, "last, not best").

The instruction is then re-rendered through the chat template (spec §6.5 advice: no slicing of
token ids); a rewrite whose away or toward row does not fit ``max_len_adv`` falls back to the
original behaviour and is counted (``fallbacks``), never silently truncated (§11.12).

All host randomness comes from ``numpy.random.default_rng(call_seed(seed, kind, m))``: a pure
function of (seed, micro-batch index), so a resumed run rewrites exactly as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from mixat_jax.attacks.gcg_driver import StepReport, run_gcg_batch
from mixat_jax.attacks.gcg_presets import GCGConfig
from mixat_jax.attacks.llm_interface import call_seed
from mixat_jax.training.batches import AdvItem
from mixat_jax.training.data import AdvRow
from mixat_jax.training.schedules import FLAG_CONTINUOUS, FLAG_GCG, FLAG_PAP

FLAG_NAMES = {FLAG_CONTINUOUS: "none", FLAG_PAP: "pap", FLAG_GCG: "gcg"}


class RewriteAborted(Exception):
    """Raised inside a long rewrite (GCG) when the run was asked to stop (SIGTERM)."""


class PAPPool:
    """Cached PAP rewrites: behaviour id -> technique index -> texts (records of ``load_pool``)."""

    def __init__(self, records: Sequence[Mapping[str, Any]], num_techniques: int = 40):
        self.num_techniques = int(num_techniques)
        table: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
        for r in records:
            if int(r["technique_index"]) < self.num_techniques:
                table[str(r["behavior_id"])][int(r["technique_index"])].append(str(r["text"]))
        self._table = {b: dict(t) for b, t in table.items()}

    def __len__(self) -> int:
        return sum(len(x) for t in self._table.values() for x in t.values())

    def missing_behaviors(self, behavior_ids: Sequence[str]) -> list[str]:
        return sorted({b for b in behavior_ids if b not in self._table})

    def sample(self, behavior_id: str, technique: int, rng: np.random.Generator) -> tuple[str, str]:
        """(text, status) with status "ok" | "missing" (other technique) | "absent" (no rewrite)."""
        techniques = self._table.get(behavior_id)
        if not techniques:
            return "", "absent"
        texts = techniques.get(technique)
        status = "ok"
        if not texts:
            keys = sorted(techniques)
            texts = techniques[keys[int(rng.integers(len(keys)))]]
            status = "missing"
        return texts[int(rng.integers(len(texts)))], status


@dataclasses.dataclass
class Rewritten:
    """The instructions for one micro-batch's adversarial rows and what happened."""

    items: list[AdvItem]
    info: dict[str, Any]


class DiscreteRewriter:
    """Applies the scheduled discrete attack to a micro-batch's adversarial rows (host side).

    Args:
      renderer: ``ChatRenderer`` of the trained model (fit checks re-render the rows).
      tokenizer: the trained model's tokenizer (GCG).
      max_len_adv: the adversarial row budget; rewrites that do not fit fall back.
      pool: the PAP pool (required when the schedule has PAP flags).
      gcg: GCG settings (the MixAT preset is HarmBench GCG, 100 steps); without a
        ``system_prompt`` of its own it takes the renderer's (the run's), so GCG optimises the
        same rendered context as the trained row. Probe sampling (``probe_draft``, e.g.
        ``"@target"`` with ``probe_draft_layers``) uses the current model as the draft.
      should_abort: polled after every GCG step of every behaviour; True raises
        :class:`RewriteAborted`. With several processes it must return the same value on every
        process (the loop passes the collective ``PreemptionFlag.agree``; all processes poll at
        the same points because GCG runs the same replicated program): all abort the same rewrite
        or none does (issue #16).
    """

    def __init__(
        self,
        *,
        renderer,
        tokenizer,
        max_len_adv: int,
        seed: int,
        pool: PAPPool | None,
        gcg: GCGConfig,
        technique_per: str = "microbatch",
        mesh=None,
        should_abort: Callable[[], bool] = lambda: False,
    ):
        self.renderer, self.tokenizer = renderer, tokenizer
        self.max_len_adv, self.seed, self.pool, self.gcg = max_len_adv, seed, pool, gcg
        system = getattr(renderer, "system_prompt", None)
        if gcg is not None and gcg.system_prompt is None and system is not None:
            # GCG optimises the context the row trains on: the run's system prompt (issue #17).
            self.gcg = dataclasses.replace(gcg, system_prompt=system)
        self.technique_per, self.mesh, self.should_abort = technique_per, mesh, should_abort

    # -- fit check ---------------------------------------------------------------------------
    def fits(self, row: AdvRow, instruction: str) -> bool:
        """Both the away and the toward row, fully rendered, fit ``max_len_adv``."""
        try:
            n_away = len(self.renderer.example(instruction, row.target).ids)
            n_toward = len(self.renderer.example(instruction, row.refusal).ids)
        except ValueError:  # the template cannot render this text exactly: treat as unusable
            return False
        return max(n_away, n_toward) <= self.max_len_adv

    # -- per micro-batch ---------------------------------------------------------------------
    def rewrite(
        self, rows: Sequence[AdvRow], flag: int, mb_index: int, model_fn: Callable[[], Any]
    ) -> Rewritten:
        """Instructions for ``rows`` under ``flag``; ``model_fn()`` builds the current model."""
        t0 = time.perf_counter()
        info: dict[str, Any] = dict(flag=int(flag), pap_rows=0, gcg_rows=0, fallbacks=0,
                                    pap_missing=0, pap_absent=0, technique=-1)  # fmt: skip
        if not rows or flag == FLAG_CONTINUOUS:
            texts = [r.behavior for r in rows]
        elif flag == FLAG_PAP:
            texts = self._pap(rows, mb_index, info)
        elif flag == FLAG_GCG:
            texts = self._gcg(rows, mb_index, model_fn, info)
        else:
            raise ValueError(f"schedule flag {flag} unknown; flags are 0 (none), 1 (PAP), 2 (GCG)")
        items = []
        for row, text in zip(rows, texts, strict=True):
            if text != row.behavior and not self.fits(row, text):
                info["fallbacks"] += 1
                text = row.behavior
            items.append(AdvItem(row, text))
        info["seconds"] = time.perf_counter() - t0
        return Rewritten(items, info)

    def _pap(self, rows: Sequence[AdvRow], mb_index: int, info: dict[str, Any]) -> list[str]:
        if self.pool is None:
            raise ValueError("the schedule asks for PAP but no PAP pool is loaded; set "
                             "--config.discrete.pap_pool")  # fmt: skip
        rng = np.random.default_rng(call_seed(self.seed, "pap", mb_index))
        n_tech = self.pool.num_techniques
        shared = int(rng.integers(n_tech))
        info["technique"] = shared
        texts = []
        for row in rows:
            tech = shared if self.technique_per == "microbatch" else int(rng.integers(n_tech))
            text, status = self.pool.sample(row.behavior_id, tech, rng)
            if status == "absent":
                info["pap_absent"] += 1
                texts.append(row.behavior)
                continue
            info["pap_missing"] += status == "missing"
            info["pap_rows"] += 1
            texts.append(text)
        return texts

    def _gcg(
        self, rows: Sequence[AdvRow], mb_index: int, model_fn: Callable[[], Any], info: dict
    ) -> list[str]:
        def progress(report: StepReport) -> None:
            del report
            if self.should_abort():
                raise RewriteAborted(f"stop requested during GCG of micro-batch {mb_index}")

        seeds = [call_seed(self.seed, "gcg", mb_index, i) for i in range(len(rows))]
        results = run_gcg_batch(
            model_fn(),
            self.tokenizer,
            [r.behavior for r in rows],
            [r.target for r in rows],
            self.gcg,
            seed=seeds,
            mesh=self.mesh,
            progress=progress,
        )
        info["gcg_rows"] = len(rows)
        info["gcg_loss"] = float(np.mean([r.losses[-1] if r.losses else np.nan for r in results]))
        return [r.final_test_case or r.best_test_case for r in results]
