"""Run directories that are local paths or URLs (issue #16, "gs:// workdirs become per-host local
directories"): a workdir string is never passed through ``pathlib.Path``.

``pathlib.Path("gs://bucket/run")`` is the RELATIVE local path ``gs:/bucket/run``: every host would
write config, metrics, checkpoints and the adapter to its own disk. :func:`run_path` returns an
``etils.epath.Path`` instead, for local paths and URLs alike; ``str()`` of it gives the URL back
unchanged (``gs://bucket/run``) and ``/`` joins keep the scheme. URLs are read and written through
fsspec (``gs://`` needs ``gcsfs``, installed by ``pip install 'etils[epath-gcs]'``; ``s3://``
needs ``s3fs``); orbax takes the same strings (it writes arrays with tensorstore's gcs driver).

Object stores have no rename and no append: :func:`write_text_atomic` writes a URL object in one
upload (an object appears only complete) and a local file via temp file + ``os.replace``;
:func:`copy_dir` uploads a locally staged directory (the PEFT adapter, TensorBoard events).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from etils import epath

URL_SCHEMES = {"gs": "gcsfs", "s3": "s3fs"}  # scheme -> the fsspec backend package it needs
INSTALL_HINT = {"gs": "pip install 'etils[epath-gcs]'", "s3": "pip install 'etils[epath-s3]'"}

PathLike = str | os.PathLike


def is_url(path: PathLike) -> bool:
    """True for ``scheme://...`` strings and epath URL paths (``gs://``, ``s3://``, ...)."""
    return "://" in os.fspath(path)


def url_scheme(path: PathLike) -> str | None:
    s = os.fspath(path)
    return s.split("://", 1)[0] if "://" in s else None


def check_url(path: PathLike, flag: str = "--workdir") -> None:
    """One-line ValueError unless ``path`` is a URL of a supported scheme whose fsspec backend is
    installed (no network access: nothing is probed on the remote side)."""
    scheme = url_scheme(path)
    if scheme not in URL_SCHEMES:
        raise ValueError(
            f"{flag} {os.fspath(path)!r}: URL scheme {scheme!r} is not supported; use "
            f"{' or '.join(s + '://' for s in URL_SCHEMES)} or a local/shared directory"
        )
    if importlib.util.find_spec(URL_SCHEMES[scheme]) is None:
        raise ValueError(
            f"{flag} {os.fspath(path)!r} needs the {URL_SCHEMES[scheme]} package; install it with "
            f"{INSTALL_HINT[scheme]}"
        )


def run_path(path: PathLike) -> epath.Path:
    """The path object for a workdir (or anything below one): an ``epath.Path``; a URL keeps its
    scheme (``str(run_path("gs://b/r") / "x") == "gs://b/r/x"``); ``~`` expands for local paths."""
    if isinstance(path, epath.Path):
        return path
    s = os.fspath(path)
    if is_url(s):
        if url_scheme(s) not in URL_SCHEMES:
            check_url(s, "path")  # raises the one-line error
        return epath.Path(s)
    return epath.Path(os.path.expanduser(s))


def local_path(path: PathLike) -> Path:
    """A ``pathlib.Path`` for a LOCAL path; a URL is refused (it must never become one)."""
    if is_url(path):
        raise ValueError(f"{os.fspath(path)!r} is a URL; this needs a local or shared directory")
    return Path(os.fspath(path)).expanduser()


def absolute(path: PathLike) -> str:
    """The string to hand to libraries that take paths (orbax): a URL unchanged, a local path
    made absolute."""
    return os.fspath(path) if is_url(path) else os.path.abspath(os.fspath(local_path(path)))


def write_text_atomic(path: PathLike, text: str) -> None:
    """Write ``text`` so a reader never sees half of it: one upload for a URL, temp file +
    ``os.replace`` locally. The parent directory is created."""
    p = run_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if is_url(p):
        p.write_text(text)
        return
    tmp = p.parent / (p.name + ".tmp")
    tmp.write_text(text)
    os.replace(os.fspath(tmp), os.fspath(p))


def copy_dir(src: PathLike, dst: PathLike) -> None:
    """Copy the files of the local directory ``src`` (recursively) into ``dst`` (local or URL),
    overwriting same-named files; files only in ``dst`` stay."""
    src_p = local_path(src)
    for f in sorted(src_p.rglob("*")):
        if f.is_file():
            out = run_path(dst) / f.relative_to(src_p).as_posix()
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(f.read_bytes())


def replace_dir(staged: PathLike, dst: PathLike) -> None:
    """Make ``dst`` hold exactly the local directory ``staged`` (which is consumed). Locally an
    atomic rename; for a URL the old objects are removed and the files uploaded (an object store
    has no directory rename)."""
    d = run_path(dst)
    if not is_url(d):
        shutil.rmtree(os.fspath(d), ignore_errors=True)
        os.replace(os.fspath(local_path(staged)), os.fspath(d))
        return
    if d.exists():
        d.rmtree()
    copy_dir(staged, d)
    shutil.rmtree(os.fspath(local_path(staged)), ignore_errors=True)
