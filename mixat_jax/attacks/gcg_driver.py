"""Host-side GCG driver (``run_gcg`` / ``run_gcg_batch``) around the compiled step in ``gcg``.

Prompt slots and padded layouts, attack buffer, one compiled ``gcg_step`` per step, acceptance of
the best top-M candidate that retokenises in the full prompt (``gcg_filters``), the optional
HarmBench refusal check, progress reports (``StepReport``); one ``GCGResult`` per behaviour.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mixat_jax.attacks.gcg import (
    Layout,
    StepSpec,
    _batched_losses,
    _batched_prefix,
    _batched_step,
    _compiled,
    bucket_plan,
    reuse_levels,
)
from mixat_jax.attacks.gcg_filters import PromptSlots, allowed_token_mask, slot_prompt
from mixat_jax.attacks.gcg_presets import GCGConfig
from mixat_jax.chat import ChatRenderer

__all__ = ["GCGResult", "StepReport", "run_gcg", "run_gcg_batch"]


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

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"best_ids": list(self.best_ids)}


@dataclasses.dataclass(frozen=True)
class StepReport:
    behavior_index: int
    step: int  # 1-based count of completed steps
    num_steps: int
    loss: float
    best_loss: float
    suffix: str
    seconds: float


@dataclasses.dataclass
class _Problem:
    slots: PromptSlots
    target_ids: tuple[int, ...]


def _round_up(n: int, m: int) -> int:
    return max(m, -(-n // m) * m)


def _prepare(renderer: ChatRenderer, behavior: str, target: str, cfg: GCGConfig, i: int):
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
    return _Problem(slots, target_ids)


def _host_arrays(problems: list[_Problem], pad_id: int, cfg: GCGConfig):
    """Left-padded prefixes [B, P] and stacked right-padded rest layouts [B, R]."""
    m = cfg.length_multiple
    s = len(problems[0].slots.suffix_ids)
    p_len = _round_up(max(len(q.slots.before_ids) for q in problems), m)
    t_len = _round_up(max(len(q.target_ids) for q in problems), 8)
    r_len = _round_up(max(s + len(q.slots.after_ids) + len(q.target_ids) for q in problems), m)
    b = len(problems)
    pre_ids = np.full((b, p_len), pad_id, np.int32)
    pre_mask = np.zeros((b, p_len), bool)
    rest_ids = np.full((b, r_len), pad_id, np.int32)
    rest_mask = np.zeros((b, r_len), bool)
    at = np.zeros((b, t_len), np.int32)
    tgt = np.zeros((b, t_len), np.int32)
    tw = np.zeros((b, t_len), np.float32)
    for i, q in enumerate(problems):
        before, after = q.slots.before_ids, q.slots.after_ids
        pre_ids[i, p_len - len(before) :] = before
        pre_mask[i, p_len - len(before) :] = True
        seq = [*q.slots.suffix_ids, *after, *q.target_ids]
        rest_ids[i, : len(seq)] = seq
        rest_mask[i, : len(seq)] = True
        n_t = len(q.target_ids)
        at[i, :n_t] = s + len(after) - 1 + np.arange(n_t)
        tgt[i, :n_t] = q.target_ids
        tw[i, :n_t] = 1.0
    layouts = Layout(rest_ids, rest_mask, at, tgt, tw)
    return pre_ids, pre_mask, layouts, r_len


def _step_spec(
    cfg: GCGConfig,
    n_allowed: int,
    mesh: Mesh | None,
    suffix_len: int | None = None,
    n_behaviors: int = 1,
) -> StepSpec:
    w = cfg.search_width
    chunk = min(cfg.batch_size or w, w)
    data_axes = None
    if mesh is not None:
        n_dev = mesh.shape["data"] * mesh.shape["fsdp"]
        if n_dev > 1:
            chunk = _round_up(chunk, n_dev)
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
            chunk = min(chunk, _round_up(-(-w // (2 * len(levels))), n_dev if data_axes else 1))
        else:
            levels = None
    n_chunks = -(-w // chunk)
    return StepSpec(
        width=w,
        chunk=chunk,
        n_chunks=n_chunks,
        topk=min(cfg.topk, n_allowed),
        n_replace=cfg.n_replace,
        spread=cfg.positions == "spread",
        use_mellowmax=cfg.use_mellowmax,
        mellowmax_alpha=float(cfg.mellowmax_alpha),
        top_m=min(cfg.filter_topm if cfg.filter_ids else 1, w),
        data_axes=data_axes,
        order=order,
        buckets=buckets,
        levels=levels,
    )


class _Buffer:
    """Attack buffer of the best suffixes (size max(1, buffer_size)); current = the best."""

    def __init__(self, size: int, accept_worse: bool):
        self.size, self.accept_worse = max(1, size), accept_worse
        self.items: list[tuple[float, tuple[int, ...]]] = []

    def offer(self, loss: float, ids: tuple[int, ...]) -> bool:
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
    from mixat_jax.judges.refusal import refusal_substrings

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
) -> list[GCGResult]:
    """Attacks several behaviours in one compiled step per GCG step (vmapped, padded).

    ``seed`` is one int (behaviour i uses seed + i) or one per behaviour; behaviour i with seed s
    samples exactly the candidates a single-behaviour run with seed s would."""
    cfg = cfg or GCGConfig()
    behaviors, targets = list(behaviors), list(targets)
    if not behaviors or len(behaviors) != len(targets):
        raise ValueError(
            f"need one target per behaviour and at least one; got {len(behaviors)} behaviours "
            f"and {len(targets)} targets"
        )
    seeds = [seed + i for i in range(len(behaviors))] if isinstance(seed, int) else list(seed)
    if len(seeds) != len(behaviors):
        raise ValueError(f"got {len(seeds)} seeds for {len(behaviors)} behaviours")
    renderer = ChatRenderer(tokenizer)
    problems = [
        _prepare(renderer, b, t, cfg, i)
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
    spec = _step_spec(cfg, int(allowed.sum()), mesh, suffix_len=s, n_behaviors=len(problems))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pre_ids, pre_mask, layouts_np, r_len = _host_arrays(problems, int(pad_id), cfg)
    graphdef, *params = nnx.split(model)
    params = tuple(params)

    put = (
        jnp.asarray
        if mesh is None
        else functools.partial(jax.device_put, device=NamedSharding(mesh, PartitionSpec()))
    )
    ctx = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    n_b = len(problems)
    buffers = [_Buffer(cfg.buffer_size, cfg.accept_worse) for _ in range(n_b)]
    for buf, q in zip(buffers, problems, strict=True):
        buf.items = [(float("inf"), q.slots.suffix_ids)]
    with ctx:
        layouts = jax.tree.map(put, layouts_np)
        allowed_dev = put(allowed)
        root_keys = put(jnp.stack([jax.random.key(int(x)) for x in seeds]))
        pargs = (params, put(pre_ids), put(pre_mask))
        exe, compile_s = _compiled(_batched_prefix, pargs, dict(graphdef=graphdef, rest_len=r_len))
        caches = exe(*pargs)
        if cfg.buffer_size > 1:
            compile_s += _init_buffers(
                buffers, problems, renderer, allowed, cfg, seeds, spec, graphdef, params,
                caches, layouts, put,
            )  # fmt: skip
        results = _loop(
            cfg, spec, renderer, model, problems, buffers, graphdef, params, caches, layouts,
            allowed_dev, root_keys, put, progress, compile_s,
        )  # fmt: skip
    return [
        dataclasses.replace(r, behavior=b, target=t)
        for r, b, t in zip(results, behaviors, targets, strict=True)
    ]


def _init_buffers(buffers, problems, renderer, allowed, cfg, seeds, spec, graphdef, params,
                  caches, layouts, put) -> float:  # fmt: skip
    """Fills buffers with random suffixes (nanoGCG's random buffer init) and their losses."""
    extra = cfg.buffer_size - 1
    cands = []
    for q, seed in zip(problems, seeds, strict=True):
        rng = np.random.default_rng(seed)
        cands.append(_random_suffixes(rng, allowed, extra, q.slots, renderer))
    arr = put(np.asarray(cands, np.int32))
    args = (params, caches, arr, layouts)
    exe, compile_s = _compiled(_batched_losses, args, dict(graphdef=graphdef, spec=spec))
    losses = np.asarray(exe(*args)[0])
    for buf, cs, ls in zip(buffers, cands, losses, strict=True):
        for c, loss in zip(cs, ls, strict=True):
            buf.offer(float(loss), c)
    return compile_s


def _loop(cfg, spec, renderer, model, problems, buffers, graphdef, params, caches, layouts,
          allowed_dev, root_keys, put, progress, compile_s) -> list[GCGResult]:  # fmt: skip
    tok = renderer.tokenizer
    n_b = len(problems)
    losses = [[] for _ in range(n_b)]
    strings = [[] for _ in range(n_b)]
    best = [(float("inf"), problems[i].slots.suffix_ids) for i in range(n_b)]
    done = [False] * n_b
    stopped = [False] * n_b
    steps_run = [0] * n_b
    times: list[float] = []
    generator = None
    exe = None
    for step in range(cfg.num_steps):
        t0 = time.perf_counter()
        cur = put(np.asarray([buf.best[1] for buf in buffers], np.int32))
        args = (params, caches, cur, layouts, allowed_dev, root_keys, put(np.int32(step)))
        if exe is None:
            exe, c_s = _compiled(_batched_step, args, dict(graphdef=graphdef, spec=spec))
            compile_s += c_s
            t0 = time.perf_counter()
        out = jax.device_get(exe(*args))
        for b in range(n_b):
            if done[b]:
                continue
            buf, slots = buffers[b], problems[b].slots
            cur_loss, cur_ids = buf.best
            if not np.isfinite(cur_loss):  # first step: the init's loss
                buf.items[0] = (float(out["cur_loss"][b]), cur_ids)
            chosen = None
            for m in range(spec.top_m):
                loss_m = float(out["top_loss"][b, m])
                if not np.isfinite(loss_m):
                    break
                ids_m = tuple(int(t) for t in out["top_ids"][b, m])
                if not cfg.filter_ids or slots.retokenizes(renderer, ids_m):
                    chosen = (loss_m, ids_m, bool(out["top_hit"][b, m]))
                    break
            accepted = chosen is not None and buf.offer(chosen[0], chosen[1])
            loss_now, ids_now = buf.best
            if cfg.accept_worse and accepted:
                loss_now, ids_now = chosen[0], chosen[1]
            suffix = tok.decode(list(ids_now), skip_special_tokens=False)
            losses[b].append(loss_now)
            strings[b].append(suffix)
            if loss_now < best[b][0]:
                best[b] = (loss_now, ids_now)
            steps_run[b] = step + 1
            if cfg.early_stop and accepted and chosen[2]:
                done[b] = stopped[b] = True
            if cfg.check_refusal and not done[b] and (
                step % cfg.eval_steps == 0 or step == cfg.num_steps - 1
            ) and loss_now < cfg.check_refusal_min_loss:  # fmt: skip
                if generator is None:
                    from mixat_jax.sampling import TextGenerator

                    generator = TextGenerator(model, tok, batch_size=1)
                out_ids = generator.generate_ids(
                    [slots.prompt_ids(ids_now)], max_new_tokens=cfg.refusal_max_new_tokens
                )[0]
                if not _refuses(tok.decode(out_ids, skip_special_tokens=False)):
                    done[b] = stopped[b] = True
            if progress is not None:
                progress(StepReport(b, step + 1, cfg.num_steps, loss_now, best[b][0], suffix,
                                    time.perf_counter() - t0))  # fmt: skip
        times.append(time.perf_counter() - t0)
        if all(done):
            break
    per_step = float(np.median(times[1:] if len(times) > 1 else times)) if times else 0.0
    results = []
    for b in range(n_b):
        slots = problems[b].slots
        final_ids = buffers[b].best[1]
        results.append(
            GCGResult(
                best_loss=float(best[b][0]),
                best_string=tok.decode(list(best[b][1]), skip_special_tokens=False),
                best_ids=tuple(best[b][1]),
                losses=[float(x) for x in losses[b]],
                strings=strings[b],
                num_steps=steps_run[b],
                seconds_per_step=per_step,
                compile_seconds=float(compile_s),
                stopped_early=stopped[b],
                best_test_case=slots.test_case(tok, best[b][1]),
                final_string=strings[b][-1] if strings[b] else "",
                final_test_case=slots.test_case(tok, final_ids),
            )
        )
    return results


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
) -> GCGResult:
    """GCG against ``model`` (its current, possibly LoRA-adapted, parameters) for one behaviour.

    ``behavior`` may contain ``{optim_str}`` to place the adversarial string; otherwise it is
    appended after a space. ``progress`` receives a ``StepReport`` after every step."""
    return run_gcg_batch(
        model, tokenizer, [behavior], [target], cfg, seed=[seed], mesh=mesh, progress=progress
    )[0]
