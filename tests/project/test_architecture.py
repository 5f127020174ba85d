"""The import graph: no cycles between the package's modules, torch only where the engine runs, the UI on jobs and events.

The graph is read from the sources with ``ast`` (every ``import``, the ones
inside functions included; ``if TYPE_CHECKING:`` blocks left out), with the
module names the package is installed under (``screens/`` is
``workbench.screens``, ``backends/`` is ``workbench.backends``), so it does not
depend on how the package was installed. It is the equivalent of an
import-linter configuration with these contracts:

- acyclic: no cycle between any two modules, counting imports made inside
  functions (a function-local import must not be what holds a cycle together);
- torch-free: the modules the UI, a client and the spec validator load never
  reach torch, transformers or another heavy engine dependency, neither at
  import nor through a function-local import of their own (the modules those
  import are followed through their module-level imports);
- the UI reaches the engine only through jobs and events: no module of
  ``workbench.screens`` imports an engine module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROOTS = {"workbench": REPO / "workbench", "workbench.screens": REPO / "screens", "workbench.backends": REPO / "backends",
         "workbench.presets": REPO / "presets"}
HEAVY = ("torch", "transformers", "safetensors", "datasets", "lm_eval", "optuna", "accelerate", "numpy")
TORCH_FREE = ("workbench.screens", "workbench.spec", "workbench.registry", "workbench.backends.client",
              "workbench.backends.protocol", "workbench.backends.transports", "workbench.pruning.family",
              "workbench.lowrank.family", "workbench.structured.family", "workbench.data.sources", "workbench.data.mixtures",
              "workbench.data.evaluation_text", "workbench.data.windows", "workbench.events",
              "workbench.history", "workbench.errors", "workbench.files", "workbench.host", "workbench.model_source")
ENGINE = ("workbench.engine", "workbench.jobs", "workbench.models", "workbench.sweep", "workbench.context",
          "workbench.layerwise", "workbench.observers", "workbench.preflight")


def _modules() -> dict[str, Path]:
    out = {}
    for prefix, folder in ROOTS.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            out[".".join([prefix, *parts])] = path
    return out


def _imports(name: str, path: Path, known: dict) -> list[tuple[str, bool]]:
    """(imported module, made inside a function) for every import of a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    type_only = {id(s) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                 for sub in node.body for s in ast.walk(sub)}
    in_function = {id(s) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for s in ast.walk(node) if s is not node}
    found = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        local = id(node) in in_function
        if isinstance(node, ast.Import):
            found += [(alias.name, local) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((candidate if candidate in known else base, local))
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, bool]]]:
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, children = work[-1]
            advanced = False
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                    advanced = True
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_modules(graph):
    edges = {name: {target for target, _ in imports if target in graph} for name, imports in graph.items()}
    assert _cycles(edges) == []


def _reaches(graph, start: str, avoid: tuple[str, ...]) -> list[str] | None:
    """The import chain from ``start`` to a module in ``avoid``: its own imports (inside functions too), then
    module-level imports only; None when there is none."""
    def hits(target: str) -> bool:
        return any(target == a or target.startswith(a + ".") for a in avoid)

    first = [(t, [start, t]) for t, _ in graph.get(start, ())]
    seen, queue = {start}, list(first)
    while queue:
        target, chain = queue.pop()
        if hits(target):
            return chain
        if target in seen or target not in graph:
            continue
        seen.add(target)
        queue += [(t, chain + [t]) for t, local in graph[target] if not local]
    return None


def test_torch_free_modules_never_reach_the_engine_libraries(graph):
    problems = []
    for name in sorted(graph):
        if any(name == m or name.startswith(m + ".") for m in TORCH_FREE):
            chain = _reaches(graph, name, HEAVY)
            if chain:
                problems.append(" -> ".join(chain))
    assert problems == []


def test_the_ui_reaches_the_engine_only_through_jobs_and_events(graph):
    problems = [f"{name} -> {target}" for name in sorted(graph) if name.startswith("workbench.screens")
                for target, _ in graph[name] if any(target == e or target.startswith(e + ".") for e in ENGINE)]
    assert problems == []
