"""HumanJailbreaks template attack (spec mixat.md §8.1, HarmBench ``HumanJailbreaks``).

Every template is a jailbreak wrapper around the request; the test cases of a behaviour are all
templates filled with its (contextualised, §8.1) request text.  Unlike the reference, *all*
templates are used (HarmBench's ``[:-1]`` slice dropped the last one, spec §11.21).

Template sets (``HumanJailbreaksConfig.template_set``, issue #17):

* ``"harmbench"`` (default, HarmBench parity): HarmBench's own 114 human jailbreak templates,
  shipped as package data ``data/harmbench_human_jailbreaks.json`` (MIT, attribution in
  ``data/HARMBENCH_LICENSE.txt``).  They are Python ``str.format`` strings filled exactly as
  HarmBench does (``template.format(request)``: ``{0}`` = request, doubled braces are literal);
  as in the source, two have no placeholder (their test case is the template alone) and one is
  duplicated.
* ``"project"``: the 11 templates written for this project (``data/jailbreak_templates.json``:
  role-play, hypothetical, prefix injection, ...) — an opt-in extra, not HarmBench's attack.
* ``"harmbench+project"``: both; ``"none"``: only the user's ``templates_path``.

Template file formats (user supplied, and the project set):

* JSON: either a list of templates or an object ``{"templates": [...]}``; each template is an
  object ``{"name": str, "text": str}`` or a bare string (named ``template_<index>``).
* CSV: a header row with the columns ``name`` and ``template`` (other columns ignored).

Each text must contain ``{behavior}`` at least once (other braces are left untouched: filling is a
plain string replacement, not ``str.format``) and names must be unique.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mixat_jax.attacks.direct import behavior_with_context
from mixat_jax.attacks.llm_interface import BehaviorLike, validate_behaviors

__all__ = [
    "BUILTIN_TEMPLATES_PATH",
    "HARMBENCH_TEMPLATES_PATH",
    "TEMPLATE_SETS",
    "HumanJailbreaks",
    "HumanJailbreaksConfig",
    "JailbreakTemplate",
    "SLOT",
    "builtin_templates",
    "harmbench_templates",
    "load_templates",
    "validate_templates",
]

SLOT = "{behavior}"
BUILTIN_TEMPLATES_PATH = Path(__file__).parent / "data" / "jailbreak_templates.json"
HARMBENCH_TEMPLATES_PATH = Path(__file__).parent / "data" / "harmbench_human_jailbreaks.json"
TEMPLATE_SETS = ("harmbench", "project", "harmbench+project", "none")


@dataclass(frozen=True)
class JailbreakTemplate:
    """A named jailbreak wrapper with a ``{behavior}`` slot, or (``python_format``) a HarmBench
    ``str.format`` template with ``{0}``."""

    name: str
    text: str
    python_format: bool = False

    def fill(self, request: str) -> str:
        if self.python_format:
            return self.text.format(request)
        return self.text.replace(SLOT, request)


def validate_templates(templates: Sequence[JailbreakTemplate], source: str = "templates") -> None:
    """One-line ValueError for an empty set, a missing slot, an empty name or a duplicate name."""
    if len(templates) == 0:
        raise ValueError(f"{source}: no templates found; add at least one template with {SLOT}")
    seen: set[str] = set()
    for t in templates:
        if not t.name.strip():
            raise ValueError(f"{source}: a template has an empty name; give every template a name")
        if not t.python_format and SLOT not in t.text:
            raise ValueError(
                f"{source}: template {t.name!r} lacks the slot {SLOT}; insert it where the "
                "request text goes"
            )
        if t.name in seen:
            raise ValueError(f"{source}: duplicate template name {t.name!r}; names must be unique")
        seen.add(t.name)


def _from_json(path: Path) -> list[JailbreakTemplate]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}); fix the file") from e
    items = doc.get("templates") if isinstance(doc, dict) else doc
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a list of templates or {{'templates': [...]}}")
    out: list[JailbreakTemplate] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.append(JailbreakTemplate(f"template_{i}", item))
        elif isinstance(item, dict) and isinstance(item.get("text"), str):
            out.append(JailbreakTemplate(str(item.get("name", f"template_{i}")), item["text"]))
        else:
            raise ValueError(
                f"{path}: template #{i} must be a string or an object with a string 'text' field"
            )
    return out


def _from_csv(path: Path) -> list[JailbreakTemplate]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        if "name" not in cols or "template" not in cols:
            raise ValueError(f"{path}: CSV needs a header with 'name' and 'template' columns")
        return [JailbreakTemplate(row["name"] or "", row["template"] or "") for row in reader]


def load_templates(path: str | Path) -> list[JailbreakTemplate]:
    """Load and validate a JSON or CSV template file (format in the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"template file {p} does not exist; pass an existing .json or .csv file")
    suffix = p.suffix.lower()
    if suffix == ".json":
        templates = _from_json(p)
    elif suffix == ".csv":
        templates = _from_csv(p)
    else:
        raise ValueError(f"template file {p} must end in .json or .csv, got {suffix!r}")
    validate_templates(templates, str(p))
    return templates


def builtin_templates() -> list[JailbreakTemplate]:
    """The project's own templates (role-play, hypothetical, prefix injection, ...)."""
    return load_templates(BUILTIN_TEMPLATES_PATH)


def harmbench_templates() -> list[JailbreakTemplate]:
    """HarmBench's 114 human jailbreak templates (package data, MIT), named ``harmbench_<i>``."""
    doc = json.loads(HARMBENCH_TEMPLATES_PATH.read_text(encoding="utf-8"))
    return [
        JailbreakTemplate(f"harmbench_{i}", text, python_format=True)
        for i, text in enumerate(doc["templates"])
    ]


@dataclass(frozen=True)
class HumanJailbreaksConfig:
    """``template_set``: one of `TEMPLATE_SETS` (module docstring; default HarmBench's own list);
    ``templates_path``: a user file (JSON/CSV) added after the set; ``num_templates``: only the
    first N templates (0 = all, the protocol)."""

    template_set: str = "harmbench"
    templates_path: str | None = None
    num_templates: int = 0

    def __post_init__(self) -> None:
        if self.num_templates < 0:
            raise ValueError(f"num_templates must be >= 0, got {self.num_templates}")
        if self.template_set not in TEMPLATE_SETS:
            raise ValueError(
                f"template_set must be one of {', '.join(TEMPLATE_SETS)}, got {self.template_set!r}"
            )


class HumanJailbreaks:
    """One test case per (behaviour, template); every template is used."""

    name = "HumanJailbreaks"

    def __init__(self, cfg: HumanJailbreaksConfig | None = None) -> None:
        self.cfg = cfg or HumanJailbreaksConfig()
        templates: list[JailbreakTemplate] = []
        if "harmbench" in self.cfg.template_set:
            templates += harmbench_templates()
        if "project" in self.cfg.template_set:
            templates += builtin_templates()
        if self.cfg.templates_path is not None:
            templates += load_templates(self.cfg.templates_path)
        if not templates:
            raise ValueError(
                "HumanJailbreaks has no templates; set templates_path or a template_set"
            )
        validate_templates(templates, "HumanJailbreaks templates (set + user)")
        if self.cfg.num_templates:
            templates = templates[: self.cfg.num_templates]
        self.templates: tuple[JailbreakTemplate, ...] = tuple(templates)

    def generate_test_cases(
        self, behaviors: Sequence[BehaviorLike], *, seed: int = 0
    ) -> dict[str, list[str]]:
        del seed  # deterministic
        validate_behaviors(behaviors)
        return {b.id: [t.fill(behavior_with_context(b)) for t in self.templates] for b in behaviors}
