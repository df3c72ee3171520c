"""The layout rules of the codebase, checked: no module of app/ over 400 lines, no import cycle among them.

Type-only imports (under TYPE_CHECKING) count too: a cycle that only the type checker
sees is still two modules that cannot be read one after the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

APP = Path(__file__).resolve().parents[2] / "app"
MAX_LINES = 400


def modules() -> dict[str, Path]:
    found = {}
    for path in APP.rglob("*.py"):
        name = ".".join(path.relative_to(APP.parent).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The app modules `path` imports; `from package import submodule` imports the submodule."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            subs = [f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in known]
            found.update(subs if len(subs) == len(node.names) else [node.module, *subs])
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name in known}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    path: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                found.append([*path[path.index(target):], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return found


def test_no_module_of_app_is_over_400_lines() -> None:
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_no_import_cycle_between_modules_of_app() -> None:
    known = modules()
    graph = {name: imports(path, known) - {name} for name, path in known.items()}
    assert cycles(graph) == []


def test_sessions_import_nothing_of_the_broker() -> None:
    """The broker calls the sessions side through `Inbound` and hands it a `Command`, both declared in
    app/sessions/ports.py; sessions reach RabbitMQ only through ports. Type-only imports count: a
    session that names a broker type still cannot be read, or faked, without the broker."""
    known = modules()
    found = {name: sorted(target for target in imports(path, known)
                          if target == "app.broker" or target.startswith("app.broker."))
             for name, path in known.items() if name == "app.sessions" or name.startswith("app.sessions.")}
    assert {name: targets for name, targets in found.items() if targets} == {}


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


MAX_TOP_LEVEL_MODULES = 15
TESTS = APP.parent / "tests"


def test_app_has_at_most_15_modules_at_its_top_level() -> None:
    """Past that, a newcomer reads a list instead of a map: group modules into packages that say what they are."""
    top = sorted(path.name for path in APP.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


def test_every_test_module_holds_a_test() -> None:
    """A `test_` file without tests is a helper module in disguise: helpers live in tests/support/."""
    empty = []
    for path in TESTS.rglob("test_*.py"):
        tree = ast.parse(path.read_text())
        names = [node.name for node in ast.walk(tree)
                 if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)]
        if not any(name.startswith(("test_", "Test")) for name in names):
            empty.append(path.relative_to(TESTS).as_posix())
    assert empty == []


def test_bench_imports_nothing_of_tests() -> None:
    """The benchmarks stand alone (tests import from bench: the cluster harness, the MQTT client codec), never
    the other way round."""
    bench = APP.parent / "bench"
    found: list[str] = []
    assert list(bench.rglob("*.py"))
    for path in sorted(bench.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [f"{path.relative_to(bench.parent)}: {name}" for name in names
                      if name.split(".")[0] in {"tests", "support", "conftest"}]
    assert found == [], found


def test_every_import_in_the_tests_resolves() -> None:
    """Imports inside test functions too: ruff and collection never see one that names a moved module
    until the test runs (a helper module renamed once failed only in the full suite's 9th minute)."""
    import importlib.util
    import sys

    def resolves(top: str) -> bool:  # a loaded module may carry no __spec__ (kombu), which find_spec refuses
        return top in sys.modules or importlib.util.find_spec(top) is not None

    optional = {"brotli"}  # test_sentry decodes with it only when sentry-sdk found it installed
    missing = set()
    for path in TESTS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            else:
                continue
            missing.update(f"{path.relative_to(TESTS).as_posix()}: {name}" for name in names
                           if name not in optional and not resolves(name.split(".")[0]))
    assert sorted(missing) == []
