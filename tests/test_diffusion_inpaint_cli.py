"""`python -m mixat_jax.inpaint` (DAT spec §2.2 step 1): on a tiny random LLaDA-layout checkpoint
read by the real loader it prints one prompt per line and nothing else; with a stubbed loader,
prompts are escaped onto one line each and a ValueError becomes one `error:` line and exit 2."""

import os
import pathlib
import subprocess
import sys

import pytest

from mixat_jax.tiny_model import build_tiny_diffusion_checkpoint
from mixat_jax.tokenizer_build import default_corpus

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llada_dir(tmp_path_factory):
    """A tiny random LLaDA-layout checkpoint (read by the real loader)."""
    out = tmp_path_factory.mktemp("diffusion_ckpt") / "llada"
    corpus = default_corpus(20_000)
    return build_tiny_diffusion_checkpoint(
        out, layout="llada", vocab_size=384, hidden_size=64, intermediate_size=128, corpus=corpus
    )


STUB_NO_MODEL = """
import sys
import types
from mixat_jax.diffusion import inpaint as inpaint_lib
from mixat_jax.hf import load as hf_load
from tests.diffusion_helpers import MASK
cfg = types.SimpleNamespace(mask_token_id=MASK, shift_logits=False)
hf_load.load_pretrained = lambda path, **kw: (types.SimpleNamespace(cfg=cfg), None)
prompt = inpaint_lib.InpaintedPrompt("two\\nlines \\\\n\\r", -1.0, ())
def fake(model, tok, responses, **kw):
    if responses[0] == "too long":
        raise ValueError("response 0 needs 99 tokens;\\n  max 64")
    return [[prompt] * kw["num_samples"]]
inpaint_lib.inpaint_prompts = fake
from mixat_jax import inpaint
sys.argv = ["mixat_jax.inpaint", *sys.argv[1:]]
inpaint.run()
"""


def run_cli(*args, stub=None):
    """`python -m mixat_jax.inpaint ARGS`, or the CLI under a stub script (patched loader)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    head = ["-m", "mixat_jax.inpaint"] if stub is None else ["-c", stub, "--model", "stub"]
    cmd = [sys.executable, *head, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_cli_prints_one_prompt_per_line(llada_dir):
    args = "--response Sure --prompt_length 6 --num_samples 3 --steps 3".split()
    ok = run_cli("--model", str(llada_dir), *args)
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.split("\n")
    assert len(lines) == 4 and lines[-1] == ""  # 3 prompts, nothing else
    assert all("\n" not in line for line in lines)


def test_cli_escapes_newlines_and_errors_in_one_line():
    out = run_cli("--response", "x", "--num_samples", "2", stub=STUB_NO_MODEL)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "two\\nlines \\\\n\\r\n" * 2
    bad = run_cli("--response", "too long", stub=STUB_NO_MODEL)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines()[-1] == "error: response 0 needs 99 tokens; max 64"
