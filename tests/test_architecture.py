"""The house plan, checked from the imports: which side of the shard format a module is on, no cycles, light
imports where they matter, and an ARCHITECTURE.md that names exactly the modules that exist."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("crackio", "train", "tools")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports(path: Path) -> set[str]:
    """Every project module `path` imports, at any depth of the file (function-level imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in MODULES}
    return found


GRAPH = {name: imports(path) for name, path in MODULES.items()}


def side(name: str) -> str:
    return ".".join(name.split(".")[:2])


@pytest.mark.parametrize(
    "importer, forbidden",
    [
        ("crackio.loading", ("crackio.writing",)),  # the loading side never imports the writing side
        ("crackio.format", ("crackio.writing", "crackio.loading", "crackio.storage")),  # the contract: on no side
        ("crackio.storage", ("crackio.writing", "crackio.loading")),  # where packs live: below both sides
        ("crackio.writing", ("crackio.loading",)),
        ("crackio", ("train", "tools")),  # the library never imports the trainer or the tools
        # train/, floor by floor: settings (light, no torch) < evaluation < run < the commands built on a run
        # (detection, svm, sweep) < cli; each command's package stands alone.
        (
            "train.settings",
            ("train.evaluation", "train.run", "train.detection", "train.svm", "train.sweep", "train.cli"),
        ),
        ("train.evaluation", ("train.run", "train.detection", "train.svm", "train.sweep", "train.cli")),
        ("train.run", ("train.detection", "train.svm", "train.sweep", "train.cli")),
        ("train.detection", ("train.svm", "train.sweep", "train.cli")),
        ("train.svm", ("train.detection", "train.sweep", "train.cli")),
        ("train.sweep", ("train.detection", "train.svm", "train.cli")),
    ],
)
def test_imports_go_one_way(importer, forbidden):
    wrong = [
        f"{a} imports {b}"
        for a, targets in GRAPH.items()
        if a == importer or a.startswith(importer + ".")
        for b in targets
        if any(b == f or b.startswith(f + ".") for f in forbidden)
    ]
    assert not wrong


def test_no_import_cycles():
    """Depth-first search over module imports (a package's __init__ counts as its own module)."""
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH.get(node, ())):
            if nxt == node or nxt == node.rpartition(".")[0]:
                continue  # a module importing its own package's __init__ is no cycle between modules
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles


def test_the_writing_side_and_the_command_lines_import_no_torch():
    code = (
        "import sys\n"
        "import crackio, crackio.writing.pack, crackio.writing.proposal_stage, crackio.format.verify\n"
        "import train.__main__, train.cli.commands, train.settings.run, train.settings.commands\n"
        "heavy = sorted(m for m in ('torch', 'torchvision', 'cv2', 'sklearn', 'matplotlib') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_architecture_md_names_exactly_the_modules_that_exist():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"`((?:crackio|train|tools)/[\w/]+\.py)`", text))
    files = {p.relative_to(ROOT).as_posix() for p in MODULES.values() if p.name != "__init__.py"}
    assert not files - named, "modules without a line in ARCHITECTURE.md"
    assert not named - files, "ARCHITECTURE.md names modules that do not exist"
