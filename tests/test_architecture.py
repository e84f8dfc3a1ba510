"""The house rules, checked on the source tree: layers import only downwards, no import circles,
no stage touches storage or Ray, no source file past 400 lines, no citation of files outside the repo."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "model", "stages", "trainer", "synth", "evaluation", "pipeline")
# what each layer may import of the project (besides itself)
ALLOWED = {
    "core": set(),
    "model": {"core"},
    "stages": {"core", "model"},
    "evaluation": {"core", "model", "stages"},
    "trainer": {"core", "model", "stages"},
    "synth": {"core", "model", "stages", "evaluation"},
    "pipeline": {"core", "model", "stages", "trainer", "synth", "evaluation"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every module this file imports (at the top or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _project_edges() -> dict[str, set[str]]:
    edges = {}
    for name, path in MODULES.items():
        edges[name] = {m for m in _imports(path) if m in MODULES and m != name
                       and not name.startswith(m + ".")}      # a module importing its own package
    return edges


def test_layers_import_only_downwards():
    bad = []
    for name, targets in _project_edges().items():
        layer = name.split(".")[0]
        for target in targets:
            other = target.split(".")[0]
            if other != layer and other not in ALLOWED[layer]:
                bad.append(f"{name} -> {target}")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_no_import_circles():
    edges = _project_edges()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import circles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("layer, banned", [("stages", ("ray", "fsspec", "s3fs")),
                                           ("model", ("ray", "fsspec")),
                                           ("trainer", ("ray",)),
                                           ("evaluation", ("ray", "fsspec"))])
def test_layers_do_not_know_ray_or_storage(layer, banned):
    bad = [f"{name} imports {m}" for name, path in MODULES.items() if name.split(".")[0] == layer
           for m in _imports(path) if m.split(".")[0] in banned]
    assert not bad, "\n".join(bad)


def test_no_source_file_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400}
    assert not long, f"split these by concept: {long}"


def test_the_repo_cites_only_itself():
    bad = []
    for path in [*MODULES.values(), *ROOT.glob("configs/**/*.yaml"), *ROOT.glob("docs/*.md"), ROOT / "README.md"]:
        text = path.read_text(encoding="utf-8")
        for needle in ("DESIGN.md", "shared/", "spec §", "ENV.md"):
            if needle in text:
                bad.append(f"{path.relative_to(ROOT)}: {needle}")
    assert not bad, "citations of files outside the repository:\n" + "\n".join(bad)
