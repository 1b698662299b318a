"""Sphinx configuration (Sphinx and a bundled MathJax only; builds and renders offline with -W)."""
from __future__ import annotations

import argparse
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


#: a marker line in a page, replaced by the text its function generates from the code (the
#: parser, the method table), so that what the docs list cannot drift from what the code takes
GENERATED = {}


def generated(marker: str):
    """Register ``fn() -> rst`` as the text that replaces the line ``.. <marker>::``."""
    def deco(fn):
        GENERATED[f".. {marker}::"] = fn
        return fn
    return deco


_RST_SPECIAL = re.compile(r"([\\*`|_-])")


def _rst_text(text: str) -> str:
    """Plain text (a help string) with rst's markup characters escaped (and hyphens, so that
    ``--entry`` is not made a dash)."""
    return _RST_SPECIAL.sub(r"\\\1", text)


def compare_parser() -> argparse.ArgumentParser:
    """The parser of ``pipeoptim compare`` (the subcommand of the CLI's parser)."""
    from pipeoptim_compare.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["compare"]


@generated("pipeoptim-compare-options")
def compare_options() -> str:
    """Every option of ``pipeoptim compare`` as a definition list: the invocation (option
    strings and argument, as ``--help`` shows them) and the help text, from the parser."""
    parser = compare_parser()
    fmt = parser._get_formatter()
    items = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        invocation = fmt._format_action_invocation(action)
        items.append(f"``{invocation}``\n   {_rst_text(fmt._expand_help(action))}\n")
    return "\n".join(items)


@generated("pipeline-methods")
def method_names() -> str:
    """``pipeline_rt.METHODS``, every name in a comma-separated line of literals."""
    from pipeline_rt import METHODS

    return ", ".join(f"``{m}``" for m in METHODS) + "\n"


def _generated_text(app, docname, source):
    """Replace every :data:`GENERATED` marker line of a page with its generated text."""
    for marker, fn in GENERATED.items():
        if marker in source[0]:
            source[0] = source[0].replace(marker, fn())


def _always_reread(app, env, added, changed, removed):
    """Pages with a :data:`GENERATED` marker are read again on every build: the code they are
    generated from may have changed while the page did not."""
    return [doc for doc in env.found_docs - set(removed)
            if any(m in open(env.doc2path(doc), encoding="utf-8").read() for m in GENERATED)]


def setup(app):
    app.connect("source-read", _api_page)
    app.connect("source-read", _generated_text)
    app.connect("env-get-outdated", _always_reread)
    app.connect("env-check-consistency", _check_exports)
