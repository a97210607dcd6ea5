"""Packaging: pyproject.toml declares the runtime dependencies that requirements.txt installs (the
same ranges), its console scripts point at real entry functions, and its package data exists."""

from __future__ import annotations

import ast
import pathlib
import re
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements(path: pathlib.Path) -> set[str]:
    out = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-r"):
            out.add(re.sub(r"\s+", "", line).lower())
    return out


def test_runtime_dependencies_match_requirements_txt():
    declared = {re.sub(r"\s+", "", d).lower() for d in PYPROJECT["project"]["dependencies"]}
    assert declared == _requirements(ROOT / "requirements.txt")


def test_test_extra_covers_requirements_test_txt():
    names = lambda reqs: {re.split(r"[<>=\[]", r, maxsplit=1)[0] for r in reqs}  # noqa: E731
    extra = names(r.lower() for r in PYPROJECT["project"]["optional-dependencies"]["test"])
    assert names(_requirements(ROOT / "requirements-test.txt")) == extra


def test_console_scripts_resolve():
    scripts = PYPROJECT["project"]["scripts"]
    assert {"mixat-train", "mixat-evaluate", "mixat-attack", "mixat-generate"} <= set(scripts)
    for name, target in scripts.items():  # parsed, not imported: entry modules define absl flags
        module, func = target.split(":")
        tree = ast.parse(ROOT.joinpath(*module.split(".")).with_suffix(".py").read_text())
        defs = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert func in defs, f"{name}: {module} has no top-level function {func}"


def test_package_data_exists():
    for package, patterns in PYPROJECT["tool"]["setuptools"]["package-data"].items():
        folder = ROOT.joinpath(*package.split("."))
        for pattern in patterns:
            assert list(folder.glob(pattern)), f"{package}: {pattern} matches nothing"
