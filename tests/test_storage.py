"""Remote workdirs stay remote (issue #16): ``mixat_jax.storage`` and every writer of a training run.

``gs://`` is exercised for real at the path layer: a fake fsspec ``gcs`` filesystem (a local
directory standing in for the bucket, recording every path it is asked about) is registered
for the protocol that ``etils.epath`` uses for ``gs://`` URLs. A 2-step tiny training run with
``--workdir gs://bucket/run`` must then put config.json, metrics.jsonl, tb/, pap_pool.jsonl and
adapter/ into the bucket, hand orbax the URL unchanged, and create nothing locally (no relative
``gs:`` directory). Orbax itself writes ``gs://`` arrays through tensorstore's gcs driver (network),
so the run's checkpointer is replaced by a recorder of the directory and steps it is given.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import fsspec
import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.local import LocalFileSystem

from mixat_jax import cli, storage
from tests.fast_compile import FAST_COMPILE_XLA_FLAGS

ROOT = pathlib.Path(__file__).resolve().parents[1]
URL = "gs://bucket/run"


class FakeGCS(LocalFileSystem):
    """``gs://B/K`` -> ``root/B/K`` on local disk; remembers every URL it was handed."""

    protocol = ("gs", "gcs")
    root = ""
    seen: list[str] = []

    @classmethod
    def _strip_protocol(cls, path):
        path = os.fspath(path)
        if path.startswith(("gs://", "gcs://")):
            cls.seen.append(path)
            path = cls.root + "/" + path.split("://", 1)[1]
        return super()._strip_protocol(path)


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    bucket_root = tmp_path / "fake_gcs"
    bucket_root.mkdir()
    monkeypatch.setattr(FakeGCS, "root", str(bucket_root))
    monkeypatch.setattr(FakeGCS, "seen", [])
    monkeypatch.setitem(storage.URL_SCHEMES, "gs", "fsspec")  # the "backend" is installed
    old = {p: fsspec.registry.get(p) for p in ("gs", "gcs")}
    for p in ("gs", "gcs"):
        fsspec.register_implementation(p, FakeGCS, clobber=True)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    yield bucket_root
    for p, cls in old.items():
        if cls is not None:
            fsspec.register_implementation(p, cls, clobber=True)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()


def _files(root: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_url_round_trips_unchanged_and_never_becomes_local():
    assert str(pathlib.Path(URL)) == "gs:/bucket/run"  # the bug storage exists to avoid
    p = storage.run_path(URL)
    assert str(p) == URL and os.fspath(p) == URL
    assert str(p / "checkpoints") == URL + "/checkpoints"
    assert str(storage.run_path(p / "adapter")) == URL + "/adapter"
    assert storage.absolute(p / "checkpoints") == URL + "/checkpoints"
    assert storage.is_url(p) and not storage.is_url("/tmp/x")
    with pytest.raises(ValueError, match="is a URL"):
        storage.local_path(URL)
    with pytest.raises(ValueError, match="scheme 'ftp' is not supported"):
        storage.run_path("ftp://host/run")
    assert storage.absolute("rel/dir") == os.path.abspath("rel/dir")


def test_check_output_dir_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="is a URL; this command writes to a local or shared"):
        cli.check_output_dir(URL)  # evaluate / attack / dat_sample: no URL workdirs
    with pytest.raises(ValueError, match="scheme 's4' is not supported"):
        cli.check_output_dir("s4://b/r", allow_url=True)
    if importlib.util.find_spec("gcsfs") is None:
        with pytest.raises(ValueError, match=r"needs the gcsfs package; install it with pip "):
            cli.check_output_dir(URL, allow_url=True)
    monkeypatch.setitem(storage.URL_SCHEMES, "gs", "fsspec")
    assert str(cli.check_output_dir(URL, allow_url=True)) == URL
    assert list(tmp_path.iterdir()) == []  # no local probe for a URL


def test_check_workdir_config_reads_the_url(fake_gcs):
    storage.write_text_atomic(storage.run_path(URL) / "config.json", json.dumps({"seed": 0}))
    cli.check_workdir_config(URL, {"seed": 0})
    with pytest.raises(ValueError, match=r"fields \['seed'\] differ"):
        cli.check_workdir_config(URL, {"seed": 1})
    assert _files(fake_gcs) == ["bucket/run/config.json"]


class RecordingCheckpointer:
    """Stands in for ckpt_lib.Checkpointer in the child: records the directory and saved steps."""

    made: list[RecordingCheckpointer] = []

    def __init__(self, directory, *, max_to_keep=None):
        self.directory, self.saved = directory, []
        RecordingCheckpointer.made.append(self)

    def latest_step(self):
        return None

    def save(self, step, state, meta, *, force=False):
        self.saved.append(step)
        return True

    def wait_until_finished(self):
        pass

    def close(self):
        pass


def child_main() -> None:
    """``python -m mixat_jax.train`` with the fake bucket (``FAKE_GCS_ROOT``) and the recording
    checkpointer installed; what was recorded goes to ``FAKE_GCS_RECORD`` at exit."""
    import atexit
    import sys

    from mixat_jax import train
    from mixat_jax.training import checkpoint as ckpt_lib

    FakeGCS.root = os.environ["FAKE_GCS_ROOT"]
    storage.URL_SCHEMES["gs"] = "fsspec"
    for p in ("gs", "gcs"):
        fsspec.register_implementation(p, FakeGCS, clobber=True)
    ckpt_lib.Checkpointer = RecordingCheckpointer

    def record() -> None:
        ck = [{"directory": c.directory, "saved": c.saved} for c in RecordingCheckpointer.made]
        rec = {"seen": sorted(set(FakeGCS.seen)), "checkpointers": ck}
        pathlib.Path(os.environ["FAKE_GCS_RECORD"]).write_text(json.dumps(rec))

    atexit.register(record)
    sys.argv = ["mixat_jax.train", *sys.argv[1:]]
    train.cli()


@pytest.mark.slow
def test_training_run_with_gs_workdir_writes_everything_through_the_url(tmp_path):
    """python -m mixat_jax.train --workdir gs://bucket/run, 2 tiny steps with PAP (one CPU
    device): every file lands in the bucket, orbax gets the URL, nothing is written locally."""

    bucket, cwd, record = tmp_path / "fake_gcs", tmp_path / "cwd", tmp_path / "record.json"
    bucket.mkdir()
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXAT_JAX_")}
    env.update(XLA_FLAGS=FAST_COMPILE_XLA_FLAGS, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               TOKENIZERS_PARALLELISM="false", FAKE_GCS_ROOT=str(bucket),
               FAKE_GCS_RECORD=str(record))  # fmt: skip
    cmd = [sys.executable, "-c", "import tests.test_storage as t; t.child_main()",
           f"--config={ROOT / 'configs' / 'tiny.py'}:discrete_only", f"--workdir={URL}",
           "--config.steps=2", "--config.checkpoint_every=2", "--config.grad_accum=1",
           f"--config.tiny_model.cache_dir={tmp_path / 'tiny'}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    assert list(cwd.iterdir()) == []  # nothing local, in particular no relative gs:/bucket/run
    files = _files(bucket)
    for want in ("config.json", "metrics.jsonl", "pap_pool.jsonl", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):  # fmt: skip
        assert f"bucket/run/{want}" in files, files
    assert any(f.startswith("bucket/run/tb/events.out.tfevents") for f in files), files
    assert all(f.startswith("bucket/run/") for f in files), files
    assert json.loads((bucket / "bucket/run/config.json").read_text())["steps"] == 2
    metrics = [
        json.loads(x) for x in (bucket / "bucket/run/metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in metrics] == [1, 2] and metrics[0]["mb_pap"] == 1
    rec = json.loads(record.read_text())
    assert rec["checkpointers"] == [{"directory": URL + "/checkpoints", "saved": [2]}]
    assert rec["seen"] and all(s.startswith(URL) for s in rec["seen"]), rec["seen"]
    assert "adapter" in proc.stderr and URL in proc.stderr


def test_read_metrics_through_a_url(fake_gcs):
    from mixat_jax.training.metrics import MetricWriter, read_metrics

    with MetricWriter(URL, enabled=True) as w:
        w.write_scalars(1, {"loss": 0.5})
        w.write_scalars(2, {"loss": 0.25})
    with MetricWriter(URL, enabled=True) as w:  # a resumed run appends to the uploaded file
        w.write_scalars(3, {"loss": 0.125})
    assert [r["loss"] for r in read_metrics(URL)] == [0.5, 0.25, 0.125]
    files = _files(fake_gcs)
    assert "bucket/run/metrics.jsonl" in files
    assert any(f.startswith("bucket/run/tb/events.out.tfevents") for f in files), files
