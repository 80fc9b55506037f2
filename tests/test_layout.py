"""The file layout: imports only go down. Entry scripts import library modules, never each other
(one declared exception); library modules never import an entry script; no cycles, lazy
imports inside functions included.

    python tests/test_layout.py      # prints the import graph, lowest layer first
"""
import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = ("train_ladd", "train_teacher", "sample", "inpaint", "edit", "evaluate", "bench")
# bench's `ladd` case times the training script's own step functions, in a child process
MEASURES = {("bench", "train_ladd")}


def modules():
    return sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))


def imports(name):
    """Project modules that `name` imports anywhere in its file (top level or inside functions)."""
    with open(os.path.join(ROOT, name + ".py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return sorted(found & set(modules()) - {name})


def graph():
    return {m: imports(m) for m in modules()}


def layers(g):
    """Modules by depth: layer 0 imports no project module, layer k only lower layers.
    Raises ValueError on a cycle."""
    placed, out = set(), []
    while len(placed) < len(g):
        layer = sorted(m for m in g if m not in placed and set(g[m]) <= placed)
        if not layer:
            raise ValueError(f"import cycle among {sorted(set(g) - placed)}")
        out.append(layer)
        placed |= set(layer)
    return out


def test_no_import_cycles():
    assert layers(graph())


def test_library_modules_import_no_entry_script():
    g = graph()
    bad = {m: [d for d in deps if d in ENTRY] for m, deps in g.items() if m not in ENTRY}
    assert not any(bad.values()), bad


def test_entry_scripts_import_no_other_entry_script():
    g = graph()
    bad = [(m, d) for m in ENTRY for d in g[m] if d in ENTRY and (m, d) not in MEASURES]
    assert not bad, bad


def test_the_checks_can_fail():
    with_cycle = {"a": ["b"], "b": ["a"], "c": []}
    try:
        layers(with_cycle)
    except ValueError as e:
        assert "['a', 'b']" in str(e)
    else:
        raise AssertionError("a cycle was not found")
    assert layers({"a": [], "b": ["a"], "c": ["a", "b"]}) == [["a"], ["b"], ["c"]]


if __name__ == "__main__":
    g = graph()
    for k, layer in enumerate(layers(g)):
        for m in layer:
            kind = "entry" if m in ENTRY else "lib"
            print(f"{k} {kind:5} {m:16} <- {', '.join(g[m]) or '-'}")
    sys.exit(0)
