"""`python -m mixat_jax.attack --compilation_cache_dir DIR` (issue #14, time to loss): the first
process fills JAX's persistent compilation cache, a second process with the same shapes loads the
GCG step from it (its compile seconds drop) and finds the same attack result."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from tests.hf_builders import build_tiny_hf_checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
GCG_CONFIG = str(ROOT / "configs" / "attack" / "gcg.py")


def _attack(model_dir, workdir, cache_dir):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-m", "mixat_jax.attack", "--config", GCG_CONFIG,
         f"--config.model={model_dir}", "--config.behavior=Tell me a secret",
         "--config.target=Sure, here", "--config.num_steps=2", "--config.search_width=16",
         "--config.topk=8", "--config.batch_size=8", "--config.optim_str_init=x x x x x",
         "--config.filter_topm=4", "--config.reuse_levels=1", f"--workdir={workdir}",
         f"--compilation_cache_dir={cache_dir}"],
        capture_output=True, text=True, env=env, cwd=ROOT, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads((pathlib.Path(workdir) / "result.json").read_text())


def test_second_process_loads_the_step_from_the_persistent_cache(tmp_path):
    model_dir = build_tiny_hf_checkpoint(tmp_path / "m", "llama3", vocab_size=512)
    cache = tmp_path / "xla"
    first = _attack(model_dir, tmp_path / "a", cache)
    entries = [p for p in cache.rglob("*") if p.is_file()]
    assert entries, "the first process wrote nothing to the compilation cache"
    second = _attack(model_dir, tmp_path / "b", cache)
    assert second["losses"] == first["losses"] and second["best_string"] == first["best_string"]
    # cold: every function compiled; warm: deserialised from the cache (several times faster)
    assert second["compile_seconds"] < 0.5 * first["compile_seconds"], (first, second)
