"""config_types (dataclass <-> ConfigDict) and the training config built on it (DESIGN.md rule 7)."""

import dataclasses
import importlib.util
import pathlib
from typing import Any, Literal

import ml_collections
import pytest

from mixat_jax import config_types
from mixat_jax.training import run_config as rc

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Inner:
    a: int = 1
    b: float = 2.0
    hidden: str = "x"

    def __post_init__(self):
        if self.a < 0:
            raise ValueError("a must be >= 0")


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "n"
    count: int | None = None
    label: str | None = None
    mode: Literal["fast", "slow"] = "fast"
    names: tuple[str, ...] = ("p", "q")
    extra: dict[str, Any] = dataclasses.field(default_factory=lambda: {"k": 1})
    inner: Inner = config_types.field(Inner(), rename={"b": "beta"}, exclude=("hidden",))
    flat: Inner = config_types.field(Inner(a=5), inline=True, exclude=("b", "hidden"))
    maybe: Inner | None = None


def test_round_trip_and_layout():
    c = config_types.to_config_dict(Outer())
    assert c.to_dict() == {
        "name": "n", "count": 0, "label": "", "mode": "fast", "names": "p,q", "extra": {"k": 1},
        "inner": {"a": 1, "beta": 2.0}, "a": 5, "maybe": {"enabled": False},
    }  # fmt: skip
    assert config_types.from_config_dict(Outer, c) == Outer()
    c.count, c.inner.beta, c.a, c.names = 3, 4, 7, "x, y"
    c.maybe = {"enabled": True, "a": 2}
    got = config_types.from_config_dict(Outer, c)
    assert got.count == 3 and got.inner == Inner(1, 4.0) and got.flat == Inner(a=7)
    assert got.names == ("x", "y") and got.maybe == Inner(a=2)
    assert isinstance(got.inner.b, float)
    want = {"enabled": True, "a": 2, "b": 2.0, "hidden": "x"}  # no exclude at this field
    assert config_types.to_config_dict(got).maybe.to_dict() == want


def test_placeholders():
    c = config_types.to_config_dict(Outer(), unset="placeholder")
    assert c.count is None and c.label is None
    c.count = 4
    assert config_types.from_config_dict(Outer, c, unset="placeholder").count == 4
    # 0 / "" are values in this mode, not "unset"
    got = config_types.from_config_dict(Outer, {"count": 0, "label": ""}, unset="placeholder")
    assert got.count == 0 and got.label == ""


@pytest.mark.parametrize(
    "block, message",
    [
        ({"nmae": "x"}, "config: unknown key(s) ['nmae']"),
        ({"inner": {"b": 1.0}}, "config.inner: unknown key(s) ['b']"),
        ({"inner": {"hidden": "y"}}, "config.inner: unknown key(s) ['hidden']"),
        ({"count": "3"}, "config.count: expected int, got str '3'"),
        ({"a": True}, "config.a: expected int, got bool True"),
        ({"mode": "medium"}, "config.mode: 'medium' is not one of ('fast', 'slow')"),
        ({"inner": {"a": -1}}, "config.inner: a must be >= 0"),
        ({"maybe": {"enabled": "yes"}}, "config.maybe.enabled: expected bool"),
    ],
)
def test_errors_are_one_line_and_name_the_key(block, message):
    with pytest.raises(ValueError) as e:
        config_types.from_config_dict(Outer, block)
    assert message in str(e.value) and "\n" not in str(e.value)


def _config_files():
    out = []
    for p in sorted((ROOT / "configs").glob("*.py")):
        if p.name == "common.py":
            continue
        spec = importlib.util.spec_from_file_location(f"configs_{p.stem}", p)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        out.append((p.name, mod.get_config()))
    return out


def test_training_configs_resolve_and_round_trip():
    """Every configs/*.py resolves, and writing the resolved RunConfig back gives the same
    ConfigDict (every key and value of config.json comes from the dataclasses)."""
    for name, c in _config_files():
        c = ml_collections.ConfigDict(c.to_dict())
        if "demo" in c:
            del c["demo"]
            c.model = "demo-model"
        cfg = rc.from_config_dict(c)
        assert config_types.to_config_dict(cfg).to_dict() == c.to_dict(), name
    with pytest.raises(ValueError, match="config.data.source='web' unknown"):
        rc.from_config_dict({"model": "m", "data": {"source": "web"}})
    with pytest.raises(ValueError, match="step variant 'dpo' unknown"):
        rc.from_config_dict({"model": "m", "variant": "dpo"})
    with pytest.raises(ValueError, match="config.model is empty"):
        rc.from_config_dict({})
