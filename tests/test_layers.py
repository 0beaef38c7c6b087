"""The package's import order: core <- io <- data <- train / eval <- cli / demo. Every import statement in
cst/ (at module level or inside a function: a lazy import is still a dependency) is parsed with ast and
resolved to the module it names; no module may import a higher layer or a sibling layer (train and eval
do not import each other), and the module graph has no cycle. Valid for the flat modules and for the
layered tree (cst/core, cst/io, ...), where each module's directory must also be its layer."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "cst"

LAYERS = ("core", "io", "data", "train", "eval", "app")
RANK = {"core": 0, "io": 1, "data": 2, "train": 3, "eval": 3, "app": 4}
# The layer of each module by its flat name (cst.X) or, in the layered tree, by its subpackage (cst.core.X).
FLAT = {
    "core": {"_core", "config", "model", "ops", "lora", "optim", "losses", "schedule", "generate", "runtime",
             "errors", "atomic", "seeds", "shared_prompt"},
    "io": {"io", "gguf", "hf", "tokenizer"},
    "data": {"data", "prompts"},
    "train": {"trainer", "training_config"},
    "eval": {"eval", "judges", "metrics", "plots", "synth"},
    "app": {"cst", "__main__", "cli", "demo", "_aliases"},
}


def _modules():
    """{dotted name: path} of every module under cst/ (a package is its __init__.py)."""
    out = {"cst._core": None}  # the C extension
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def layer_of(name):
    parts = name.split(".")
    if len(parts) >= 2 and parts[1] in LAYERS and parts[1] != "app":
        return parts[1]  # cst.core.model, cst.io (the package itself), cst.eval.judges, ...
    if len(parts) >= 2 and parts[1] == "cli":
        return "app"
    short = parts[1] if len(parts) >= 2 else parts[0]
    for layer, names in FLAT.items():
        if short in names:
            return layer
    raise AssertionError(f"{name}: no layer assigned (add it to tests/test_layers.py FLAT)")


def _imports(name, path, modules):
    """The cst modules that `name` (file `path`) imports, with the line of each import."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "cst"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "cst":
                target = node.module
            else:
                continue
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
            found += [(s, node.lineno) for s in subs]
            if len(subs) < len(node.names):  # names taken from the module itself
                found.append((target, node.lineno))
    out = []
    for target, line in found:
        while target not in modules and "." in target:  # cst.trainer.Trainer -> cst.trainer
            target = target.rpartition(".")[0]
        assert target in modules, f"{path}:{line} imports {target}, which is not a cst module"
        out.append((target, line))
    return out


def _graph():
    modules = _modules()
    return modules, {n: _imports(n, p, modules) for n, p in modules.items() if p is not None}


def test_every_module_has_a_layer_and_sits_in_its_directory():
    modules, _ = _graph()
    for name, path in modules.items():
        layer = layer_of(name)
        parts = name.split(".")
        if len(parts) >= 3:  # in a subpackage: the directory is the layer (cli and demo: the app layer)
            assert parts[1] == layer or (layer == "app" and parts[1] == "cli"), (name, layer)


def test_no_upward_or_sideways_import():
    modules, graph = _graph()
    bad = []
    for name, imports in graph.items():
        a = layer_of(name)
        for target, line in imports:
            b = layer_of(target)
            if a != b and (RANK[b] >= RANK[a]):
                bad.append(f"{modules[name].relative_to(PKG.parent)}:{line}: {name} ({a}) imports {target} ({b})")
    assert not bad, "imports against the layer order core <- io <- data <- train / eval <- cli / demo:\n" + \
        "\n".join(bad)


def test_no_import_cycle():
    _, graph = _graph()
    edges = {n: sorted({t for t, _ in imps if t != n}) for n, imps in graph.items()}
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for t in edges.get(n, ()):
            if state.get(t) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[n] = "done"

    for n in sorted(edges):
        if n not in state:
            visit(n)


def test_the_checker_sees_a_violation(tmp_path):
    """The rules above can fail: an upward import in a core module is reported."""
    src = tmp_path / "cst"
    src.mkdir()
    (src / "model.py").write_text("def save():\n    from .io import save\n")
    (src / "io.py").write_text("from . import model\n")
    modules = {"cst.model": src / "model.py", "cst.io": src / "io.py"}
    imports = _imports("cst.model", src / "model.py", modules)
    assert imports == [("cst.io", 2)] and RANK[layer_of("cst.io")] > RANK[layer_of("cst.model")]
