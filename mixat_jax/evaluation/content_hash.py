"""Content fingerprints of the models an evaluation run uses (issue #17 "content-keyed cache";
spec mixat.md §8.1 pipeline, resumable).

Cached test cases, completions and judgements are keyed on what the models *contain*, not on
where they live: training writes its adapter in place, so a path says nothing about which weights
produced a cached completion. A model's fingerprint is the SHA-256 over the sorted
(file name, SHA-256 of the file's bytes) pairs of every file that loading reads: the top-level
files of the checkpoint / adapter directory whose names end in one of `HASHED_SUFFIXES`
(weights `*.safetensors` / `*.gguf`, `config.json`, `adapter_config.json`, tokenizer and chat
template files; hidden files and sub-directories such as `original/` are not read by the loader
and are skipped). A single file (a GGUF checkpoint) is fingerprinted by its own bytes.

Full hashes, no sampling: a sampled digest could miss a retrained adapter that differs in a few
tensors, so every byte is read once. To avoid re-reading a 16 GB model on every call, each file's
digest is cached in `OUT/cache/file_hashes.json` (or the file named by the environment variable
`MIXAT_JAX_HASH_CACHE`, shared by all work directories: then a model is read once per machine,
not once per work directory) under the key (resolved path, size, mtime_ns,
ctime_ns, inode). A file replaced in place always changes that key: writing or truncating it
updates mtime and ctime; a copy that preserves mtime (`cp -p`, `rsync -t`, `touch -d`) still sets
ctime to the time of the change (ctime cannot be set by a user) and a rename-over gives a new
inode. Only a file system that does not maintain ctime could serve a stale digest; for that case
(or for certainty) `--config.rehash_models=True` ignores the cached digests and reads every file
again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

HASHED_SUFFIXES = (
    ".safetensors",
    ".gguf",
    ".json",
    ".model",
    ".txt",
    ".jinja",
    ".tiktoken",
)
_CHUNK = 1 << 22
ENV_HASH_CACHE = "MIXAT_JAX_HASH_CACHE"


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hashed_files(path: str | Path) -> list[Path]:
    """The files whose bytes make up the fingerprint of a model directory (or the file itself)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise ValueError(f"model path not found: {path}; pass a local checkpoint directory")
    return sorted(
        f
        for f in p.iterdir()
        if f.is_file() and not f.name.startswith(".") and f.name.endswith(HASHED_SUFFIXES)
    )


class ContentFingerprints:
    """Per-file digests cached by (path, size, mtime_ns, ctime_ns, inode) in `cache_path` (JSON;
    written only after a file had to be hashed), and model fingerprints memoised per path."""

    def __init__(self, cache_path: str | Path | None = None, *, rehash: bool = False) -> None:
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.rehash = rehash
        self.files_hashed = 0  # files read in this process (tests, logs)
        self._files: dict[str, dict[str, Any]] | None = None
        self._models: dict[str, dict[str, Any]] = {}

    def _load(self) -> dict[str, dict[str, Any]]:
        if self._files is None:
            self._files = {}
            if self.cache_path is not None and self.cache_path.is_file() and not self.rehash:
                try:
                    doc = json.loads(self.cache_path.read_text(encoding="utf-8"))
                    if isinstance(doc, dict):
                        self._files = {k: v for k, v in doc.items() if isinstance(v, dict)}
                except (OSError, json.JSONDecodeError):
                    self._files = {}  # a damaged cache only costs a re-hash
        return self._files

    def _save(self) -> None:
        if self.cache_path is None:
            return
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_path.with_name(self.cache_path.name + ".tmp")
        tmp.write_text(json.dumps(self._load(), indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, self.cache_path)

    def file_digest(self, path: Path) -> str:
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        files = self._load()
        key = str(path.resolve())
        hit = files.get(key)
        if hit is not None and hit.get("stamp") == stamp and isinstance(hit.get("sha256"), str):
            return hit["sha256"]
        digest = _file_digest(path)
        self.files_hashed += 1
        files[key] = {"stamp": stamp, "sha256": digest}
        self._save()
        return digest

    def model(self, path: str | Path) -> dict[str, Any]:
        """{"path", "sha256", "files": {name: sha256}, "bytes"} of a model directory or file."""
        key = str(Path(path).resolve())
        if key not in self._models:
            files = hashed_files(path)
            if not files:
                raise ValueError(
                    f"{path}: no model files to fingerprint (expected *.safetensors / *.json)"
                )
            digests = {f.name: self.file_digest(f) for f in files}
            whole = hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()
            self._models[key] = {
                "path": key,
                "sha256": whole,
                "files": digests,
                "bytes": sum(f.stat().st_size for f in files),
            }
        return self._models[key]

    def used(self) -> Mapping[str, dict[str, Any]]:
        """Fingerprints computed so far, by resolved path."""
        return dict(self._models)
