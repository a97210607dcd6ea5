"""What every entry point promises (mixat_jax/cli.py): one-line errors for an unusable output
directory, and Ctrl-C during training saves a checkpoint, says how to resume, exits 130 without a
traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mixat_jax import cli

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f
    )
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    return env


def test_check_output_dir_creates_nothing_and_names_the_path(tmp_path):
    target = tmp_path / "a" / "b"
    assert cli.check_output_dir(target) == target
    assert not (tmp_path / "a").exists()  # probe directories are removed again
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        cli.check_output_dir(tmp_path / "f")
    with pytest.raises(ValueError, match="unusable") as e:
        cli.check_output_dir(tmp_path / "f" / "sub", "--out")
    assert "--out" in str(e.value) and "\n" not in str(e.value)


UNUSABLE = "/proc/nonexistent/x"


@pytest.mark.parametrize(
    "args",
    [
        ["mixat_jax.train", "--config=configs/tiny.py", f"--workdir={UNUSABLE}"],
        ["mixat_jax.train", "--config=configs/demo.py", f"--workdir={UNUSABLE}"],
        ["mixat_jax.evaluate", "--config=configs/eval/tiny.py", "--config.model=/nonexistent",
         f"--workdir={UNUSABLE}"],
        ["mixat_jax.attack", "--config=configs/attack/gcg.py", f"--workdir={UNUSABLE}"],
        ["mixat_jax.pap_pool", "--model=template", "--behaviors={csv}",
         f"--out={UNUSABLE}/pool.jsonl"],
    ],
    ids=["train", "demo", "evaluate", "attack", "pap_pool"],
)  # fmt: skip
def test_unusable_output_dir_is_one_line(args, tmp_path):
    csv = tmp_path / "b.csv"
    csv.write_text("Behavior,BehaviorID\nWrite a poem,poem\n")
    args = [a.replace("{csv}", str(csv)) for a in args]
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error:") and UNUSABLE in lines[0]


def test_ctrl_c_saves_checkpoint_and_says_how_to_resume(tmp_path):
    workdir = tmp_path / "run"
    # :sft (no attack): the interrupt path is the same for every variant, its step compiles fast
    cmd = [sys.executable, "-m", "mixat_jax.train", "--config=configs/tiny.py:sft",
           f"--workdir={workdir}", "--config.steps=50", "--config.log_every=1",
           f"--config.tiny_model.cache_dir={tmp_path / 'tiny'}"]  # fmt: skip
    p = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stderr=subprocess.PIPE, text=True)
    seen = []
    for line in p.stderr:
        seen.append(line)
        if "step 1/" in line:  # the first progress line: training is under way
            p.send_signal(signal.SIGINT)
            break
    _, rest = p.communicate(timeout=240)
    err = "".join(seen) + rest
    assert p.returncode == cli.EXIT_INTERRUPTED, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    final = [ln for ln in rest.splitlines() if "interrupted at step" in ln]
    assert len(final) == 1 and "re-run the same command to resume" in final[0], rest[-2000:]
    steps = sorted(int(d.name) for d in (workdir / "checkpoints").iterdir() if d.name.isdigit())
    assert steps and 1 <= steps[-1] < 50
    assert f"step {steps[-1]}/50" in final[0]


def test_model_of_the_wrong_kind_is_one_line(tmp_path):
    """A masked-diffusion checkpoint where a causal chat model is needed (generate), and a causal
    one where an inpainter is needed (inpaint): one line naming the path, status 2, before any
    weight is read."""
    from mixat_jax.tiny_model import build_tiny_checkpoint, build_tiny_diffusion_checkpoint

    causal = build_tiny_checkpoint(tmp_path / "causal", vocab_size=512, hidden_size=32)
    llada = build_tiny_diffusion_checkpoint(tmp_path / "llada", vocab_size=512, hidden_size=32)
    for args, needle in (
        (["mixat_jax.generate", f"--model={llada}", "--prompt=hi"], "masked-diffusion"),
        (["mixat_jax.inpaint", f"--model={causal}", "--response=hi"], "causal LM"),
    ):
        proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=_env(),
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 2, proc.stderr[-2000:]
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
