"""Config blocks from dataclasses: dataclass <-> ``ml_collections.ConfigDict`` (DESIGN.md rule 7).

A run's ``configs/*.py`` file is a ConfigDict whose keys are the fields of a tree of frozen
dataclasses; every default is written once, in the dataclass. Two functions convert:

* :func:`to_config_dict` — a dataclass instance (usually the defaults, ``RunConfig()``) to the
  ConfigDict a config file starts from;
* :func:`from_config_dict` — a ConfigDict (or nested plain dict) back to a validated instance:
  unknown keys and wrongly typed values are one-line ``ValueError``s naming the key
  (``config.attack.iters: expected int, got str 'ten'``), missing keys keep the default, and
  the dataclasses' own ``__post_init__`` checks run (their errors prefixed with the block).

Field types understood: ``int``, ``float`` (ints accepted), ``bool``, ``str``, ``Literal[...]``
(the value must be one of them), ``tuple[T, ...]`` (a list, a tuple or a comma-separated
string), ``Mapping``/``dict`` (a free-form block, kept as a dict), nested dataclasses (a block),
``X | None`` and other unions. ``None`` ("not set") is written per ``unset``:

* ``unset="empty"`` (training configs): ``0`` for ints, ``""`` for strings, and an optional
  dataclass block is ``{"enabled": False}`` (set: ``{"enabled": True, <its fields>}``); reading
  maps ``0`` / ``""`` of an optional field back to None;
* ``unset="placeholder"`` (evaluation configs): ``ml_collections.config_dict.placeholder(T)``
  (None until set; ``None`` is read as None).

How a nested dataclass appears is declared where it is USED, with :func:`field`: ``inline``
(its fields are keys of the parent block), ``rename`` (dataclass field -> config key) and
``exclude`` (fields that are not config keys; they keep the default instance's value). Fields
with ``init=False`` are never config keys.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

UNSET_MODES = ("empty", "placeholder")
ENABLED = "enabled"  # switch key of an optional dataclass block (unset="empty")
_META = "mixat_jax.config_types"


@dataclasses.dataclass(frozen=True)
class _Layout:
    inline: bool = False
    rename: Mapping[str, str] = dataclasses.field(default_factory=dict)
    exclude: tuple[str, ...] = ()


def field(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    inline: bool = False,
    rename: Mapping[str, str] | None = None,
    exclude: tuple[str, ...] = (),
) -> Any:
    """``dataclasses.field`` of a nested dataclass with its config layout: ``inline`` puts its
    keys into the parent block, ``rename`` maps its field names to config keys, ``exclude``
    keeps fields out of the config (they keep the default instance's value)."""
    layout = _Layout(inline=inline, rename=dict(rename or {}), exclude=tuple(exclude))
    return dataclasses.field(
        default=default, default_factory=default_factory, metadata={_META: layout}
    )


# ------------------------------------------------------------------------------ types
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _union_args(tp: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return None


def _optional_inner(tp: Any) -> Any | None:
    """T of ``T | None`` (None if ``tp`` is not optional or has several non-None members)."""
    args = _union_args(tp)
    if args is None or type(None) not in args:
        return None
    rest = [a for a in args if a is not type(None)]
    return rest[0] if len(rest) == 1 else None


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_mapping_type(tp: Any) -> bool:
    origin = typing.get_origin(tp) or tp
    return isinstance(origin, type) and issubclass(origin, Mapping)


def _is_tuple_type(tp: Any) -> bool:
    return (typing.get_origin(tp) or tp) is tuple


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _layout(f: dataclasses.Field) -> _Layout:
    return f.metadata.get(_META, _Layout())


def _config_fields(cls: type, layout: _Layout) -> list[tuple[str, dataclasses.Field]]:
    """(config key, field) of a dataclass's config keys, in field order."""
    return [
        (layout.rename.get(f.name, f.name), f)
        for f in dataclasses.fields(cls)
        if f.init and f.name not in layout.exclude
    ]


def _check_mode(unset: str) -> None:
    if unset not in UNSET_MODES:
        raise ValueError(f"unset={unset!r} unknown; use one of {UNSET_MODES}")


# ------------------------------------------------------------------------------ dataclass -> dict
def to_config_dict(obj: Any, *, unset: str = "empty") -> ml_collections.ConfigDict:
    """The ConfigDict of a dataclass instance (see the module docstring for the encoding)."""
    _check_mode(unset)
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"to_config_dict needs a dataclass instance; got {type(obj).__name__}")
    return ml_collections.ConfigDict(_block(obj, _Layout(), unset))


def _block(obj: Any, layout: _Layout, unset: str) -> dict[str, Any]:
    hints = _hints(type(obj))
    out: dict[str, Any] = {}
    for key, f in _config_fields(type(obj), layout):
        value, tp, sub = getattr(obj, f.name), hints[f.name], _layout(f)
        if sub.inline:
            out.update(_block(value, sub, unset))
        else:
            out[key] = _encode(value, tp, sub, unset)
    return out


def _encode(value: Any, tp: Any, layout: _Layout, unset: str) -> Any:
    inner = _optional_inner(tp)
    if inner is not None and _is_dataclass_type(inner):
        if value is None:
            return {ENABLED: False} if unset == "empty" else None
        return {ENABLED: True, **_block(value, layout, unset)}
    if value is None:
        base = inner if inner is not None else tp
        if unset == "placeholder":
            return config_dict.placeholder(base if isinstance(base, type) else object)
        if base is int:
            return 0
        if base is str:
            return ""
        raise TypeError(f"cannot write None of a {_type_name(tp)} field as an empty value")
    if dataclasses.is_dataclass(value):
        return _block(value, layout, unset)
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if (inner or tp) is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


# ------------------------------------------------------------------------------ dict -> dataclass
def from_config_dict(
    cls: type, config: Any, *, unset: str = "empty", base: Any = None, path: str = "config"
) -> Any:
    """A validated ``cls`` instance from a ConfigDict / nested mapping (missing keys keep the
    values of ``base``, default ``cls()``); one-line ``ValueError``s name the offending key."""
    _check_mode(unset)
    if not _is_dataclass_type(cls):
        raise TypeError(f"from_config_dict needs a dataclass type; got {cls!r}")
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return _from_block(cls, config, _Layout(), base, unset, path)


def _from_block(cls: type, block: Any, layout: _Layout, base: Any, unset: str, path: str) -> Any:
    if not isinstance(block, Mapping):
        raise ValueError(f"{path}: expected a block of fields, got {type(block).__name__}")
    base = cls() if base is None else base
    remaining = dict(block)
    kwargs = _read_fields(cls, remaining, layout, base, unset, path)
    if remaining:
        valid = sorted(_all_keys(cls, layout))
        raise ValueError(
            f"{path}: unknown key(s) {sorted(remaining)}; valid keys: {', '.join(valid)}"
        )
    try:
        return dataclasses.replace(base, **kwargs)
    except (TypeError, ValueError) as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith("config") else f"{path}: {msg}") from None


def _all_keys(cls: type, layout: _Layout) -> list[str]:
    keys = []
    for key, f in _config_fields(cls, layout):
        sub = _layout(f)
        keys += _all_keys(_hints(cls)[f.name], sub) if sub.inline else [key]
    return keys


def _read_fields(
    cls: type, remaining: dict, layout: _Layout, base: Any, unset: str, path: str
) -> dict[str, Any]:
    """Field values of ``cls`` taken (and removed) from ``remaining``; inline blocks recurse."""
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for key, f in _config_fields(cls, layout):
        tp, sub, current = hints[f.name], _layout(f), getattr(base, f.name)
        if sub.inline:
            inner = _read_fields(tp, remaining, sub, current, unset, path)
            try:
                kwargs[f.name] = dataclasses.replace(current, **inner)
            except (TypeError, ValueError) as e:
                msg = str(e)
                raise ValueError(msg if msg.startswith("config") else f"{path}: {msg}") from None
        elif key in remaining:
            kwargs[f.name] = _decode(remaining.pop(key), tp, sub, current, unset, f"{path}.{key}")
    return kwargs


def _decode(value: Any, tp: Any, layout: _Layout, current: Any, unset: str, path: str) -> Any:
    inner = _optional_inner(tp)
    if inner is not None and _is_dataclass_type(inner):
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise ValueError(f"{path}: expected a block of fields, got {type(value).__name__}")
        value = dict(value)
        enabled = value.pop(ENABLED, True)
        if not isinstance(enabled, bool):
            raise ValueError(f"{path}.{ENABLED}: expected bool, got {enabled!r}")
        obj = _from_block(inner, value, layout, current or inner(), unset, path)
        return obj if enabled else None
    if value is None:
        if inner is not None or tp is Any:
            return None
        raise ValueError(f"{path}: is required (None given)")
    if inner is not None:
        if unset == "empty" and (
            (inner is int and value == 0 and not isinstance(value, bool))
            or (inner is str and value == "")
        ):
            return None
        return _decode(value, inner, layout, current, unset, path)
    if _is_dataclass_type(tp):
        return _from_block(tp, value, layout, current, unset, path)
    return _scalar(value, tp, path)


def _scalar(value: Any, tp: Any, path: str) -> Any:
    bad = f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}"
    if tp is Any:
        return value
    args = _union_args(tp)
    if args is not None:
        for a in args:
            try:
                return _scalar(value, a, path)
            except ValueError:
                continue
        raise ValueError(bad)
    if typing.get_origin(tp) is typing.Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"{path}: {value!r} is not one of {typing.get_args(tp)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(bad)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(bad)
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(bad)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(bad)
        return value
    if _is_tuple_type(tp):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ValueError(bad)
        args = typing.get_args(tp)
        elem = args[0] if args else Any
        if isinstance(value, str):
            items = [x.strip() for x in items if x.strip()]
            if elem in (int, float):
                items = [_number(x, elem, path) for x in items]
        return tuple(_scalar(x, elem, path) for x in items)
    if _is_mapping_type(tp):
        if not isinstance(value, Mapping):
            raise ValueError(bad)
        return dict(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ValueError(bad)
    return value


def _number(text: str, tp: type, path: str) -> Any:
    try:
        return tp(text)
    except ValueError:
        raise ValueError(f"{path}: {text!r} is not a {tp.__name__}") from None
