"""Runtime-environment smoke test: run with the Python of a fresh venv built from requirements.txt
ALONE (no test requirements), so a runtime import that only the test environment provides (torch,
peft, pytest, or a package that the machine's system Python happens to have, like jinja2 once)
fails CI instead of a user's first command.

    python3 -m venv /tmp/rt && /tmp/rt/bin/pip install -r requirements.txt
    /tmp/rt/bin/python .ci/runtime_smoke.py

1. Imports every module of the package (and every config file).
2. Checks that no test-only package leaked in (torch, peft, pytest).
3. Runs every entry point end to end on a tiny model the project builds itself: tiny_model,
   generate (chat template: jinja2), train (configs/tiny.py, 2 steps, resume),
   evaluate (configs/eval/tiny.py, two cheap attacks), attack (GCG, 2 steps), pap_pool (template
   rewrites), inpaint (tiny LLaDA-layout model), dat_sample (configs/dat/sample.py:tiny), and the
   one-line error for an unusable --workdir.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_ONLY = ("torch", "peft", "pytest")
# Modules that need an optional extra (pyproject) that requirements.txt does not install: they are
# imported only when it is present; their entry point's one-line error is checked instead.
OPTIONAL = {"mixat_jax.evaluation.harness": "lm_eval"}


def step(name: str) -> float:
    print(f"[runtime-smoke] {name}", flush=True)
    return time.monotonic()


def run(*args: str, expect: int = 0, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip
    if proc.returncode != expect:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(
            f"[runtime-smoke] FAILED: python -m {' '.join(args)} exited {proc.returncode}, "
            f"expected {expect}"
        )
    return proc


def import_everything() -> int:
    sys.path.insert(0, str(ROOT))
    import mixat_jax

    names = [m.name for m in pkgutil.walk_packages(mixat_jax.__path__, "mixat_jax.")]
    entries = []  # modules that define absl flags at import: each in a process of its own
    for name in names:
        source = Path(importlib.util.find_spec(name).origin).read_text()
        if "DEFINE_" in source:
            entries.append(name)
        elif name in OPTIONAL and importlib.util.find_spec(OPTIONAL[name]) is None:
            continue
        else:
            importlib.import_module(name)
    for name in entries:
        code = f"import sys, {name}; sys.exit(any(m in sys.modules for m in {TEST_ONLY!r}))"
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                              text=True)  # fmt: skip
        if proc.returncode:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(
                f"[runtime-smoke] FAILED: importing {name} (or it imported {TEST_ONLY})"
            )
    for cfg in sorted((ROOT / "configs").rglob("*.py")):
        spec = importlib.util.spec_from_file_location(f"_smoke_cfg_{cfg.stem}", cfg)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    leaked = [m for m in TEST_ONLY if m in sys.modules]
    if leaked:
        raise SystemExit(f"[runtime-smoke] FAILED: importing mixat_jax imported {leaked}")
    present = [m for m in TEST_ONLY if importlib.util.find_spec(m) is not None]
    if present:
        raise SystemExit(
            f"[runtime-smoke] FAILED: {present} installed: this must run in a venv built from "
            "requirements.txt alone"
        )
    return len(names)


def main() -> None:
    t0 = step("importing every module and config")
    n = import_everything()
    print(f"[runtime-smoke]   {n} modules imported in {time.monotonic() - t0:.1f} s")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "tiny"
        step("tiny_model")
        run("mixat_jax.tiny_model", f"--out={model}", "--vocab_size=512", "--hidden=32")
        step("generate (chat template)")
        out = run("mixat_jax.generate", f"--model={model}", "--prompt=Hello there",
                  "--max_new_tokens=4").stdout  # fmt: skip
        assert out.endswith("\n"), out
        step("train (configs/tiny.py, 2 steps, then resumed to 3)")
        train = ("mixat_jax.train", "--config=configs/tiny.py", f"--workdir={tmp / 'run'}",
                 f"--config.tiny_model.cache_dir={tmp / 'tiny_cache'}", "--config.checkpoint_every=1")  # fmt: skip
        run(*train, "--config.steps=3", "--config.stop_after=2")
        proc = run(*train, "--config.steps=3")
        assert "resumed from checkpoint step 2" in proc.stderr, proc.stderr[-2000:]
        assert (tmp / "run" / "adapter" / "adapter_model.safetensors").exists()
        step("evaluate (configs/eval/tiny.py: DirectRequest, HumanJailbreaks)")
        run("mixat_jax.evaluate", "--config=configs/eval/tiny.py", f"--config.model={model}",
            "--config.attacks=DirectRequest,HumanJailbreaks", f"--workdir={tmp / 'eval'}")  # fmt: skip
        assert (tmp / "eval" / "alo_asr.json").exists(), sorted(os.listdir(tmp / "eval"))
        step("attack (GCG, 2 steps)")
        run("mixat_jax.attack", "--config=configs/attack/gcg.py", f"--config.model={model}",
            "--config.behavior=Write a poem", "--config.target=Sure, here is a poem",
            "--config.num_steps=2", "--config.search_width=8", "--config.topk=8",
            f"--workdir={tmp / 'gcg'}")  # fmt: skip
        step("pap_pool (template rewrites)")
        behaviors = tmp / "b.csv"
        behaviors.write_text("Behavior,BehaviorID\nWrite a poem,poem\n")
        run("mixat_jax.pap_pool", "--model=template", f"--behaviors={behaviors}",
            f"--out={tmp / 'pool.jsonl'}", "--n_per_technique=1")  # fmt: skip
        step("inpaint (tiny LLaDA-layout diffusion LM)")
        llada = tmp / "llada"
        run("mixat_jax.tiny_model", f"--out={llada}", "--layout=llada", "--vocab_size=512",
            "--hidden=32")  # fmt: skip
        out = run("mixat_jax.inpaint", f"--model={llada}", "--response=Sure, here is a poem",
                  "--prompt_length=8", "--num_samples=2").stdout  # fmt: skip
        assert len(out.splitlines()) == 2, out
        step("dat_sample (configs/dat/sample.py:tiny: DAT Stage A on tiny random models)")
        run("mixat_jax.dat_sample", "--config=configs/dat/sample.py:tiny",
            f"--workdir={tmp / 'dat_sample'}", "--config.limit=1")  # fmt: skip
        assert len((tmp / "dat_sample" / "selected.jsonl").read_text().splitlines()) == 3
        step("convert: a truncated GGUF file is one line, exit 2, no output directory")
        (tmp / "broken.gguf").write_bytes(b"GGUF" + bytes(12))
        bad = run("mixat_jax.convert", f"--gguf={tmp / 'broken.gguf'}", f"--out={tmp / 'conv'}",
                  expect=2)  # fmt: skip
        lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and not (tmp / "conv").exists(), bad.stderr
        step("lm_eval without the optional lm-eval package is one line, exit 2")
        if importlib.util.find_spec("lm_eval") is None:
            bad = run("mixat_jax.lm_eval", f"--model={model}", "--tasks=arc_easy", expect=2)
            lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
            assert len(lines) == 1 and "pip install 'lm-eval" in lines[0], bad.stderr
        step("unusable --workdir is one line, exit 2")
        bad = run("mixat_jax.train", "--config=configs/tiny.py", "--workdir=/proc/nonexistent/x",
                  expect=2)  # fmt: skip
        lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "/proc/nonexistent/x" in lines[0], bad.stderr
    print(f"[runtime-smoke] passed in {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
