"""ARCHITECTURE.md names every module: a new module without a line there fails here."""

from pathlib import Path

import pytest

from tests.conftest import ROOT

MODULES = sorted(
    p.relative_to(ROOT).as_posix()
    for folder in ("crackio", "train", "tools")
    for p in (ROOT / folder).glob("*.py")
    if p.name != "__init__.py"
)


@pytest.mark.parametrize("module", MODULES)
def test_architecture_names_every_module(module):
    assert f"`{module}`" in (Path(ROOT) / "ARCHITECTURE.md").read_text(), f"add a line for {module} to ARCHITECTURE.md"
