"""Fixtures shared by the test modules (pytest finds them here without an import)."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Callable, Iterator, List

import pytest
import torch


@pytest.fixture
def float64() -> Iterator[None]:
    """``torch.float64`` as the default dtype for the test (restored after). Modules that want it
    for every test say ``pytestmark = pytest.mark.usefixtures("float64")``."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str, str], Path]]:
    """``user_module(name, source)`` writes ``source`` (dedented) as ``tmp_path/name.py``,
    importable by ``name`` during the test, as a user's own module would be; forgotten after."""
    names: List[str] = []

    def write(name: str, source: str) -> Path:
        path = tmp_path / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        monkeypatch.syspath_prepend(str(tmp_path))
        sys.modules.pop(name, None)
        names.append(name)
        return path

    yield write
    for name in names:
        sys.modules.pop(name, None)
