"""The package's layer order (WORKSPACE.md, "Layers"), enforced on the source's imports.

Every ``import``/``from ... import`` of a ``mixat_jax`` module, at module level or inside a
function, is an edge. The test fails on:
  * an upward edge (a module importing one of a higher layer);
  * a cycle between files, or between top-level parts (``attacks``, ``training``, ``steps``, ...);
  * an underscore-private name imported from another module (in the package, tests and bench);
  * a module ``__getattr__`` (re-exports hide where a name lives);
  * a function-local import of a ``mixat_jax`` module without a ``# lazy: <reason>`` comment
    (function-local imports are for keeping a heavy or optional dependency out of import time).
"""

from __future__ import annotations

import ast
import collections
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "mixat_jax"

# Lowest first. A module's layer is that of its longest matching prefix.
LAYERS: tuple[tuple[str, ...], ...] = (
    # 0 foundations: model definitions, device mesh, chat rendering, data records, config types
    ("models", "mesh", "chat", "tokenizer_build", "behaviors", "config_types", "cli", "storage"),
    # 1 weights in/out, adapters, generation, shared objectives, masked diffusion
    ("hf", "lora", "sampling", "objectives", "diffusion", "tiny_model"),
    # 2 attacks and judges (and the offline PAP pool they feed training with)
    ("attacks", "judges", "pap_pool"),
    # 3 training pieces, the research step API on top of them, DAT's data generation
    ("training", "steps", "dat"),
    # 4 robustness evaluation
    ("evaluation",),
    # 5 demo and entry points
    (
        "demo",
        "train",
        "attack",
        "evaluate",
        "generate",
        "inpaint",
        "dat_sample",
        "convert",
        "lm_eval",
        "",
    ),
)


def _layer(module: str) -> int:
    rest = module.split(".")[1:]
    best = (-1, None)
    for i, names in enumerate(LAYERS):
        for n in names:
            parts = n.split(".") if n else []
            if rest[: len(parts)] == parts and len(parts) > best[0]:
                best = (len(parts), i)
    if best[1] is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS (and WORKSPACE.md)")
    return best[1]


def _part(module: str) -> str:
    rest = module.split(".")[1:]
    return rest[0] if rest else "__init__"


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


class _Imports(ast.NodeVisitor):
    """Collects (target module, imported names, line, function-local) for one file."""

    def __init__(self, module: str, is_package: bool):
        self.package = module if is_package else module.rpartition(".")[0]
        self.depth = 0
        self.found: list[tuple[str, list[str], int, bool]] = []
        self.bound: dict[str, str] = {}  # local name -> mixat_jax module it is bound to

    def _func(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _func

    def visit_Import(self, node: ast.Import):
        for a in node.names:
            if a.name.split(".")[0] == "mixat_jax":
                self.found.append((a.name, [], node.lineno, self.depth > 0))
                if a.asname:
                    self.bound[a.asname] = a.name

    def visit_ImportFrom(self, node: ast.ImportFrom):
        if node.level:
            base = self.package.split(".")[: len(self.package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        if target.split(".")[0] != "mixat_jax":
            return
        names = [a.name for a in node.names]
        self.found.append((target, names, node.lineno, self.depth > 0))
        for a in node.names:
            if f"{target}.{a.name}" in MODULES:
                self.bound[a.asname or a.name] = f"{target}.{a.name}"


def _scan(path: pathlib.Path, module: str) -> tuple[_Imports, ast.Module]:
    tree = ast.parse(path.read_text(), filename=str(path))
    v = _Imports(module, path.name == "__init__.py")
    v.visit(tree)
    return v, tree


SCANS = {m: _scan(p, m) for m, p in MODULES.items()}


def _edges() -> dict[str, set[str]]:
    """File-level edges: `from pkg import module` points at the module, else at the file."""
    out: dict[str, set[str]] = collections.defaultdict(set)
    for m, (v, _) in SCANS.items():
        for target, names, _, _ in v.found:
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            if subs:
                out[m].update(subs)
            if not names or len(subs) < len(names):
                if target in MODULES:
                    out[m].add(target)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_every_module_has_a_layer():
    for m in MODULES:
        _layer(m)


def test_no_upward_imports():
    bad = [
        f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
        for a, targets in _edges().items()
        for b in sorted(targets)
        if _layer(b) > _layer(a)
    ]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_cycles_between_files():
    cycles = _cycles(_edges())
    assert not cycles, "import cycles between files:\n" + "\n".join(map(str, cycles))


def test_no_cycles_between_top_level_parts():
    parts: dict[str, set[str]] = collections.defaultdict(set)
    for a, targets in _edges().items():
        for b in targets:
            if _part(a) != _part(b) and _part(a) != "__init__":
                parts[_part(a)].add(_part(b))
    cycles = _cycles(parts)
    assert not cycles, "cycles between top-level parts:\n" + "\n".join(map(str, cycles))


def _private_uses(path: pathlib.Path, module: str) -> list[str]:
    v, tree = SCANS[module] if module in SCANS else _scan(path, module)
    out = []
    for target, names, line, _ in v.found:
        for n in names:
            if n.startswith("_") and not n.startswith("__") and target != module:
                out.append(f"{path.relative_to(ROOT)}:{line} imports {target}.{n}")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in v.bound
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and v.bound[node.value.id] != module
        ):
            out.append(
                f"{path.relative_to(ROOT)}:{node.lineno} uses {v.bound[node.value.id]}.{node.attr}"
            )
    return out


def test_no_private_names_cross_modules():
    files = [(p, m) for m, p in MODULES.items()]
    for folder in ("tests", "bench"):
        files += [(p, _module_name(p)) for p in sorted((ROOT / folder).rglob("*.py"))]
    bad = [u for p, m in files for u in _private_uses(p, m)]
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_no_module_getattr():
    bad = [
        m
        for m, (_, tree) in SCANS.items()
        if any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body)
    ]
    assert not bad, f"module-level __getattr__ (re-exports) in {bad}"


def test_function_local_imports_say_why():
    bad = []
    for m, (v, _) in SCANS.items():
        lines = MODULES[m].read_text().splitlines()
        for _, _, line, local in v.found:
            if local and "# lazy:" not in lines[line - 1] and "# lazy:" not in lines[line - 2]:
                bad.append(f"{MODULES[m].relative_to(ROOT)}:{line}: {lines[line - 1].strip()}")
    assert not bad, (
        "function-local imports of mixat_jax modules need a '# lazy: <reason>' comment "
        "(on the line or the line above), or should move to the top of the module:\n"
        + "\n".join(bad)
    )


@pytest.mark.parametrize("graph, cyclic", [({"a": {"b"}, "b": {"a"}}, True), ({"a": {"b"}}, False)])
def test_cycle_finder(graph, cyclic):
    assert bool(_cycles(graph)) == cyclic
