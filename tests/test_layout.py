"""The house rules of the package layout: no import cycles, and imports run one way through the rooms
(kernels -> model -> hf / data -> training -> distill -> command-line entry points), read from the source itself."""

import ast
import pathlib
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jaxopd"
# Each room's rank: a module may import modules of its own rank or lower, never higher.
RANKS = {
    "jaxopd.bundled": 0, "jaxopd.configdict": 0, "jaxopd.tasks": 0,
    "jaxopd.kernels": 1,
    "jaxopd.model": 2,
    "jaxopd.hf": 3, "jaxopd.data": 3, "jaxopd.data.chat": 3,
    "jaxopd.training": 4, "jaxopd.export": 4,  # export: the CLI, and what a finished run calls (training.loop)
    "jaxopd.distill": 5,
    "jaxopd": 6, "jaxopd.train": 6, "jaxopd.plan": 6, "jaxopd.penalty_view": 6, "jaxopd.data.__main__": 6,
    "jaxopd.configs": 6, "jaxopd.assets": 6, "jaxopd.evaluate": 6,
}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
    """The jaxopd modules `path` imports, at any depth of the file (function-level imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from a import b` imports module a.b when it is one, else a name defined in a.
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def _rank(module: str) -> int:
    prefix = max((room for room in RANKS if module == room or module.startswith(room + ".")), key=len)
    return RANKS[prefix]


def test_every_module_has_a_room():
    for module in _modules():
        assert any(module == room or module.startswith(room + ".") for room in RANKS), module


def test_imports_run_one_way_through_the_rooms():
    modules = _modules()
    upward = [f"{module} (rank {_rank(module)}) imports {imported} (rank {_rank(imported)})"
              for module, path in modules.items() for imported in _imports(path, modules)
              if _rank(imported) > _rank(module)]
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    modules = _modules()
    graph = {module: _imports(path, modules) - {module} for module, path in modules.items()}
    # A package's __init__ imports its submodules by design; only their importing the package back would loop.
    state, cycles = {}, []

    def visit(module, stack):
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                cycles.append(" -> ".join(stack[stack.index(imported):] + [imported]))
            elif imported not in state:
                visit(imported, stack + [imported])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_the_checks_see_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks above can fail: on a made-up package with kernels importing training and back."""
    package = tmp_path / "jaxopd"
    (package / "kernels").mkdir(parents=True)
    (package / "training").mkdir()
    for init in (package / "__init__.py", package / "kernels" / "__init__.py", package / "training" / "__init__.py"):
        init.write_text("")
    (package / "kernels" / "a.py").write_text("from jaxopd.training import b\n")
    (package / "training" / "b.py").write_text("def f():\n    import jaxopd.kernels.a\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    try:
        test_the_import_graph_has_no_cycle()
    except AssertionError as error:
        assert "jaxopd.kernels.a -> jaxopd.training.b -> jaxopd.kernels.a" in str(error)
    else:
        raise AssertionError("the cycle went unseen")
    try:
        test_imports_run_one_way_through_the_rooms()
    except AssertionError as error:
        assert "jaxopd.kernels.a (rank 1) imports jaxopd.training.b (rank 4)" in str(error)
    else:
        raise AssertionError("the upward import went unseen")
