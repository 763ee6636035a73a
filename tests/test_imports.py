"""The package's layers (file -> models -> runtime -> kernels): models/ and kernels/ never import runtime, converters,
bench or cli; runtime/ never imports converters, bench or cli; no module imports itself back through others. Every
import counts, also one inside a function."""
from __future__ import annotations

import ast
from pathlib import Path

import edgellm

ROOT = Path(edgellm.__file__).parent
PACKAGES = ("", "runtime", "kernels", "converters", "models", "bench")  # what pyproject.toml installs
LOWER = ("edgellm.models", "edgellm.kernels")
UPPER = ("edgellm.runtime", "edgellm.converters", "edgellm.bench", "edgellm.cli")
ABOVE_RUNTIME = ("edgellm.converters", "edgellm.bench", "edgellm.cli")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).glob("*.py")):
            parts = ["edgellm"] + ([pkg] if pkg else []) + ([] if f.stem == "__init__" else [f.stem])
            out[".".join(parts)] = f
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that module `name` imports, anywhere in it (top level or inside a function)."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import edgellm.x.y` names a module; a name inside one names the module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_the_walk_sees_the_package():
    g = graph()
    assert "edgellm.runtime.engine" in g and "edgellm.models.llama" in g["edgellm.models.bitnet"]
    assert "edgellm.kernels.ops" in g["edgellm.models.llama"]


def test_models_and_kernels_import_nothing_above_them():
    bad = [(m, t) for m, ts in graph().items() if m.startswith(LOWER) for t in ts if t.startswith(UPPER)]
    assert not bad, "\n".join(f"{m} imports {t}" for m, t in bad)


def test_runtime_imports_no_converters_bench_or_cli():
    bad = [(m, t) for m, ts in graph().items() if m.startswith("edgellm.runtime") for t in ts
           if t.startswith(ABOVE_RUNTIME)]
    assert not bad, "\n".join(f"{m} imports {t}" for m, t in bad)


def test_no_import_circles():
    g = graph()
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []
    circles = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(g[m]):
            if state.get(t) == 1:
                circles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not circles, "\n".join(" -> ".join(c) for c in circles)
