"""Host-side GCG driver (``run_gcg`` / ``run_gcg_batch``) around the compiled step in ``gcg``
(spec mixat.md §6.4; peers.md §1, §2, §12).

One ``GCGRun`` holds a call's state: the behaviours' prompt slots (``Problem``), the device
inputs, one ``SuffixBuffer`` and one trajectory per behaviour. ``start_run`` builds it (prefix KV
caches computed once); ``GCGRun.init_buffers`` fills buffers of ``buffer_size > 1`` with random
suffixes (nanoGCG); each ``GCGRun.step`` runs one compiled ``gcg.batched_gcg_step`` from every
buffer's best suffix, accepts the best of the step's top-M candidates that retokenises in the
full prompt (``gcg_filters``; ``filter_mode="harmbench"``: the best of all candidates that pass
HarmBench's suffix-alone check, or the overall best when none passes), offers it to the buffer, and runs the optional HarmBench refusal
check (greedy completion without a refusal substring: stop); ``GCGRun.results`` gives one
``GCGResult`` per behaviour. Probe sampling (``cfg.probe_draft``, issue #14): ``start_run``
resolves the draft (``gcg_probe.resolve_draft``) and computes its prefix caches once.
This module imports ``gcg``; ``gcg`` never imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mixat_jax.attacks.gcg import (
    Cache,
    Layout,
    Segments,
    StepSpec,
    batched_candidate_losses,
    batched_gcg_step,
    batched_prefix_cache,
    bucket_plan,
    compile_cached,
    host_arrays,
    reuse_levels,
    round_up,
)
from mixat_jax.attacks.gcg_filters import (
    PromptSlots,
    allowed_token_mask,
    retokenizes_alone,
    slot_prompt,
)
from mixat_jax.attacks.gcg_presets import GCGConfig
from mixat_jax.attacks.gcg_probe import filter_plan, resolve_draft
from mixat_jax.chat import ChatRenderer
from mixat_jax.judges.refusal import refusal_substrings
from mixat_jax.sampling import TextGenerator

__all__ = [
    "GCGResult",
    "GCGRun",
    "Problem",
    "StepReport",
    "SuffixBuffer",
    "Trajectory",
    "prepare_problem",
    "run_gcg",
    "run_gcg_batch",
    "start_run",
    "step_spec",
]


@dataclasses.dataclass(frozen=True)
class GCGResult:
    """Outcome of one behaviour's attack; ``losses``/``strings`` per step (accepted suffix)."""

    best_loss: float
    best_string: str
    best_ids: tuple[int, ...]
    losses: list[float]
    strings: list[str]
    num_steps: int
    seconds_per_step: float
    compile_seconds: float
    stopped_early: bool
    behavior: str = ""
    target: str = ""
    best_test_case: str = ""  # the instruction with the best suffix in its slot
    final_string: str = ""  # the last step's suffix (HarmBench/MixAT use the last one)
    final_test_case: str = ""
    all_filtered_steps: int = 0  # filter_mode="harmbench": steps where every candidate failed
    # probe sampling: per step, the Spearman agreement and the filtered-set size f
    probe_rho: list[float] = dataclasses.field(default_factory=list)
    probe_filtered: list[int] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"best_ids": list(self.best_ids)}


@dataclasses.dataclass(frozen=True)
class StepReport:
    """Progress after one step of one behaviour (``progress`` callback of ``run_gcg_batch``)."""

    behavior_index: int
    step: int  # 1-based count of completed steps
    num_steps: int
    loss: float
    best_loss: float
    suffix: str
    seconds: float


@dataclasses.dataclass
class Problem:
    """One behaviour: its prompt split around the suffix slot and its target ids."""

    slots: PromptSlots
    target_ids: tuple[int, ...]

    @property
    def segments(self) -> Segments:
        s = self.slots
        return Segments(s.before_ids, s.suffix_ids, s.after_ids, self.target_ids)


def prepare_problem(
    renderer: ChatRenderer, behavior: str, target: str, cfg: GCGConfig, i: int = 0
) -> Problem:
    """Slots and target ids of behaviour ``i``; one-line ValueErrors for empty behaviour or
    target text and for a prompt + suffix + target longer than ``cfg.max_seq_len``."""
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"behaviour {i}: the target string is empty; give the target completion")
    if not isinstance(behavior, str) or not behavior.replace("{optim_str}", "").strip():
        raise ValueError(f"behaviour {i}: the behaviour string is empty")
    slots = slot_prompt(
        renderer, behavior, cfg.optim_str_init, system=cfg.system_prompt, suffix_len=cfg.suffix_len
    )
    text = (" " + target) if cfg.add_space_before_target else target
    target_ids = tuple(renderer.tokenizer(text, add_special_tokens=False)["input_ids"])
    if not target_ids:
        raise ValueError(f"behaviour {i}: the target {target!r} tokenises to no tokens")
    total = len(slots.before_ids) + len(slots.suffix_ids) + len(slots.after_ids) + len(target_ids)
    if total > cfg.max_seq_len:
        raise ValueError(
            f"behaviour {i} is too long for the sequence budget: prompt + suffix + target = "
            f"{total} tokens > max_seq_len={cfg.max_seq_len}"
        )
    return Problem(slots, target_ids)


def step_spec(
    cfg: GCGConfig,
    n_allowed: int,
    mesh: Mesh | None,
    suffix_len: int | None = None,
    n_behaviors: int = 1,
) -> StepSpec:
    """The compiled step's static settings for ``cfg``: chunk size (rounded to the mesh's data
    devices), top-k (at most the ``n_allowed`` tokens), top-M, and the suffix-prefix reuse plan
    (static buckets for "spread" positions; run-time levels for "random" with one behaviour)."""
    w = cfg.search_width
    chunk = min(cfg.batch_size or w, w)
    data_axes = None
    if mesh is not None:
        n_dev = mesh.shape["data"] * mesh.shape["fsdp"]
        if n_dev > 1:
            chunk = round_up(chunk, n_dev)
            data_axes = ("data", "fsdp")
    order = buckets = levels = None
    reuse = cfg.reuse_suffix_prefix and bool(suffix_len) and suffix_len > 1
    if reuse and cfg.positions == "spread":
        granule = 1 if data_axes is None else n_dev  # sharded chunks divide by the devices
        order, buckets = bucket_plan(
            w, suffix_len, cfg.n_replace, cfg.prefix_buckets, chunk, granule=granule
        )
    elif reuse and n_behaviors == 1:
        levels = reuse_levels(suffix_len, cfg.reuse_levels)
        if len(levels) > 1:  # sorted chunks must be fine enough to land above the levels
            chunk = min(chunk, round_up(-(-w // (2 * len(levels))), n_dev if data_axes else 1))
        else:
            levels = None
    n_chunks = -(-w // chunk)
    probe = {}
    if cfg.probe_draft:
        granule = n_dev if data_axes else 1
        n_p = w // cfg.probe_sampling_factor
        switch = cfg.probe_filter == "switch" and n_behaviors == 1
        sizes = filter_plan(w, cfg.probe_r, cfg.probe_filter_sizes if switch else 1, granule)
        probe = dict(probe_size=n_p, probe_r=float(cfg.probe_r), filter_sizes=sizes,
                     probe_pad=round_up(n_p, granule))  # fmt: skip
    return StepSpec(
        width=w,
        chunk=chunk,
        n_chunks=n_chunks,
        topk=min(cfg.topk, n_allowed),
        n_replace=cfg.n_replace,
        spread=cfg.positions == "spread",
        use_mellowmax=cfg.use_mellowmax,
        mellowmax_alpha=float(cfg.mellowmax_alpha),
        top_m=_top_m(cfg),
        data_axes=data_axes,
        order=order,
        buckets=buckets,
        levels=levels,
        **probe,
    )


class SuffixBuffer:
    """Attack buffer: ``items`` = up to max(1, size) (loss, suffix ids), ascending by loss;
    the current suffix is ``best`` (the lowest loss). A suffix already held is never re-added.
    With ``accept_worse`` every offer replaces the single item (the step's best candidate always
    becomes the current suffix, nanoGCG ``buffer_size=0`` / HarmBench)."""

    def __init__(self, size: int, accept_worse: bool):
        self.size, self.accept_worse = max(1, size), accept_worse
        self.items: list[tuple[float, tuple[int, ...]]] = []

    def offer(self, loss: float, ids: tuple[int, ...]) -> bool:
        """Adds (loss, ids) if new and (unless ``accept_worse``) better than the worst held
        item of a full buffer; returns whether it was added."""
        if any(ids == other for _, other in self.items):
            return False
        if self.accept_worse:
            self.items = [(loss, ids)]
            return True
        if len(self.items) >= self.size and loss >= self.items[-1][0]:
            return False
        self.items = sorted([*self.items, (loss, ids)], key=lambda x: x[0])[: self.size]
        return True

    @property
    def best(self) -> tuple[float, tuple[int, ...]]:
        return self.items[0]


def _refuses(text: str) -> bool:
    low = text.lower()
    return any(s.lower() in low for s in refusal_substrings("harmbench"))


def _random_suffixes(rng, allowed: np.ndarray, n: int, slots, renderer) -> list[tuple[int, ...]]:
    """Random allowed suffixes of the init's length that retokenise in context (buffer init)."""
    pool = np.flatnonzero(allowed)
    out = []
    s = len(slots.suffix_ids)
    for _ in range(n):
        ids = slots.suffix_ids
        for _ in range(50):
            cand = tuple(int(t) for t in rng.choice(pool, s))
            if slots.retokenizes(renderer, cand):
                ids = cand
                break
        out.append(ids)
    return out


@dataclasses.dataclass
class Trajectory:
    """One behaviour's accepted suffixes so far: per-step loss and decoded suffix, the best
    (loss, ids) over the steps, and whether (and why) it stopped."""

    losses: list[float]
    strings: list[str]
    best: tuple[float, tuple[int, ...]]
    done: bool = False
    stopped: bool = False  # early stop (every target token argmax, or no refusal)
    steps_run: int = 0
    all_filtered: int = 0  # steps where every candidate failed HarmBench's filter (all kept)
    probe_rho: list[float] = dataclasses.field(default_factory=list)
    probe_filtered: list[int] = dataclasses.field(default_factory=list)


def _top_m(cfg: GCGConfig) -> int:
    """Candidates returned (loss order) for the filter: all of them in HarmBench's mode."""
    if not cfg.filter_ids:
        return 1
    if cfg.filter_mode == "harmbench":
        return cfg.search_width
    return min(cfg.filter_topm, cfg.search_width)


@dataclasses.dataclass
class GCGRun:
    """State of one ``run_gcg_batch`` call (``start_run`` builds it, inside ``jax.set_mesh``
    when sharded). Device inputs: ``caches`` (batch-1 prefix caches), ``layouts``, ``allowed_V``,
    ``root_keys`` (one PRNG key per behaviour); host state: one buffer and one trajectory per
    behaviour; ``compile_seconds`` accumulates every compile of the call."""

    cfg: GCGConfig
    spec: StepSpec
    renderer: ChatRenderer
    model: Any  # the Decoder (refusal-check generation)
    problems: list[Problem]
    seeds: list[int]
    allowed_host_V: np.ndarray  # bool
    graphdef: nnx.GraphDef
    params: tuple[nnx.State, ...]
    put: Callable[[Any], jax.Array]  # host -> device (replicated over the mesh, if any)
    caches: Cache
    layouts: Layout
    allowed_V: jax.Array
    root_keys: jax.Array
    buffers: list[SuffixBuffer]
    tracks: list[Trajectory]
    compile_seconds: float = 0.0
    step_seconds: list[float] = dataclasses.field(default_factory=list)
    step_executable: Callable | None = None
    generator: TextGenerator | None = None
    # probe sampling: the draft's graphdef, params and prefix caches (None = off)
    draft_graphdef: nnx.GraphDef | None = None
    draft_params: tuple[nnx.State, ...] | None = None
    draft_caches: Cache | None = None

    @property
    def done(self) -> bool:
        return all(t.done for t in self.tracks)

    def init_buffers(self) -> None:
        """Fills buffers with random suffixes (nanoGCG's random buffer init) and their losses."""
        extra = self.cfg.buffer_size - 1
        cands = []
        for q, seed in zip(self.problems, self.seeds, strict=True):
            rng = np.random.default_rng(seed)
            cands.append(_random_suffixes(rng, self.allowed_host_V, extra, q.slots, self.renderer))
        arr = self.put(np.asarray(cands, np.int32))
        args = (self.params, self.caches, arr, self.layouts)
        exe, compile_s = compile_cached(
            batched_candidate_losses, args, dict(graphdef=self.graphdef, spec=self.spec)
        )
        losses = np.asarray(exe(*args)[0])
        for buf, cs, ls in zip(self.buffers, cands, losses, strict=True):
            for c, loss in zip(cs, ls, strict=True):
                buf.offer(float(loss), c)
        self.compile_seconds += compile_s

    def step(self, step: int, progress: Callable[[StepReport], None] | None = None) -> None:
        """One compiled GCG step (0-based ``step``) for every behaviour not yet done."""
        t0 = time.perf_counter()
        cur = self.put(np.asarray([buf.best[1] for buf in self.buffers], np.int32))
        args = (self.params, self.caches, cur, self.layouts, self.allowed_V, self.root_keys,
                self.put(np.int32(step)), self.draft_params, self.draft_caches)  # fmt: skip
        if self.step_executable is None:
            static = dict(
                graphdef=self.graphdef, spec=self.spec, draft_graphdef=self.draft_graphdef
            )
            self.step_executable, c_s = compile_cached(batched_gcg_step, args, static)
            self.compile_seconds += c_s
            t0 = time.perf_counter()
        out = jax.device_get(self.step_executable(*args))
        for b in range(len(self.problems)):
            if not self.tracks[b].done:
                self._accept(b, step, out, progress, t0)
        self.step_seconds.append(time.perf_counter() - t0)

    def _accept(self, b: int, step: int, out: dict, progress, t0: float) -> None:
        """Behaviour ``b``: the first top-M candidate that retokenises goes to the buffer; then
        the trajectory, early stop and the refusal check."""
        cfg, track = self.cfg, self.tracks[b]
        tok = self.renderer.tokenizer
        buf, slots = self.buffers[b], self.problems[b].slots
        cur_loss, cur_ids = buf.best
        if not np.isfinite(cur_loss):  # first step: the init's loss
            buf.items[0] = (float(out["cur_loss"][b]), cur_ids)
        harmbench = cfg.filter_mode == "harmbench"
        chosen = first = None
        for m in range(self.spec.top_m):
            loss_m = float(out["top_loss"][b, m])
            if not np.isfinite(loss_m):
                break
            ids_m = tuple(int(t) for t in out["top_ids"][b, m])
            cand = (loss_m, ids_m, bool(out["top_hit"][b, m]))
            first = first or cand
            if not cfg.filter_ids or (
                retokenizes_alone(tok, ids_m)
                if harmbench
                else slots.retokenizes(self.renderer, ids_m)
            ):
                chosen = cand
                break
        if chosen is None and harmbench:  # every candidate failed: HarmBench keeps them all
            chosen = first
            track.all_filtered += first is not None
        accepted = chosen is not None and buf.offer(chosen[0], chosen[1])
        if "probe_rho" in out:
            track.probe_rho.append(float(out["probe_rho"][b]))
            track.probe_filtered.append(int(out["probe_filtered"][b]))
        loss_now, ids_now = buf.best
        if cfg.accept_worse and accepted:
            loss_now, ids_now = chosen[0], chosen[1]
        suffix = tok.decode(list(ids_now), skip_special_tokens=False)
        track.losses.append(loss_now)
        track.strings.append(suffix)
        if loss_now < track.best[0]:
            track.best = (loss_now, ids_now)
        track.steps_run = step + 1
        if cfg.early_stop and accepted and chosen[2]:
            track.done = track.stopped = True
        if cfg.check_refusal and not track.done and (
            step % cfg.eval_steps == 0 or step == cfg.num_steps - 1
        ) and loss_now < cfg.check_refusal_min_loss:  # fmt: skip
            if self.generator is None:
                self.generator = TextGenerator(self.model, tok, batch_size=1)
            out_ids = self.generator.generate_ids(
                [slots.prompt_ids(ids_now)], max_new_tokens=cfg.refusal_max_new_tokens
            )[0]
            if not _refuses(tok.decode(out_ids, skip_special_tokens=False)):
                track.done = track.stopped = True
        if progress is not None:
            progress(StepReport(b, step + 1, cfg.num_steps, loss_now, track.best[0], suffix,
                                time.perf_counter() - t0))  # fmt: skip

    def results(self) -> list[GCGResult]:
        """One ``GCGResult`` per behaviour (``behavior``/``target`` left empty)."""
        tok = self.renderer.tokenizer
        times = self.step_seconds
        per_step = float(np.median(times[1:] if len(times) > 1 else times)) if times else 0.0
        results = []
        for q, buf, track in zip(self.problems, self.buffers, self.tracks, strict=True):
            best_loss, best_ids = track.best
            results.append(
                GCGResult(
                    best_loss=float(best_loss),
                    best_string=tok.decode(list(best_ids), skip_special_tokens=False),
                    best_ids=tuple(best_ids),
                    losses=[float(x) for x in track.losses],
                    strings=track.strings,
                    num_steps=track.steps_run,
                    seconds_per_step=per_step,
                    compile_seconds=float(self.compile_seconds),
                    stopped_early=track.stopped,
                    best_test_case=q.slots.test_case(tok, best_ids),
                    final_string=track.strings[-1] if track.strings else "",
                    final_test_case=q.slots.test_case(tok, buf.best[1]),
                    all_filtered_steps=track.all_filtered,
                    probe_rho=track.probe_rho,
                    probe_filtered=track.probe_filtered,
                )
            )
        return results


def start_run(
    model,
    tokenizer,
    behaviors: Sequence[str],
    targets: Sequence[str],
    cfg: GCGConfig,
    *,
    seed: int | Sequence[int] = 0,
    mesh: Mesh | None = None,
    draft: tuple | None = None,
) -> GCGRun:
    """Validates the behaviours, computes their prefix caches and returns the run before its
    first step (buffers hold the init suffix, loss unknown). Call inside ``jax.set_mesh(mesh)``
    when ``mesh`` is given. ``seed`` and ``draft`` as in ``run_gcg_batch``."""
    behaviors, targets = list(behaviors), list(targets)
    if not behaviors or len(behaviors) != len(targets):
        raise ValueError(
            f"need one target per behaviour and at least one; got {len(behaviors)} behaviours "
            f"and {len(targets)} targets"
        )
    seeds = [seed + i for i in range(len(behaviors))] if isinstance(seed, int) else list(seed)
    if len(seeds) != len(behaviors):
        raise ValueError(f"got {len(seeds)} seeds for {len(behaviors)} behaviours")
    resolved = resolve_draft(cfg, model, tokenizer, draft, mesh)  # bad draft: fail first
    renderer = ChatRenderer(tokenizer)
    problems = [
        prepare_problem(renderer, b, t, cfg, i)
        for i, (b, t) in enumerate(zip(behaviors, targets, strict=True))
    ]
    s = len(problems[0].slots.suffix_ids)
    for i, q in enumerate(problems):
        if len(q.slots.suffix_ids) != s:
            raise ValueError(
                f"optim_str_init tokenises to {len(q.slots.suffix_ids)} tokens in behaviour {i}'s "
                f"prompt but {s} in behaviour 0's; set an init that tokenises the same everywhere"
            )
    vocab = int(model.cfg.vocab_size)
    allowed = allowed_token_mask(tokenizer, vocab, allow_non_ascii=cfg.allow_non_ascii)
    spec = step_spec(cfg, int(allowed.sum()), mesh, suffix_len=s, n_behaviors=len(problems))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    host = host_arrays([q.segments for q in problems], int(pad_id), cfg.length_multiple)
    graphdef, *params = nnx.split(model)
    params = tuple(params)
    put = (
        jnp.asarray
        if mesh is None
        else functools.partial(jax.device_put, device=NamedSharding(mesh, PartitionSpec()))
    )
    buffers = [SuffixBuffer(cfg.buffer_size, cfg.accept_worse) for _ in problems]
    for buf, q in zip(buffers, problems, strict=True):
        buf.items = [(float("inf"), q.slots.suffix_ids)]
    tracks = [Trajectory([], [], (float("inf"), q.slots.suffix_ids)) for q in problems]
    layouts = jax.tree.map(put, host.layouts)
    allowed_dev = put(allowed)
    root_keys = put(jnp.stack([jax.random.key(int(x)) for x in seeds]))
    pargs = (params, put(host.prefix_ids_BxP), put(host.prefix_mask_BxP))
    exe, compile_s = compile_cached(
        batched_prefix_cache, pargs, dict(graphdef=graphdef, rest_len=host.rest_len)
    )
    caches = exe(*pargs)
    d_graphdef = d_params = d_caches = None
    if resolved is not None:
        draft_model, _ = resolved
        d_graphdef, *d_params = nnx.split(draft_model)
        d_params = tuple(d_params)
        dargs = (d_params, *pargs[1:])
        exe, c_s = compile_cached(
            batched_prefix_cache, dargs, dict(graphdef=d_graphdef, rest_len=host.rest_len)
        )
        d_caches, compile_s = exe(*dargs), compile_s + c_s
    return GCGRun(
        cfg=cfg, spec=spec, renderer=renderer, model=model, problems=problems, seeds=seeds,
        allowed_host_V=allowed, graphdef=graphdef, params=params, put=put, caches=caches,
        layouts=layouts, allowed_V=allowed_dev, root_keys=root_keys, buffers=buffers,
        tracks=tracks, compile_seconds=compile_s, draft_graphdef=d_graphdef,
        draft_params=d_params, draft_caches=d_caches,
    )  # fmt: skip


def run_gcg_batch(
    model,
    tokenizer,
    behaviors: Sequence[str],
    targets: Sequence[str],
    cfg: GCGConfig | None = None,
    *,
    seed: int | Sequence[int] = 0,
    mesh: Mesh | None = None,
    progress: Callable[[StepReport], None] | None = None,
    draft: tuple | None = None,
) -> list[GCGResult]:
    """Attacks several behaviours in one compiled step per GCG step (vmapped, padded).

    ``seed`` is one int (behaviour i uses seed + i) or one per behaviour; behaviour i with seed s
    samples exactly the candidates a single-behaviour run with seed s would. Probe sampling
    (``cfg.probe_draft``): ``draft`` = (draft model, its tokenizer) overrides the draft the
    config names (``gcg_probe.resolve_draft``); it must share the target's tokenizer."""
    cfg = cfg or GCGConfig()
    behaviors, targets = list(behaviors), list(targets)
    ctx = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    with ctx:
        run = start_run(
            model, tokenizer, behaviors, targets, cfg, seed=seed, mesh=mesh, draft=draft
        )
        if cfg.buffer_size > 1:
            run.init_buffers()
        for step in range(cfg.num_steps):
            run.step(step, progress)
            if run.done:
                break
        results = run.results()
    return [
        dataclasses.replace(r, behavior=b, target=t)
        for r, b, t in zip(results, behaviors, targets, strict=True)
    ]


def run_gcg(
    model,
    tokenizer,
    behavior: str,
    target: str,
    cfg: GCGConfig | None = None,
    *,
    seed: int = 0,
    mesh: Mesh | None = None,
    progress: Callable[[StepReport], None] | None = None,
    draft: tuple | None = None,
) -> GCGResult:
    """GCG against ``model`` (its current, possibly LoRA-adapted, parameters) for one behaviour.

    ``behavior`` may contain ``{optim_str}`` to place the adversarial string; otherwise it is
    appended after a space. ``progress`` receives a ``StepReport`` after every step."""
    return run_gcg_batch(
        model,
        tokenizer,
        [behavior],
        [target],
        cfg,
        seed=[seed],
        mesh=mesh,
        progress=progress,
        draft=draft,
    )[0]
