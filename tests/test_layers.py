"""The layers point one way (scripts/ch09/__init__.py has the table): labs <- ch09.errors <- ch09.engine <- ch09.run
<- ch09.experiment (with ch09.selftest, ch09.benchmark) <- ch09.sweep <- the entry scripts. Every import in scripts/
is read (``ast``, imports inside functions too) and none may run back up a layer or into an entry script."""

from __future__ import annotations

import ast
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
LABS = sorted(p.stem for p in (SCRIPTS / "labs").glob("*.py"))
ENTRY_SCRIPTS = sorted(p.stem for p in SCRIPTS.glob("*.py"))
LAYERS = ["labs", "ch09.errors", "ch09.engine", "ch09.run", "ch09.experiment", "ch09.sweep", "entry"]
"""Bottom to top: a module may import its own layer and the ones to its left."""
EXPERIMENT_MODULES = ("ch09.experiment", "ch09.selftest", "ch09.benchmark", "ch09.probe")
"""The experiment layer: the experiment itself, and the three programs' cores that build or load its agents."""


def layer_of_module(name: str) -> str | None:
    """The layer of an importable module name; None for the standard library and third-party packages."""
    top = name.split(".")[0]
    if top in LABS:
        return "labs"
    if top in ENTRY_SCRIPTS:
        return "entry"
    if top != "ch09":
        return None
    if name == "ch09":
        return "ch09.errors"  # the package's __init__ holds only a docstring
    if name == "ch09.framestack_replay":
        return "ch09.engine"  # the alias older checkpoints name
    if any(name == module or name.startswith(module + ".") for module in EXPERIMENT_MODULES):
        return "ch09.experiment"
    layer = next((layer for layer in reversed(LAYERS) if name == layer or name.startswith(layer + ".")), None)
    assert layer is not None, f"{name} is in no layer: put it in one (and in scripts/ch09/__init__.py's table)"
    return layer


def layer_of_file(path: Path) -> str:
    relative = path.relative_to(SCRIPTS).with_suffix("")
    parts = [p for p in relative.parts if p != "__init__"]
    if parts[0] == "labs":
        return "labs"
    if len(parts) == 1:
        return "ch09.errors" if parts == ["ch09"] else "entry"
    return layer_of_module(".".join(parts)) or "entry"


def imported_names(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, wherever it stands."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append((node.lineno, node.module))
            # `from ch09.run import checkpoints` imports the submodule ch09.run.checkpoints
            names += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names if node.module == "ch09"
                      or node.module.startswith("ch09.") and node.module.count(".") == 1]
    return names


def violations() -> list[str]:
    found = []
    for path in sorted(SCRIPTS.rglob("*.py")):
        source_layer = layer_of_file(path)
        for line, name in imported_names(path):
            target_layer = layer_of_module(name)
            if target_layer is None:
                continue
            where = f"{path.relative_to(SCRIPTS.parent)}:{line} ({source_layer}) imports {name}"
            if target_layer == "entry":
                found.append(f"{where}: an entry script is a program, not a library")
            elif LAYERS.index(target_layer) > LAYERS.index(source_layer):
                found.append(f"{where} ({target_layer}): that runs back up the layers")
    return found


def test_imports_point_down_the_layers():
    assert violations() == []


def test_the_walk_sees_every_layer():
    """The rule above could pass by reading nothing: each layer has files, and the walk finds their imports."""
    files = {layer_of_file(p) for p in SCRIPTS.rglob("*.py")}
    assert files == set(LAYERS)
    assert ("ch09.engine" in {layer_of_module(n) for p in (SCRIPTS / "ch09" / "run").glob("*.py")
                              for _, n in imported_names(p)})
