"""Every ```python block of README.md runs as written: each in a fresh interpreter, in an empty
folder, with nothing defined beforehand."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks(text: str):
    """``(line number, source)`` of every ```python block of ``text``."""
    return [(text[:m.start()].count("\n") + 1, m.group(1)) for m in FENCE.finditer(text)]


def test_blocks_are_found():
    found = blocks("x\n```python\na = 1\n```\n```bash\nls\n```\n```python\nb = 2\n```\n")
    assert found == [(2, "a = 1\n"), (8, "b = 2\n")]
    assert len(blocks(README.read_text(encoding="utf-8"))) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("line,source", blocks(README.read_text(encoding="utf-8")),
                         ids=lambda v: f"line{v}" if isinstance(v, int) else "")
def test_readme_block_runs(line, source, tmp_path):
    r = subprocess.run([sys.executable, "-c", source], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path),
                            "PYTHONPATH": str(README.parent)})
    assert r.returncode == 0, f"README.md block at line {line} failed:\n{r.stderr[-3000:]}"
