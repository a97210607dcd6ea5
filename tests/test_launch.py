"""launch/ scripts (issue #16): syntax, configs they name, and their dry-run / fake-tool behaviour.

No gcloud, xpk or Slurm here: the scripts' ``DRY_RUN=1`` output is checked for the v5e-32 pod
(8 workers) and the 4-node x 8-GPU SLURM job, and the non-dry paths run against fake ``gcloud`` /
``srun`` / ``scancel`` / ``scontrol`` executables on PATH that record what they were asked to do.
"""

import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fast_compile import FAST_COMPILE_XLA_FLAGS

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = [LAUNCH / "tpu_vm.sh", LAUNCH / "xpk.sh", LAUNCH / "slurm_gpu.sbatch", LAUNCH / "lib.sh"]
TPU_ENV = {"PROJECT": "my-proj", "ZONE": "us-west4-a", "TPU_NAME": "mixat-v5e"}
XPK_ENV = {"PROJECT": "my-proj", "ZONE": "us-east5-b", "CLUSTER": "my-xpk", "WORKLOAD": "mixat-t"}
SECRET = "hf_dont_print_me_123"


def run(script, *args, env=None, dry=True, path_prefix=None):
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MIXAT_JAX_"))}
    for k in ("HF_TOKEN", "MIXAT_DATA_DIR", "HF_HUB_OFFLINE", "ENV_VARS", "HF_HOME", "WORKDIR"):
        full.pop(k, None)
    full.update(env or {})
    if dry:
        full["DRY_RUN"] = "1"
    if path_prefix:
        full["PATH"] = f"{path_prefix}:{full['PATH']}"
    return subprocess.run(["bash", str(LAUNCH / script), *args], env=full, capture_output=True,
                          text=True, cwd=ROOT, timeout=60)  # fmt: skip


def one_line_error(res):
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_every_named_config_exists():
    named = set()
    for f in [*SCRIPTS, LAUNCH / "README.md"]:
        named |= set(re.findall(r"configs/[\w/]+\.py", f.read_text()))
    assert "configs/zephyr_7b_mixat.py" in named and len(named) >= 3
    missing = sorted(c for c in named if not (ROOT / c).is_file())
    assert not missing, missing


# --- Cloud TPU VMs -----------------------------------------------------------------------------


@pytest.mark.parametrize(("accel", "runtime", "workers", "gcloud_type"), [
    ("v4-32", "tpu-ubuntu2204-base", 4, "v4-32"),
    ("v3-8", "tpu-ubuntu2204-base", 1, "v3-8"),
    ("v5litepod-32", "v2-alpha-tpuv5-lite", 8, "v5litepod-32"),
    ("v5e-32", "v2-alpha-tpuv5-lite", 8, "v5litepod-32"),
    ("v5litepod-8", "v2-alpha-tpuv5-lite", 1, "v5litepod-8"),
    ("v5p-128", "v2-alpha-tpuv5", 16, "v5p-128"),
    ("v6e-64", "v2-alpha-tpuv6e", 16, "v6e-64"),
])  # fmt: skip
def test_tpu_runtime_and_workers_by_accelerator(accel, runtime, workers, gcloud_type):
    res = run("tpu_vm.sh", "create", env={**TPU_ENV, "ACCELERATOR_TYPE": accel})
    assert res.returncode == 0, res.stderr
    assert f"({workers} workers), runtime {runtime}" in res.stdout
    assert f"--accelerator-type={gcloud_type} --version={runtime}" in res.stdout


def test_tpu_runtime_override_and_unknown_type():
    res = run("tpu_vm.sh", "create", env={**TPU_ENV, "ACCELERATOR_TYPE": "v5e-16",
                                           "RUNTIME_VERSION": "v2-alpha-tpuv5-lite-custom"})  # fmt: skip
    assert "--version=v2-alpha-tpuv5-lite-custom" in res.stdout
    err = one_line_error(run("tpu_vm.sh", "create", env={**TPU_ENV, "ACCELERATOR_TYPE": "v9x-8"}))
    assert "unknown ACCELERATOR_TYPE 'v9x-8'" in err
    assert run("tpu_vm.sh", "create", env={**TPU_ENV, "ACCELERATOR_TYPE": "v9x-8"}).stdout == ""


@pytest.mark.parametrize(("script", "args", "env", "needle"), [
    ("tpu_vm.sh", ["create"], {"ZONE": "z", "TPU_NAME": "t"}, "set PROJECT"),
    ("tpu_vm.sh", ["run"], TPU_ENV, "set WORKDIR"),
    ("tpu_vm.sh", ["run"], {**TPU_ENV, "WORKDIR": "gs://b/r", "CONFIG": "configs/mixat_llama3.py"},
     "CONFIG configs/mixat_llama3.py does not exist"),
    ("tpu_vm.sh", ["run"], {**TPU_ENV, "WORKDIR": "gs://b/r", "ENTRY": "mixat_jax.dat_sample",
                            "CONFIG": "configs/dat/sample.py"}, "needs a shared filesystem WORKDIR"),
    ("tpu_vm.sh", ["run"], {**TPU_ENV, "WORKDIR": "gs://b/r", "ENV_VARS": "NOT_SET_ANYWHERE_X"},
     "ENV_VARS names NOT_SET_ANYWHERE_X"),
    ("tpu_vm.sh", ["bogus"], TPU_ENV, "unknown action 'bogus'"),
    ("tpu_vm.sh", ["run"], {**TPU_ENV, "WORKDIR": "runs/zephyr"}, "WORKDIR runs/zephyr is relative"),
    ("xpk.sh", ["create"], {"PROJECT": "p", "ZONE": "z", "WORKDIR": "gs://b/r"}, "set CLUSTER"),
    ("xpk.sh", ["create"], XPK_ENV, "set WORKDIR"),
    ("xpk.sh", ["create"], {**XPK_ENV, "WORKDIR": "gs://b/r", "CONFIG": "configs/nope.py"},
     "does not exist"),
    ("slurm_gpu.sbatch", [], {}, "set WORKDIR"),
    ("slurm_gpu.sbatch", [], {"WORKDIR": "/shared/r", "PER_NODE": "2"}, "PER_NODE=2"),
    ("slurm_gpu.sbatch", ["setup"], {"JAX_CUDA": "cuda11"}, "JAX_CUDA=cuda11"),
])  # fmt: skip
def test_missing_or_bad_variable_fails_with_one_line(script, args, env, needle):
    res = run(script, *args, env=env)
    assert needle in one_line_error(res)
    assert "+ " not in res.stdout  # nothing was (or would have been) run


def _tpu_v5e_32(action="all", **extra):
    env = {**TPU_ENV, "ACCELERATOR_TYPE": "v5litepod-32", "WORKDIR": "gs://my-bucket/runs/zephyr",
           "HF_TOKEN": SECRET, "ENV_VARS": "MIXAT_DATA_DIR=data/harmbench XLA_FLAGS",
           "XLA_FLAGS": "--xla_dump_to=/tmp/x", **extra}  # fmt: skip
    return run("tpu_vm.sh", action, env=env)


def test_tpu_dry_run_v5e_32_pod():
    res = _tpu_v5e_32()
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert SECRET not in out
    cmds = [line for line in out.splitlines() if line.startswith("+ ")]
    create, setup = cmds[0], cmds[4]
    assert "--accelerator-type=v5litepod-32 --version=v2-alpha-tpuv5-lite" in create
    # Python >= 3.11 through uv, and one resolver call for requirements.txt and jax[tpu].
    assert "--worker=all" in setup and "uv venv --python 3.11" in setup
    assert re.search(
        r"uv pip install --python \.venv/bin/python -r requirements\.txt .*jax\[tpu\]", setup
    )
    # The environment: a file copied to every worker, credentials redacted in this output.
    assert "#   export HF_TOKEN='<redacted>'" in out
    assert "#   export MIXAT_DATA_DIR=data/harmbench" in out
    assert "#   export XLA_FLAGS=--xla_dump_to=/tmp/x" in out
    assert any("scp /tmp/mixat_jax_launch_env mixat-v5e:~/mixat_jax/.launch_env" in c and
               "--worker=all" in c for c in cmds)  # fmt: skip
    runs = [c for c in cmds if "python -m mixat_jax.train" in c]
    assert len(runs) == 8
    for i, c in enumerate(runs):
        assert f"--worker={i} " in c
        assert ". ./.launch_env" in c and "MIXAT_JAX_DISTRIBUTED=1" in c
        assert f">> logs/worker{i}.log 2>&1" in c and f"echo $! > logs/worker{i}.pid" in c
        assert "--config configs/zephyr_7b_mixat.py --workdir gs://my-bucket/runs/zephyr" in c


def test_tpu_logs_tails_every_worker():
    res = _tpu_v5e_32("logs")
    tails = [
        line for line in res.stdout.splitlines() if line.startswith("+ ") and "tail -n 20" in line
    ]
    assert [re.search(r"--worker=(\d+)", t).group(1) for t in tails] == [str(i) for i in range(8)]
    assert all(f"logs/worker{i}.log" in t for i, t in enumerate(tails))


def _fake_tool(bindir: Path, name: str, body: str):
    path = bindir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_tpu_run_with_fake_gcloud_sends_env_file_and_starts_every_worker(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "gcloud.log"
    # The fake keeps a copy of every scp source so that the env file's content can be checked.
    _fake_tool(bindir, "gcloud", f'echo "$*" >> {log}\n'
               f'if [[ "$4" == scp ]]; then cp "$5" {tmp_path}/scp_src; stat -c %a "$5" > {tmp_path}/mode; fi\n')  # fmt: skip
    res = run("tpu_vm.sh", "run", dry=False, path_prefix=bindir,
              env={**TPU_ENV, "ACCELERATOR_TYPE": "v5e-32", "WORKDIR": "gs://b/r", "HF_TOKEN": SECRET})  # fmt: skip
    assert res.returncode == 0, res.stderr
    calls = log.read_text().splitlines()
    assert sum("--worker=" in c and "python -m mixat_jax.train" in c for c in calls) == 8
    assert (tmp_path / "scp_src").read_text() == f"export HF_TOKEN={SECRET}\n"
    assert (tmp_path / "mode").read_text().strip() == "600"
    assert SECRET not in res.stdout + "".join(calls)  # never on a command line


# --- xpk -----------------------------------------------------------------------------------------


def test_xpk_dry_run_installs_jax_tpu_with_requirements_and_passes_env():
    env = {**XPK_ENV, "WORKDIR": "gs://b/runs/llama3", "CONFIG": "configs/llama3_8b_mixat.py",
           "HF_TOKEN": SECRET, "ENV_VARS": "MIXAT_DATA_DIR=/data/harmbench"}  # fmt: skip
    res = run("xpk.sh", "create", env=env)
    assert res.returncode == 0, res.stderr
    assert SECRET not in res.stdout
    assert (
        "#   HF_TOKEN=<redacted>" in res.stdout
        and "#   MIXAT_DATA_DIR=/data/harmbench" in res.stdout
    )
    create = next(
        line for line in res.stdout.splitlines() if line.startswith("+ xpk workload create")
    )
    assert "--env-file=/tmp/mixat_jax_xpk_env" in create and "--tpu-type=v5p-32" in create
    assert re.search(r"pip install -q -r requirements\.txt '\\''jax\[tpu\]'\\''", create)
    assert (
        "MIXAT_JAX_DISTRIBUTED=1 exec python -m mixat_jax.train --config configs/llama3_8b_mixat.py"
        in create
    )
    assert "sys.version_info < (3, 11)" in create
    assert "4 host(s) per slice" in res.stdout
    pinned = run("xpk.sh", "create", env={**env, "JAX_SPEC": "image"}).stdout
    assert "jax[tpu]==$(python -c" in pinned


# --- SLURM ---------------------------------------------------------------------------------------


def _rank_lines(out):
    return [line for line in out.splitlines() if line.startswith("rank ")]


def test_slurm_dry_run_4_nodes_x_8_gpus():
    res = run("slurm_gpu.sbatch", env={"NODES": "4", "GPUS_PER_NODE": "8",
                                       "WORKDIR": "/shared/runs/z", "HF_TOKEN": SECRET})  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert SECRET not in out and "export HF_TOKEN='<redacted>'" in out
    assert "#   #SBATCH --signal=B:USR1@600" in out and "#   #SBATCH --requeue" in out
    assert "--gpus-per-task" not in out
    srun = next(line for line in out.splitlines() if line.startswith("+ srun"))
    assert "--nodes=4 --ntasks=32 --ntasks-per-node=8 --gpus-per-node=8 --gpu-bind=none" in srun
    assert "MIXAT_JAX_LOCAL_DEVICE_IDS" not in out
    assert "export HF_HOME=" in out and "export MIXAT_JAX_DISTRIBUTED=1" in out
    ranks = _rank_lines(out)
    assert len(ranks) == 32
    for r, line in enumerate(ranks):
        node, local = divmod(r, 8)
        assert line.startswith(
            f"rank {r}: node {node} SLURM_PROCID={r} SLURM_LOCALID={local} SLURM_NTASKS=32 "
        )
        assert (
            "CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 " in line
            and f"local_device_ids=[{local}] " in line
        )
        assert line.endswith(
            "-m mixat_jax.train --config configs/zephyr_7b_mixat.py --workdir /shared/runs/z"
        )


def test_slurm_dry_run_per_node_owns_all_gpus():
    res = run("slurm_gpu.sbatch", env={"NODES": "4", "PER_NODE": "1", "WORKDIR": "/shared/r"})
    srun = next(line for line in res.stdout.splitlines() if line.startswith("+ srun"))
    assert (
        "--ntasks=4 --ntasks-per-node=1 --gpus-per-node=8" in srun and "--cpus-per-task=96" in srun
    )
    assert "export MIXAT_JAX_LOCAL_DEVICE_IDS=all" in res.stdout
    ranks = _rank_lines(res.stdout)
    assert len(ranks) == 4 and all("local_device_ids=[0,1,2,3,4,5,6,7]" in r for r in ranks)


@pytest.mark.parametrize("cuda", ["cuda12", "cuda13"])
def test_slurm_setup_installs_cuda_jaxlib(cuda):
    env = {"VENV": "/nonexistent/venv"} | ({} if cuda == "cuda12" else {"JAX_CUDA": cuda})
    res = run("slurm_gpu.sbatch", "setup", env=env)
    assert res.returncode == 0, res.stderr
    assert f"-m pip install -q -r requirements.txt 'jax[{cuda}]' -e ." in res.stdout
    assert re.search(r"^\+ (\S*python3\S* -m venv|uv venv --python 3\.11)", res.stdout, re.M)


def test_slurm_time_limit_signal_checkpoints_and_requeues(tmp_path):
    """The batch shell's USR1 trap: SIGTERM to the ranks (through scancel), wait for srun to end,
    then `scontrol requeue`; the job's status is the ranks' 143."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls.log"
    # Fake srun: records its argv, then waits like a rank until SIGTERM arrives, exits 143.
    _fake_tool(bindir, "srun", f'echo "srun $*" >> {calls}; echo $$ > {tmp_path}/srun.pid\n'
               "trap 'echo rank-got-TERM >> " + str(calls) + "; exit 143' TERM\n"
               "for _ in $(seq 600); do sleep 0.1; done; exit 0\n")  # fmt: skip
    _fake_tool(
        bindir,
        "scancel",
        f'echo "scancel $*" >> {calls}; kill -TERM "$(cat {tmp_path}/srun.pid)"\n',
    )
    _fake_tool(bindir, "scontrol", f'echo "scontrol $*" >> {calls}\n')
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    _fake_tool(venv / "bin", "python", "exit 0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DRY_RUN"))}
    env.update({"PATH": f"{bindir}:{env['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(ROOT),
                "SLURM_JOB_NUM_NODES": "1", "SLURM_GPUS_ON_NODE": "2", "SLURM_CPUS_ON_NODE": "8",
                "WORKDIR": str(tmp_path / "run"), "VENV": str(venv)})  # fmt: skip
    proc = subprocess.Popen(["bash", str(LAUNCH / "slurm_gpu.sbatch")], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.time() + 20
    while not (tmp_path / "srun.pid").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "srun.pid").exists(), "srun was not started"
    proc.send_signal(signal.SIGUSR1)  # what Slurm's --signal=B:USR1@600 does
    out, _ = proc.communicate(timeout=30)
    lines = calls.read_text().splitlines()
    assert lines[0].startswith("srun --nodes=1 --ntasks=2 --ntasks-per-node=2 --gpus-per-node=2")
    assert lines[1:] == ["scancel --signal=TERM 4242", "rank-got-TERM", "scontrol requeue 4242"], (
        out
    )
    assert proc.returncode == 143, out
    assert "time limit near" in out and "requeueing job 4242" in out


# --- launch/README.md shows real output ---------------------------------------------------------


README_RUNS = [
    ("tpu_vm.sh", ["all"], {**TPU_ENV, "ACCELERATOR_TYPE": "v5litepod-32", "HF_TOKEN": "hf_xxx",
                            "CONFIG": "configs/zephyr_7b_mixat.py", "WORKDIR": "gs://my-bucket/runs/zephyr",
                            "ENV_VARS": "MIXAT_DATA_DIR=data/harmbench"}),
    ("xpk.sh", ["create"], {"PROJECT": "my-proj", "ZONE": "us-east5-b", "CLUSTER": "my-xpk",
                            "WORKLOAD": "mixat-llama3", "TPU_TYPE": "v5p-32", "HF_TOKEN": "hf_xxx",
                            "CONFIG": "configs/llama3_8b_mixat.py", "WORKDIR": "gs://my-bucket/runs/llama3",
                            "ENV_VARS": "MIXAT_DATA_DIR=/data/harmbench"}),
    ("slurm_gpu.sbatch", [], {"NODES": "4", "GPUS_PER_NODE": "8", "CONFIG": "configs/zephyr_7b_mixat.py",
                              "WORKDIR": "/shared/runs/zephyr", "HF_HOME": "/shared/hf_home",
                              "HF_TOKEN": "hf_xxx", "ENV_VARS": "MIXAT_DATA_DIR=/shared/data/harmbench"}),
]  # fmt: skip


@pytest.mark.parametrize(("script", "args", "env"), README_RUNS, ids=[r[0] for r in README_RUNS])
def test_readme_dry_runs_are_the_scripts_output(script, args, env):
    """The dry runs pasted in launch/README.md are what the scripts print today (the checkout's
    path is /work/main in the README)."""
    res = run(script, *args, env=env)
    assert res.returncode == 0, res.stderr
    block = res.stdout.replace(str(ROOT), "/work/main")
    assert block.count("\n") >= 5 and block in (LAUNCH / "README.md").read_text()


@pytest.mark.slow
def test_slurm_script_starts_the_real_entry_point_as_one_rank(tmp_path):
    """The sbatch script's srun line, run by a fake srun that sets the step environment of one
    rank (as Slurm does) and execs it: MIXAT_JAX_DISTRIBUTED=1 makes train.py call
    jax.distributed.initialize(), which finds the job through JAX's SLURM auto-detection; a
    1-step tiny run writes its adapter. (No GPU here: JAX_PLATFORMS=cpu.)"""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _fake_tool(bindir, "srun", 'while [[ "$1" == --* ]]; do shift; done\n'
               "export SLURM_STEP_NODELIST=localhost SLURM_STEP_NUM_NODES=1 SLURM_NTASKS=1 "
               "SLURM_PROCID=0 SLURM_LOCALID=0\n"
               f"env > {tmp_path}/rank_env\n"
               'exec "$@"\n')  # fmt: skip
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DRY_RUN", "MIXAT_JAX_"))
    }
    env.update({"PATH": f"{bindir}:{env['PATH']}", "SLURM_JOB_ID": "31337", "SLURM_SUBMIT_DIR": str(ROOT),
                "SLURM_JOB_NUM_NODES": "1", "SLURM_GPUS_ON_NODE": "1", "SLURM_CPUS_ON_NODE": "2",
                "JAX_PLATFORMS": "cpu", "XLA_FLAGS": FAST_COMPILE_XLA_FLAGS, "VENV": str(Path(sys.executable).parents[1]),
                "CONFIG": "configs/tiny.py:sft", "WORKDIR": str(tmp_path / "run"),
                "EXTRA_ARGS": "--config.steps=1", "HF_HOME": str(tmp_path / "hf"),
                "ENV_VARS": "MIXAT_TEST_MARK=42"})  # fmt: skip
    res = subprocess.run(["bash", str(LAUNCH / "slurm_gpu.sbatch")], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert (tmp_path / "run" / "adapter").is_dir() and (
        tmp_path / "run" / "metrics.jsonl"
    ).is_file()
    rank_env = dict(
        line.split("=", 1)
        for line in (tmp_path / "rank_env").read_text().splitlines()
        if "=" in line
    )
    assert rank_env["MIXAT_JAX_DISTRIBUTED"] == "1" and rank_env["MIXAT_TEST_MARK"] == "42"
    assert (
        rank_env["HF_HOME"] == str(tmp_path / "hf") and "MIXAT_JAX_LOCAL_DEVICE_IDS" not in rank_env
    )
    assert "finished 1 steps" in res.stdout + res.stderr
