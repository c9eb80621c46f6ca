"""The layout of src/handler is the architecture (docs/architecture.md): each package imports
only what its `__init__` docstring allows, no module-level imports go round in a cycle, and the
local tools are imported by nothing the Lambda ships. Read from the source with `ast`: nothing is
imported here."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
HANDLER = SRC / "handler"
SHARED = {"handler", "handler.errors", "handler.frozen", "handler.operate.observability"}

# What each package may import besides itself and SHARED, as its __init__ docstring says.
ALLOWED = {
    "handler.queue": set(),
    "handler.dispatch": {"handler.queue"},
    "handler.batch": {"handler.dispatch", "handler.queue"},
    "handler.operate": {"handler.queue"},
    "handler.runtime": {"handler.batch", "handler.dispatch", "handler.operate", "handler.queue"},
    "handler.app": {"handler.runtime"},
    "handler.local": {
        "handler.batch",
        "handler.dispatch",
        "handler.operate",
        "handler.queue",
        "handler.runtime",
        "handler.app",
    },
}


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(SRC).with_suffix("").parts)
    return name.removesuffix(".__init__")


def imports(path: Path, *, top_level_only: bool) -> set[str]:
    """The handler modules `path` imports (`from handler.x import y` counts x.y when it is a
    module); with `top_level_only`, only the imports that run when the module is imported."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("handler"):
                found.add(node.module)
                for alias in node.names:
                    candidate = f"{node.module}.{alias.name}"
                    if (SRC / candidate.replace(".", "/")).with_suffix(".py").exists():
                        found.add(candidate)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("handler"))
    return found


def package_of(module: str) -> str:
    if module in SHARED:
        return module
    return ".".join(module.split(".")[:2])


MODULES = {module_name(p): p for p in HANDLER.rglob("*.py")}


def test_every_module_sits_in_its_concerns_package() -> None:
    loose = {
        module
        for module, path in MODULES.items()
        if module.count(".") == 1
        and path.name != "__init__.py"
        and module not in {"handler.app", "handler.errors", "handler.frozen"}
    }
    assert loose == set()


def test_each_package_imports_only_what_its_docstring_allows() -> None:
    wrong = []
    for module, path in MODULES.items():
        own = package_of(module)
        # The shared modules import nothing of ours but the errors.
        allowed = {"handler.errors", "handler"} if own in SHARED else ALLOWED[own] | SHARED | {own}
        for target in imports(path, top_level_only=False):
            if package_of(target) not in allowed and package_of(target) != own:
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def test_nothing_outside_the_local_tools_imports_them() -> None:
    importers = [
        module
        for module, path in MODULES.items()
        if not module.startswith("handler.local")
        and any(t.startswith("handler.local") for t in imports(path, top_level_only=False))
    ]
    assert importers == []


def test_module_level_imports_have_no_cycle() -> None:
    graph = {
        module: {t for t in imports(path, top_level_only=True) if t in MODULES and t != module}
        for module, path in MODULES.items()
    }
    done: set[str] = set()

    def visit(module: str, trail: list[str]) -> None:
        if module in trail:
            raise AssertionError(" -> ".join([*trail[trail.index(module) :], module]))
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, [*trail, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_no_comment_cites_a_document_outside_the_repository() -> None:
    # The shared design document by name or path, or in words ("the design's contract")
    outside = re.compile(r"\bDESIGN\b|\.\./shared|the design's")
    cited = [
        f"{path.relative_to(SRC)}:{number}: {line.strip()}"
        for path in HANDLER.rglob("*")
        if path.suffix in {".py", ".sql"}
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if outside.search(line)
    ]
    assert cited == []
