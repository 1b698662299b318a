"""Replace (or add) one marked section of ``benchmarks/RESULTS.md``, leaving the rest alone."""
from __future__ import annotations

import os
import platform
import re
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

HEADER = "# Benchmark results\n\nNumbers measured by the scripts in `benchmarks/`.\n"


def device_line(device: str) -> str:
    """What ran it: the CPU (and thread count) or the CUDA device's name."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(torch.device(device))}, torch {torch.__version__}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}; "
            f"load average {load:.1f} at the end (other jobs share the cores when it exceeds 1)")


def provenance(device: str) -> str:
    """Command, date and device, as markdown lines."""
    cmd = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    return (f"* command: `{cmd}`\n* date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n"
            f"* device: {device_line(device)}\n")


def write_section(path: Path, key: str, text: str) -> None:
    """Put ``text`` between ``<!-- BEGIN key -->`` and ``<!-- END key -->`` in ``path``."""
    begin, end = f"<!-- BEGIN {key} -->", f"<!-- END {key} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = path.read_text(encoding="utf-8") if path.exists() else HEADER
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + block
    path.write_text(new, encoding="utf-8")


def append_section(path: Path, text: str) -> None:
    """Append ``text`` as a new section of ``path`` (created with the header if absent)."""
    if not path.exists():
        path.write_text(HEADER, encoding="utf-8")
    with path.open("a", encoding="utf-8") as f:
        f.write("\n" + text)
