"""What every ``python -m mixat_jax.*`` entry point shares: exit codes, one-line errors, Ctrl-C,
and the check that an output directory is usable before any work starts.

Contract (README, WORKSPACE "Develop"): bad input prints exactly one ``error: ...`` line on stderr
and exits with status 2, leaving what the output directory already holds intact; a run stopped by
SIGTERM exits 143 and by Ctrl-C (SIGINT) 130, after one line saying where its state is and that
re-running the same command resumes. No traceback reaches the user for any of these.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from mixat_jax import storage

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_PREEMPTED = 143  # 128 + SIGTERM


class Stopped(Exception):
    """A run stopped on a signal after saving its state; carries the message and exit status."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def one_line(e: BaseException) -> str:
    """The exception's message on a single line (whitespace runs collapsed)."""
    return " ".join(str(e).split()) or type(e).__name__


def check_output_dir(path: str | Path, flag: str = "--workdir", *, allow_url: bool = False):
    """Raises ValueError (one line naming the path) unless ``path`` is, or can become, a directory
    this process can write to. Creates nothing that was not there: directories made for the probe
    are removed again, so a later bad-input error still leaves the file system as it was.

    A URL (``gs://...``) is refused unless ``allow_url`` (entry points whose outputs go through
    :mod:`mixat_jax.storage`: training); an allowed URL is checked without touching the remote
    side (supported scheme, fsspec backend installed) and returned as an ``epath.Path``."""
    if storage.is_url(path):
        if not allow_url:
            raise ValueError(f"{flag} {str(path)!r} is a URL; this command writes to a local or "
                             "shared file system only: pass a directory")  # fmt: skip
        storage.check_url(path, flag)
        return storage.run_path(path)
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a file; pass a directory")
    missing = []
    q = p
    while not q.exists():
        missing.append(q)
        if q.parent == q:
            break
        q = q.parent
    try:
        for d in reversed(missing):
            d.mkdir()
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        where = e.filename or p
        reason = e.strerror or errno.errorcode.get(e.errno or 0, type(e).__name__)
        raise ValueError(
            f"{flag} {str(path)!r} is unusable: cannot create or write {str(where)!r} ({reason}); "
            "pass a directory you can write to"
        ) from None
    finally:
        for d in missing:  # deepest first
            try:
                d.rmdir()
            except OSError:
                pass
    return p


def run_main(main: Callable[[], int]) -> int:
    """Runs an entry point's body and turns the expected ways of stopping into exit statuses.

    ValueError -> ``error: ...`` and 2; an OSError on a named file (unwritable output, disk full)
    -> one line naming the file and 2; :class:`Stopped` -> its message and status; Ctrl-C outside
    a checkpointing loop -> one line and 130 (files already written stay as they are).
    transformers' advisory line "PyTorch was not found ..." (the runtime needs no torch) is off, so
    a bad-input error stays one line."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        return main()
    except ValueError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Stopped as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(
            "interrupted; outputs already written are intact, and re-running the same command "
            "resumes where the run can",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except OSError as e:
        if e.filename is None:
            raise
        print(
            f"error: cannot use {str(e.filename)!r}: {e.strerror or one_line(e)}", file=sys.stderr
        )
        return EXIT_BAD_INPUT


def last_line(e: BaseException) -> str:
    """The last non-empty line of an exception's text (absl / config-file errors are multi-line)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def initialize_distributed(jax) -> None:
    """``jax.distributed.initialize`` for an entry point started with ``MIXAT_JAX_DISTRIBUTED=1``
    (``launch/``): arguments from ``MIXAT_JAX_COORDINATOR`` / ``MIXAT_JAX_NUM_PROCESSES`` /
    ``MIXAT_JAX_PROCESS_ID`` when set (local multi-process runs), auto-detected otherwise (TPU VMs,
    SLURM, GKE); ``MIXAT_JAX_LOCAL_DEVICE_IDS`` / ``MIXAT_JAX_INIT_TIMEOUT`` add
    ``local_device_ids`` / ``initialization_timeout`` (:func:`distributed_env_kwargs`).
    CPU processes exchange collectives through gloo. ``jax`` is passed in so that
    importing this module stays free of jax."""
    env = os.environ
    platforms = env.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
    if platforms.split(",")[0].strip() == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if env.get("MIXAT_JAX_COORDINATOR"):
        kwargs["coordinator_address"] = env["MIXAT_JAX_COORDINATOR"]
    if env.get("MIXAT_JAX_NUM_PROCESSES"):
        kwargs["num_processes"] = int(env["MIXAT_JAX_NUM_PROCESSES"])
    if env.get("MIXAT_JAX_PROCESS_ID"):
        kwargs["process_id"] = int(env["MIXAT_JAX_PROCESS_ID"])
    kwargs.update(distributed_env_kwargs(env))
    jax.distributed.initialize(**kwargs)


def _env_int(env: Mapping[str, str], name: str, minimum: int) -> int:
    try:
        value = int(env[name])
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ValueError(f"{name}={env[name]!r} must be an integer >= {minimum}")
    return value


def distributed_env_kwargs(env: Mapping[str, str]) -> dict:
    """The ``jax.distributed.initialize`` arguments set by the launch environment (issue #16):

    * ``MIXAT_JAX_LOCAL_DEVICE_IDS``: unset/empty -> JAX auto-detects (its SLURM detection binds
      ``[SLURM_LOCALID]``); ``all`` -> every accelerator this process sees (one process per node
      owning all its GPUs: ``range(local device count)``, counted without initialising a
      backend from ``CUDA_VISIBLE_DEVICES`` when set); ``0,1,2`` -> that list;
    * ``MIXAT_JAX_INIT_TIMEOUT``: seconds to wait for the other processes
      (``initialization_timeout``)."""
    kwargs: dict = {}
    ids = env.get("MIXAT_JAX_LOCAL_DEVICE_IDS", "").strip()
    if ids == "all":
        kwargs["local_device_ids"] = _all_local_device_ids(env)
    elif ids:
        try:
            kwargs["local_device_ids"] = [int(x) for x in ids.split(",")]
        except ValueError:
            raise ValueError(f"MIXAT_JAX_LOCAL_DEVICE_IDS={ids!r}: use 'all' or a comma-separated "
                             "list of device ordinals such as 0,1,2,3") from None  # fmt: skip
        if any(i < 0 for i in kwargs["local_device_ids"]) or len(set(kwargs["local_device_ids"])) \
                != len(kwargs["local_device_ids"]):  # fmt: skip
            raise ValueError(f"MIXAT_JAX_LOCAL_DEVICE_IDS={ids!r}: ordinals must be distinct "
                             "and >= 0")  # fmt: skip
    if env.get("MIXAT_JAX_INIT_TIMEOUT", "").strip():
        kwargs["initialization_timeout"] = _env_int(env, "MIXAT_JAX_INIT_TIMEOUT", 1)
    return kwargs


def _all_local_device_ids(env: Mapping[str, str]) -> list[int]:
    """Ordinals of every GPU this process sees: ``CUDA_VISIBLE_DEVICES`` renumbers the visible
    ones 0..n-1; without it, ask the CUDA plugin for its device count (no backend starts)."""
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible:
        return list(range(len([v for v in visible.split(",") if v.strip()])))
    count = cuda_device_count()
    if count < 1:
        raise ValueError("MIXAT_JAX_LOCAL_DEVICE_IDS=all: no GPU visible to this process (set "
                         "CUDA_VISIBLE_DEVICES or pass the ordinals, e.g. 0,1,2,3)")  # fmt: skip
    return list(range(count))


def cuda_device_count() -> int:
    """GPUs the CUDA driver reports (0 when unknown), read before jax starts a backend."""
    try:
        import ctypes

        lib = ctypes.CDLL("libcuda.so.1")
        if lib.cuInit(0) != 0:
            return 0
        n = ctypes.c_int()
        return int(n.value) if lib.cuDeviceGetCount(ctypes.byref(n)) == 0 else 0
    except OSError:
        return 0


def parse_flags_one_line(flag_values, argv: list[str]) -> list[str]:
    """absl flag parsing (``flags_parser=`` of ``app.run``) with every flag or config-file error
    reduced to one ``error:`` line and status 2; an unknown ``--config.x`` is named as such."""
    from absl import flags  # lazy: absl only for the entry points that parse flags

    try:
        return flag_values(argv)
    except (flags.Error, AttributeError, KeyError, ValueError) as e:
        kind = "unknown config field " if isinstance(e, AttributeError | KeyError) else ""
        print(f"error: {kind}{last_line(e)}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def check_workdir_config(
    workdir: storage.PathLike,
    config_json: Mapping,
    *,
    free_keys: tuple[str, ...] = (),
    config_file: str = "config.json",
    what: str = "a run",
) -> None:
    """Refuse a workdir that holds ``what`` of another config: its ``config_file`` differs from
    ``config_json`` in a top-level key other than ``free_keys`` (those a resumed run may change).
    A missing config file is a fresh workdir; a workdir that is a file or holds unreadable JSON is
    refused too. One-line ValueErrors naming the differing fields and the fix. A URL workdir is
    read through :mod:`mixat_jax.storage` (never ``pathlib``)."""
    workdir = storage.run_path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"workdir {str(workdir)!r} is a file; pass a directory")
    path = workdir / config_file
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg}); use a new --workdir") from None
    a = {k: v for k, v in old.items() if k not in free_keys}
    b = {k: v for k, v in dict(config_json).items() if k not in free_keys}
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if diff:
        raise ValueError(
            f"workdir {str(workdir)!r} holds {what} with a different config (fields {diff} "
            "differ); use a new --workdir or the original config"
        )
