"""The package's rooms stay layered: the contract (``proto``) at the bottom, the runtime every
role shares (``runtime``) on it, the roles above, and no import running back up or in a circle.

Read from the source (every import, also those inside functions), so a new import that breaks
the layering fails here, naming the file and line, before it becomes a cycle at import time.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]
SKIPPED = ("tests", "bench", "examples", "scripts", "deploy", "docs", "build")
ROLES = {"server", "worker", "coordinator", "client", "chaos"}
# room -> the rooms it must never import
FORBIDDEN = {"proto": ROLES | {"runtime"}, "runtime": ROLES}
# What the contract never needs: it opens no socket, starts no thread or process, serves nothing.
RUNTIME_LIBRARIES = {"socket", "threading", "subprocess", "multiprocessing", "mmap", "signal", "concurrent",
                     "asyncio", "grpc", "grpc_health", "grpc_status", "prometheus_client", "http", "urllib"}


def modules() -> dict[str, Path]:
    """Dotted module name inside the package (``runtime.rpc``) -> its file, generated code left out."""
    found = {}
    rooms = [d for d in sorted(PACKAGE.iterdir()) if (d / "__init__.py").exists() and d.name not in SKIPPED]
    for path in (p for d in rooms for p in sorted(d.rglob("*.py"))):
        rel = path.relative_to(PACKAGE)
        if rel.parts[:2] == ("proto", "gen"):
            continue
        parts = rel.with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(imported module inside the package, line) for every import in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1] if node.level > 1 else base
                target = ".".join([*base, node.module] if node.module else base)
            elif node.module and node.module.startswith("shardps."):
                target = node.module[len("shardps."):]
            else:
                continue
            out.append((target, node.lineno))
            out += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]  # `from . import rpc`
        elif isinstance(node, ast.Import):
            out += [(a.name[len("shardps."):], node.lineno) for a in node.names if a.name.startswith("shardps.")]
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in known.items():
        for target, _ in imports(name, path):
            if target in known and target != name:
                edges[name].add(target)
    return edges


def room(module: str) -> str:
    return module.split(".")[0]


def test_the_contract_and_the_runtime_import_nothing_above_them():
    known = modules()
    found = []
    for name, path in known.items():
        banned = FORBIDDEN.get(room(name), set())
        found += [f"{path.relative_to(PACKAGE)}:{line} imports {target}"
                  for target, line in imports(name, path) if room(target) in banned]
    assert {"proto.errors", "runtime.rpc", "runtime.server", "server.main"} <= set(known)  # the scan sees the rooms
    assert not found, "a lower room imports a higher one: " + "; ".join(found)


def test_the_contract_opens_no_socket_thread_or_process():
    """Such a module is runtime: it goes to runtime/, where the roles share it."""
    found = []
    for name, path in modules().items():
        if room(name) != "proto":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            found += [f"{path.relative_to(PACKAGE)}:{node.lineno} imports {n}" for n in names
                      if n.split(".")[0] in RUNTIME_LIBRARIES]
    assert not found, "runtime code in the contract (move it to runtime/): " + "; ".join(found)


def test_no_role_imports_the_fault_lab():
    """chaos/ drives faults from outside; the hook the roles carry is runtime.faults."""
    known = modules()
    found = [f"{known[name].relative_to(PACKAGE)}" for name, targets in graph().items()
             if room(name) in {"server", "worker", "coordinator", "runtime", "proto"}
             and any(room(t) == "chaos" for t in targets)]
    assert not found, f"these import chaos/: {found}"


def _cycle(edges: dict[str, set[str]]) -> list[str]:
    """One cycle of ``edges`` (empty: none), by depth-first search."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return []

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_the_rooms_import_each_other_without_a_circle():
    rooms: dict[str, set[str]] = defaultdict(set)
    for name, targets in graph().items():
        rooms[room(name)] |= {room(t) for t in targets if room(t) != room(name)}
    assert not _cycle(rooms), f"rooms in a circle: {' -> '.join(_cycle(rooms))}"


def test_no_module_of_the_contract_or_the_runtime_is_in_a_circle():
    edges = {name: {t for t in targets if room(t) in ("proto", "runtime")}
             for name, targets in graph().items() if room(name) in ("proto", "runtime")}
    assert not _cycle(edges), f"modules in a circle: {' -> '.join(_cycle(edges))}"


def test_no_module_of_the_package_is_in_a_circle():
    """Not even inside a room: server/state.py and its update policies (server/modes.py) meet in
    server/steps.py's Protocols; worker/param_groups.py sees the optimizer as its GroupHost Protocol."""
    edges = graph()
    assert {"server.state", "server.modes", "server.steps", "worker.optimizer", "worker.param_groups"} <= set(edges)
    assert not _cycle(edges), f"modules in a circle: {' -> '.join(_cycle(edges))}"


def test_the_cycle_finder_finds_a_planted_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) == []
