"""The import graph of charrnn/ and experiments/: no cycle, no sys.path edits, library below
experiments, and every script runnable both by path and with ``python -m``.

The graph is built from the source with ``ast`` (nothing is imported), counting
imports inside functions too: a cycle closed by a function-level import still
fails as soon as both modules are half-initialised at once.
"""

import ast
import os
import subprocess
import sys

import pytest

from conftest import REPO

PACKAGES = ("charrnn", "experiments")


def module_files(root: str, packages=PACKAGES) -> dict[str, str]:
    """Dotted module name -> file, for every .py file under ``root/<package>``."""
    out = {}
    for package in packages:
        for folder, dirs, files in os.walk(os.path.join(root, package)):
            dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")))
            for name in sorted(files):
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, name), root)[:-3]
                    parts = rel.split(os.sep)
                    if parts[-1] == "__init__":
                        parts.pop()
                    out[".".join(parts)] = os.path.join(folder, name)
    return out


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every dotted name ``module`` imports (``from a import b`` gives ``a.b``, which the
    caller narrows to ``a`` when ``a.b`` is not a module), relative imports resolved."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                anchor = parts if is_package else parts[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.update(f"{base}.{a.name}" for a in node.names)
            names.add(base)
    return names


def import_graph(root: str, packages=PACKAGES) -> dict[str, set[str]]:
    """Module -> the project modules it imports (the deepest existing one of each name)."""
    files = module_files(root, packages)
    graph = {}
    for module, path in files.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        edges = set()
        for name in imported_names(tree, module, path.endswith("__init__.py")):
            while name and name not in files:
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):
                edges.add(name)  # (a module's own parent packages are initialised first)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle [a, b, ..., a] of the directed graph, or None (iterative DFS, three colours)."""
    state, parent = {}, {}
    for start in sorted(graph):
        if state.get(start):
            continue
        stack = [(start, iter(sorted(graph[start])))]
        state[start] = 1  # on the current path
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2  # done
                stack.pop()
            elif state.get(child) == 1:
                cycle = [child]
                while node != child:
                    cycle.append(node)
                    node = parent[node]
                return [child] + cycle[:0:-1] + [child]
            elif not state.get(child):
                state[child], parent[child] = 1, node
                stack.append((child, iter(sorted(graph.get(child, ())))))
    return None


# --- the finder itself, on graphs whose answer is known ---------------------------


def test_find_cycle_on_synthetic_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) is None  # diamond
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    cycle = find_cycle({"x": {"y"}, "y": {"z"}, "z": {"y"}})
    assert cycle == ["y", "z", "y"]


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    # The two cycles this layout removed, written the way they were: one import at the
    # top, the other inside a function; one absolute, one relative.
    pkg = tmp_path / "experiments"
    (pkg / "pages").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "pages" / "__init__.py").write_text("")
    (pkg / "pages" / "sections.py").write_text(
        "def render():\n    from experiments.pages import ablation\n")
    (pkg / "pages" / "ablation.py").write_text("from .sections import render\n")
    graph = import_graph(str(tmp_path), ("experiments",))
    assert graph["experiments.pages.ablation"] == {"experiments.pages.sections"}
    assert graph["experiments.pages.sections"] == {"experiments.pages.ablation"}
    assert find_cycle(graph) == ["experiments.pages.ablation", "experiments.pages.sections",
                                 "experiments.pages.ablation"]


# --- the repository ---------------------------------------------------------------


@pytest.fixture(scope="module")
def graph():
    return import_graph(REPO)


def test_no_import_cycle(graph):
    assert {"charrnn.train", "experiments.pages.report_sections",
            "experiments.bench.numpy_rnn"} <= set(graph)  # the walk found the modules
    assert find_cycle(graph) is None


def test_the_library_never_imports_experiments(graph):
    assert not {(m, d) for m, ds in graph.items() if m.startswith("charrnn")
                for d in ds if d.startswith("experiments")}


def _python_files():
    files = list(module_files(REPO).values()) + [os.path.join(REPO, "launch.py")]
    tests = os.path.join(REPO, "tests")
    return files + [os.path.join(tests, f) for f in sorted(os.listdir(tests))
                    if f.endswith(".py") and f != os.path.basename(__file__)]  # (names them)


def test_no_sys_path_edits_and_no_config_loaded_by_path():
    offenders = []
    for path in _python_files():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        library = not os.path.relpath(path, REPO).startswith(("tests", "launch.py"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "path" and \
                    isinstance(node.value, ast.Name) and node.value.id == "sys":
                offenders.append(f"{path}:{node.lineno} sys.path")
            if isinstance(node, ast.Constant) and node.value == "PYTHONPATH":
                offenders.append(f"{path}:{node.lineno} PYTHONPATH")
            if library and isinstance(node, ast.Attribute) and \
                    node.attr in ("spec_from_file_location", "run_path"):
                offenders.append(f"{path}:{node.lineno} {node.attr}")
    assert not offenders


def test_experiments_import_their_neighbours_by_full_name():
    # `import cli` beside a script works only when run by path; `from experiments import cli`
    # works both ways because experiments is an installed package.
    problems = []
    for module, path in module_files(REPO, ("experiments",)).items():
        neighbours = {f[:-3] for f in os.listdir(os.path.dirname(path)) if f.endswith(".py")}
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for name in imported_names(tree, module, path.endswith("__init__.py")):
            if name.split(".")[0] in neighbours - {"__init__"}:
                problems.append(f"{module} imports {name}")
    assert not problems


@pytest.mark.parametrize("form", ["path", "module"])
def test_a_script_runs_by_path_and_as_a_module(form, tmp_path):
    # From another directory: only the installed package can make the imports resolve.
    script = ([os.path.join(REPO, "experiments", "science", "clip_ablation.py")] if form == "path"
              else ["-m", "experiments.science.clip_ablation"])
    out = subprocess.run([sys.executable, *script, f"--outdir={tmp_path}", "--smoke",
                          "--list_runs"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[:2] == ["0", "lstm-sgd-lr1-seed0-none"]
