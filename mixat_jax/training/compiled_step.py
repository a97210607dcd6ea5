"""``train_step`` compiled for a device mesh (``jax.jit``) or for devices (``jax.pmap``)
(MixAT spec §3.1, §12 "Jit boundaries"; DESIGN.md rule 3).

* :class:`JittedTrainStep` (``make_jitted_train_step``): global single-device semantics on a
  ``(data, fsdp, tensor)`` mesh. Parameters and optimizer moments are laid out by their logical
  axes under the run's rules (``rules``, default ``mesh.DEFAULT_RULES``; the loop passes
  ``config.mesh.rules``, the same rules it places the state with, issue #17) via
  ``state.train_state_shardings``, the batch's slot axis over ``(data, fsdp)``
  (:func:`step_batch_shardings`); LoRA, optimizer state and step are donated, the frozen base
  and ē are not. ONE ``jax.jit`` object serves every state and batch shape: the input layouts
  are those of the (placed) arguments, the output state is pinned to the input state's layout
  inside the program, and jax's own cache keys executables by the arguments' structure
  (``graphdef`` and the optimizer ``tx`` are static parts of ``TrainState``), shapes and
  shardings. The optimizer is the state's (``state.tx``), never a second copy.
* :func:`make_pmapped_train_step`: data-parallel semantics (each device's micro-batches are
  micro-batches of the global step; gradients ``pmean``-ed, metrics reduced over devices).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mixat_jax import mesh as mesh_lib
from mixat_jax.training.state import TrainState, train_state_shardings
from mixat_jax.training.step_config import StepConfig
from mixat_jax.training.train_step import train_step, with_microbatch_axis


def step_batch_shardings(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
    """[G, slots, ...] arrays: the slot axis over (data, fsdp) where divisible, else replicated."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    out = {}
    for k, v in batch.items():
        shape = np.shape(v)
        if len(shape) >= 2 and shape[1] % n == 0 and n > 1:
            spec = PartitionSpec(None, ("data", "fsdp"), *([None] * (len(shape) - 2)))
        else:
            spec = PartitionSpec()
        out[k] = NamedSharding(mesh, spec)
    return out


def _mesh_train_step(donated: TrainState, kept, batch, key, *, cfg: StepConfig, mesh: Mesh, rules):
    """``train_step`` on ``donated`` (the state without frozen base and ē) + ``kept`` (frozen,
    ē); returns ((lora, opt_state, step), metrics) in the input state's layout, metrics
    replicated."""
    frozen, emb_norm = kept
    state = donated.replace(frozen=frozen, emb_norm=emb_norm)
    new, metrics = train_step(state, batch, key, cfg=cfg)
    sh = train_state_shardings(state, mesh, rules)
    out = jax.lax.with_sharding_constraint(
        (new.lora, new.opt_state, new.step), (sh.lora, sh.opt_state, sh.step)
    )
    metrics = jax.lax.with_sharding_constraint(metrics, NamedSharding(mesh, PartitionSpec()))
    return out, metrics


def _global_key(key, mesh: Mesh):
    """``key`` replicated over the mesh. A host-local typed key cannot be ``device_put`` onto
    devices of other processes, so its raw data (identical on every process) is placed and
    wrapped again."""
    if jax.process_count() == 1 or (isinstance(key, jax.Array) and not key.is_fully_addressable):
        return key
    data = jax.device_put(
        np.asarray(jax.random.key_data(key)), NamedSharding(mesh, PartitionSpec())
    )
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(key))


class JittedTrainStep:
    """``train_step`` jitted on a mesh: ``step(state, batch, key) -> (state, metrics)``.

    See the module docstring for layouts and donation. ``lower(...)`` gives the
    ``jax.stages.Lowered`` (arguments may be concrete or ``jax.ShapeDtypeStruct``s);
    ``compile(...)`` the executable that ``__call__`` runs (jax caches it, so
    ``step.compile(...).memory_analysis()`` costs no second compilation). ``compiler_options``
    are passed to XLA (e.g. ``{"xla_backend_optimization_level": 0}`` for fast CPU tests).
    """

    def __init__(
        self,
        cfg: StepConfig,
        mesh: Mesh,
        compiler_options: dict[str, Any] | None = None,
        rules=mesh_lib.DEFAULT_RULES,
    ):
        if cfg.pmap_axis_name is not None:
            raise ValueError("make_jitted_train_step needs cfg.pmap_axis_name=None (jit, not pmap)")
        if not isinstance(mesh, Mesh):
            raise TypeError(
                f"make_jitted_train_step(cfg, mesh, ...) got {type(mesh).__name__} for mesh; the "
                "optimizer is the state's own (state.tx) and is not passed"
            )
        self.cfg, self.mesh, self.compiler_options = cfg, mesh, compiler_options
        self.rules = tuple(tuple(r) for r in rules)
        self._jitted = jax.jit(
            functools.partial(_mesh_train_step, cfg=cfg, mesh=mesh, rules=self.rules),
            donate_argnums=(0,),
            compiler_options=compiler_options,
        )

    def _args_and_shardings(self, state: TrainState, batch, key):
        """(args, their shardings) of the jitted function."""
        batch = with_microbatch_axis(batch)
        sh = train_state_shardings(state, self.mesh, self.rules)
        donated = state.replace(frozen=None, emb_norm=None)
        args = (donated, (state.frozen, state.emb_norm), batch, key)
        shardings = (
            sh.replace(frozen=None, emb_norm=None),
            (sh.frozen, sh.emb_norm),
            step_batch_shardings(batch, self.mesh),
            NamedSharding(self.mesh, PartitionSpec()),
        )
        return args, shardings

    def lower(self, state: TrainState, batch, key) -> jax.stages.Lowered:
        args, shardings = self._args_and_shardings(state, batch, key)

        def abstract(sharding, subtree):
            return jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), subtree
            )

        return self._jitted.lower(*jax.tree.map(abstract, shardings, args))

    def compile(self, state: TrainState, batch, key) -> jax.stages.Compiled:
        return self.lower(state, batch, key).compile()

    def __call__(self, state: TrainState, batch, key):
        args, shardings = self._args_and_shardings(state, batch, _global_key(key, self.mesh))
        (lora, opt_state, step), metrics = self._jitted(*jax.device_put(args, shardings))
        return state.replace(lora=lora, opt_state=opt_state, step=step), metrics


def make_jitted_train_step(
    cfg: StepConfig,
    mesh: Mesh,
    compiler_options: dict[str, Any] | None = None,
    *,
    rules=mesh_lib.DEFAULT_RULES,
) -> JittedTrainStep:
    """``train_step`` under ``jax.jit`` with mesh shardings (logical ``rules``) and donation
    (see JittedTrainStep)."""
    return JittedTrainStep(cfg, mesh, compiler_options, rules)


def make_pmapped_train_step(cfg: StepConfig, axis_name: str = "devices"):
    """``train_step`` under ``jax.pmap``: state replicated per device, batch split per device
    (leading device axis, then [G, ...]), one key shared by all devices."""
    cfg = cfg.replace(pmap_axis_name=axis_name)
    return jax.pmap(
        functools.partial(train_step, cfg=cfg),
        axis_name=axis_name,
        in_axes=(0, 0, None),
        donate_argnums=(0,),
    )
