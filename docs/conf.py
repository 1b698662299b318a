"""Sphinx configuration (Sphinx and a bundled MathJax only; builds and renders offline with -W)."""
from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import sys

from sphinx.util import logging

logger = logging.getLogger(__name__)

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
    "sphinx-mathjax-offline",  # copies MathJax into _static: the math renders without a network
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
# a name re-exported by a package links to its source from its own module's entry only (following
# the import made viewcode point the source back at the package's anchor, which does not exist)
viewcode_follow_imported_members = False

html_theme = "alabaster"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {"description": "asynchronous pipeline training with weight prediction"}
exclude_patterns = ["_build"]

PACKAGES = ("lookahead_opt", "pipeline_rt", "pipeoptim_compare")
SKIP = {"pipeoptim_compare.__main__"}


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


#: packages whose every exported name (``__all__``) must be documented: the build fails otherwise
EXPORTS_CHECKED = ("lookahead_opt", "pipeline_rt")


def _exports(pkg: str) -> list:
    """``(name, documented target)`` of every name in ``pkg.__all__``: a class, function or
    module by its own module and qualified name, anything else by the submodule defining it."""
    package = importlib.import_module(pkg)
    out = []
    for name in getattr(package, "__all__", ()):
        obj = getattr(package, name)
        if inspect.ismodule(obj):
            target = obj.__name__
        elif getattr(obj, "__module__", None) and getattr(obj, "__qualname__", None):
            target = f"{obj.__module__}.{obj.__qualname__}"
        else:
            assigned = re.compile(rf"^{name}\s*[:=]", re.M)  # where it is defined, not imported
            home = next((m for m in _modules() if m != pkg and m in sys.modules
                         and assigned.search(inspect.getsource(sys.modules[m]))), pkg)
            target = f"{home}.{name}"
        out.append((name, target))
    return out


def _api_page(app, docname, source):
    """Replace the ``.. automodules::`` marker of api.rst with one section per module; each
    package's section lists its exported names, linked to where they are documented."""
    if docname != "api" or ".. automodules::" not in source[0]:
        return
    parts = []
    for mod in _modules():
        title = f"``{mod}``"
        opts = "   :no-members:\n" if mod in PACKAGES else ""
        parts.append(f"{title}\n{'-' * len(title)}\n\n.. automodule:: {mod}\n{opts}\n")
        exports = _exports(mod) if mod in PACKAGES else []
        if exports:
            links = ", ".join(f":py:obj:`{name} <{target}>`" for name, target in exports)
            parts.append(f"Exported (``from {mod} import ...``): {links}.\n")
    source[0] = source[0].replace(".. automodules::", "\n".join(parts))


def _check_exports(app, env):
    """A warning (an error under ``-W``) for every exported name of :data:`EXPORTS_CHECKED`
    that no docstring documents."""
    documented = env.get_domain("py").objects
    for pkg in EXPORTS_CHECKED:
        for name, target in _exports(pkg):
            if target not in documented:
                logger.warning(f"{pkg}.{name} is exported but not documented: {target} needs a docstring "
                               "(or a '#:' comment above it)")


def setup(app):
    app.connect("source-read", _api_page)
    app.connect("env-check-consistency", _check_exports)
