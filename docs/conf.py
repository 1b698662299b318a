"""Sphinx configuration (no extensions beyond Sphinx itself; builds offline with -W)."""
from __future__ import annotations

import os
import pkgutil
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

project = "pipeoptim"
author = "pipeoptim contributors"
copyright = "2025, pipeoptim contributors"
release = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
# modules whose import needs hardware or processes are still documented from their source
autodoc_mock_imports: list = []
suppress_warnings = ["ref.python"]  # re-exported names resolve ambiguously (pipeline_rt.X vs its module)
nitpicky = False

html_theme = "alabaster"
html_static_path = ["_static"]
html_theme_options = {"description": "asynchronous pipeline training with weight prediction"}
exclude_patterns = ["_build"]

PACKAGES = ("lookahead_opt", "pipeline_rt")
SKIP = {"pipeline_rt.__main__"}


def _modules() -> list:
    """Every module of the two packages, found on disk (new modules appear automatically)."""
    out = []
    for pkg in PACKAGES:
        out.append(pkg)
        path = [os.path.join(ROOT, *pkg.split("."))]
        for info in pkgutil.walk_packages(path, prefix=pkg + "."):
            if info.name not in SKIP and not info.name.split(".")[-1].startswith("_"):
                out.append(info.name)
    return out


def _api_page(app, docname, source):
    """Replace the ``.. automodules::`` marker of api.rst with one section per module."""
    if docname != "api" or ".. automodules::" not in source[0]:
        return
    parts = []
    for mod in _modules():
        title = f"``{mod}``"
        opts = "   :no-members:\n" if mod in PACKAGES else ""
        parts.append(f"{title}\n{'-' * len(title)}\n\n.. automodule:: {mod}\n{opts}\n")
    source[0] = source[0].replace(".. automodules::", "\n".join(parts))


def setup(app):
    app.connect("source-read", _api_page)
