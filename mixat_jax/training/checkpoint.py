"""Orbax checkpoints of the training state plus host metadata (DESIGN.md rule 8; spec §3.1).

A checkpoint step holds two items:

* ``state``: any pytree of jax/numpy arrays (LoRA params, optimizer state, step, RNG key),
  sharded arrays included (restored onto the shardings of the abstract target);
* ``meta``: a JSON dict for the host side — data position (epoch, micro-batch), numpy RNG state
  (:func:`rng_state`), config hash (:func:`config_hash`), schedule name, ...

Saves are asynchronous (call :meth:`Checkpointer.wait_until_finished` before exiting); orbax
writes into a temporary directory and renames it when complete, so a failed or interrupted save
never replaces an existing checkpoint and old steps are only deleted (``max_to_keep``) after a
new one is finalised. :func:`install_sigterm_handler` turns pod preemption (SIGTERM) into a flag
the loop polls to save and exit cleanly; a killed run resumes from its workdir.

Multi-host (issue #16, "preemption is not agreed between hosts"): each process has its own flag,
and a signal may reach only some hosts, or reach them at different steps. The loop therefore
never reads the flag directly but calls :meth:`PreemptionFlag.agree` once per step (and once per
GCG step inside a rewrite): an all-gather of one int over all processes, so every process takes
the same decision at the same step and they all save the same checkpoint and leave together
(instead of one waiting in an orbax barrier while the others wait in a collective). jax's own
preemption sync point (``multihost_utils.reached_preemption_sync_point``, behind orbax's
``reached_preemption``) is not used: its notifier is a C++ SIGTERM handler that the Python
handler here replaces, it ignores Ctrl-C and the in-GCG poll, and it is off on CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

STATE_ITEM = "state"
META_ITEM = "meta"


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """JSON-able state of a numpy Generator (restore with :func:`rng_from_state`)."""
    return rng.bit_generator.state


def rng_from_state(state: Mapping[str, Any]) -> np.random.Generator:
    """A numpy Generator continuing exactly where :func:`rng_state` left it."""
    name = state.get("bit_generator")
    if not isinstance(name, str) or not hasattr(np.random, name):
        raise ValueError(
            f"unknown numpy bit generator {name!r} in RNG state; save it with rng_state"
        )
    bit_gen = getattr(np.random, name)()
    bit_gen.state = dict(state)
    return np.random.Generator(bit_gen)


def config_hash(config: Mapping[str, Any]) -> str:
    """Short stable hash of a JSON-able config dict (to refuse resuming a different run)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _abstract(tree: Any) -> Any:
    """Concrete arrays -> ShapeDtypeStruct (keeping shardings); abstract leaves unchanged."""

    def leaf(x: Any) -> Any:
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, np.ndarray | np.generic):
            return np.zeros(np.shape(x), dtype=np.asarray(x).dtype)
        return x

    return jax.tree.map(leaf, tree)


class Checkpointer:
    """Thin wrapper around ``orbax.checkpoint.CheckpointManager`` for (state, meta) steps."""

    def __init__(
        self,
        directory: str,
        *,
        max_to_keep: int | None = 1,
        save_interval_steps: int = 1,
        async_save: bool = True,
    ) -> None:
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None; got {max_to_keep}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.directory = str(directory)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(STATE_ITEM, META_ITEM)
        )

    # -- saving ---------------------------------------------------------------------------

    def save(self, step: int, state: Any, meta: Mapping[str, Any], *, force: bool = False) -> bool:
        """Start saving ``state`` and ``meta`` at ``step``; False if skipped (interval/exists).

        ``meta`` must be JSON-serialisable; it is checked before anything is written.
        """
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"checkpoint meta is not JSON-serialisable ({e}); store plain ints/floats/str/"
                "lists/dicts (use rng_state() for numpy generators)"
            ) from e
        if step in self._manager.all_steps():
            logging.warning("checkpoint step %d already exists in %s; not overwriting", step, self)
            return False
        args = ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardSave(state), META_ITEM: ocp.args.JsonSave(dict(meta))}
        )
        return bool(self._manager.save(step, args=args, force=force))

    def wait_until_finished(self) -> None:
        """Block until pending asynchronous saves are committed (raises their errors)."""
        self._manager.wait_until_finished()

    # -- restoring ------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restore step ``step`` onto the shapes/dtypes/shardings of ``abstract_state``."""
        if step not in self._manager.all_steps():
            raise ValueError(
                f"no checkpoint step {step} in {self.directory}; available: {self.all_steps()}"
            )
        args = ocp.args.Composite(
            **{
                STATE_ITEM: ocp.args.StandardRestore(_abstract(abstract_state)),
                META_ITEM: ocp.args.JsonRestore(),
            }
        )
        restored = self._manager.restore(step, args=args)
        return restored[STATE_ITEM], dict(restored[META_ITEM])

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
        """``(state, meta)`` of the newest step, or None when the directory has none."""
        step = self.latest_step()
        if step is None:
            return None
        return self.restore(step, abstract_state)

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpointer({self.directory!r})"


class PreemptionFlag:
    """Set by SIGTERM (pod preemption) or SIGINT (Ctrl-C); the training loop calls
    :meth:`agree` before each step (all processes decide together), saves a checkpoint and
    stops."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    @property
    def status(self) -> str:
        """ "interrupted" (Ctrl-C) or "preempted" (SIGTERM or a multi-host preemption sync)."""
        return "interrupted" if self.signum == signal.SIGINT else "preempted"

    def set(self, signum: int | None = None) -> None:
        self.signum = signum
        self._event.set()

    def agree(self) -> bool:
        """COLLECTIVE (every process must call it at the same point): True on every process iff
        any process's flag is set. A process that was not signalled adopts the agreed signal
        (SIGTERM over SIGINT), so all report the same :attr:`status` and exit status."""
        if jax.process_count() == 1:
            return self.requested
        mine = (self.signum or 1) if self.requested else 0
        got = multihost_utils.process_allgather(np.asarray([mine], np.int32))
        agreed = int(np.max(got))
        if agreed and not (self.requested and self.signum == agreed):
            self.set(None if agreed == 1 else agreed)
        return bool(agreed)

    def restore(self) -> None:
        """Puts back the handlers that were installed before (Ctrl-C raises KeyboardInterrupt
        again once the loop is over)."""
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}


def install_sigterm_handler(
    callback: Callable[[int], None] | None = None,
    *,
    signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT),
) -> PreemptionFlag:
    """Install a handler that only sets a flag (and calls ``callback(signum)``, keep it cheap).

    The loop then saves a checkpoint at the current step and exits; nothing heavy happens inside
    the signal handler. A second Ctrl-C while the flag is already set raises KeyboardInterrupt
    (stop now, without the final save; the last periodic checkpoint is intact because orbax
    finalises a checkpoint only once it is complete). Must be called from the main thread.
    """
    flag = PreemptionFlag()

    def handler(signum: int, frame: object) -> None:
        del frame
        if signum == signal.SIGINT and flag.requested:
            raise KeyboardInterrupt
        flag.set(signum)
        if callback is not None:
            callback(signum)

    if threading.current_thread() is not threading.main_thread():
        raise ValueError("install_sigterm_handler must be called from the main thread")
    for s in signals:
        flag._previous[s] = signal.signal(s, handler)
    return flag
