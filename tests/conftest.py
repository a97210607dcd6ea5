"""Test setup: CPU only, 8 simulated devices (set before jax is imported), shared fixtures."""

import os

from tests.fast_compile import FAST_COMPILE_XLA_FLAGS  # fast XLA:CPU compiles (see there)

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in flags:
    flags += f" {FAST_COMPILE_XLA_FLAGS}"
os.environ["XLA_FLAGS"] = flags.strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """../shared/data when present (reference data files); tests using it skip otherwise."""
    d = SHARED / "data"
    if not d.is_dir():
        pytest.skip("../shared/data is absent (reference HarmBench/XSTest files not available)")
    return d
