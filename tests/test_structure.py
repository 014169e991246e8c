"""The package's structure: its files import each other without a cycle, at file level and between
the layers ``morphir`` (the facade) → ``morphir.passes`` → ``morphir.api`` → the core, so data flows
down the layers and every module can be read after the ones it imports."""

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
FACADE = {"morphir", "morphir.defaults"}  # what assembles the built-ins; nothing below imports it
COMMAND_LINE = {"morphir.cli", "morphir.commands"}  # the top: the command and what each command does


def module_files() -> dict[str, Path]:
    files = {}
    for folder, package in ((ROOT / "morphir", "morphir"), (ROOT / "passes", "morphir.passes")):
        for p in folder.glob("*.py"):
            files[package if p.stem == "__init__" else f"{package}.{p.stem}"] = p
    return files


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules a file imports anywhere in it: at the top, inside functions (lazy) and
    under ``TYPE_CHECKING`` alike, since each is a dependency a reader has to follow."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("morphir"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
    return found & modules


def module_graph() -> nx.DiGraph:
    files = module_files()
    graph = nx.DiGraph()
    graph.add_nodes_from(files)
    for name, path in files.items():
        graph.add_edges_from((name, dep) for dep in imports_of(path, set(files)) if dep != name)
    return graph


def test_the_package_imports_without_a_cycle() -> None:
    graph = module_graph()
    assert graph.number_of_edges() > 80  # the parser sees the imports
    cycles = sorted(sorted(c) for c in nx.simple_cycles(graph))
    assert not cycles, f"import cycles: {cycles}"


def test_the_core_never_imports_the_passes_or_the_facade() -> None:
    graph = module_graph()
    core = [n for n in graph if not n.startswith("morphir.passes") and n not in FACADE | COMMAND_LINE]
    bad = [(u, v) for u in core for v in graph.successors(u) if v.startswith("morphir.passes") or v in FACADE | COMMAND_LINE]
    assert not bad, f"core modules that reach up: {bad}"


def test_the_passes_use_the_public_api_only() -> None:
    graph = module_graph()
    bad = [(u, v) for u in graph if u.startswith("morphir.passes") for v in graph.successors(u)
           if not (v == "morphir.api" or v.startswith("morphir.passes"))]
    assert not bad, f"passes importing past morphir.api: {bad}"


def test_the_cycle_check_sees_lazy_and_type_checking_imports(tmp_path) -> None:
    (tmp_path / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from morphir.b import X\n")
    (tmp_path / "b.py").write_text("def f():\n    from morphir import a\n")
    modules = {"morphir.a", "morphir.b"}
    assert imports_of(tmp_path / "a.py", modules) == {"morphir.b"}
    assert imports_of(tmp_path / "b.py", modules) == {"morphir.a"}


def test_no_public_name_of_morphir_hides_one_of_its_modules() -> None:
    import morphir

    modules = {n.split(".")[1] for n in module_files() if n.count(".") == 1 and not n.startswith("morphir.passes")}
    hidden = sorted(n for n in morphir.__all__ if n in modules and not isinstance(getattr(morphir, n), type(morphir)))
    assert not hidden, f"functions named like modules of morphir: {hidden}"
