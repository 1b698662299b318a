"""The checks ``make docs`` makes: the offline check of the built documentation
(docs/check_anchors.py) and the check that every exported name is documented (docs/conf.py)."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_anchors", ROOT / "docs" / "check_anchors.py")
check_anchors = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_anchors)


@pytest.fixture
def site(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "_static").mkdir()
    (tmp_path / "_static" / "mathjax.js").write_text("")
    (tmp_path / "index.html").write_text(
        '<html><head><script src="_static/mathjax.js"></script></head><body>'
        '<a href="sub/api.html#mod.f">f</a> <a href="#top">top</a> <span id="top"></span>'
        '<a href="https://example.org/x#y">external</a> <a href="_static/mathjax.js">js</a></body></html>')
    (tmp_path / "sub" / "api.html").write_text('<dt id="mod.f">f</dt><a href="../index.html">home</a>')
    return tmp_path


def test_clean_site_passes(site):
    assert check_anchors.check(site) == []
    assert check_anchors.main([str(site)]) == 0


def test_missing_anchor_page_file_and_remote_asset(site):
    (site / "sub" / "api.html").write_text(
        '<dt id="mod.g">g</dt><a href="../index.html#nowhere">x</a> <a href="gone.html">y</a> '
        '<a href="../_static/gone.png">z</a> <script src="https://cdn.example.org/mathjax.js"></script>')
    problems = check_anchors.check(site)
    assert any("index.html: link to missing anchor sub/api.html#mod.f" in p for p in problems)
    assert any("link to missing anchor ../index.html#nowhere" in p for p in problems)
    assert any("link to missing page gone.html" in p for p in problems)
    assert any("link to missing file ../_static/gone.png" in p for p in problems)
    assert any("loads https://cdn.example.org/mathjax.js from the network" in p for p in problems)
    assert check_anchors.main([str(site)]) == 1


def _conf():
    spec = importlib.util.spec_from_file_location("docs_conf", ROOT / "docs" / "conf.py")
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    return conf


def test_exports_of_both_libraries_must_be_documented(monkeypatch):
    """``make docs`` fails on an exported name of either library that nothing documents."""
    conf = _conf()
    assert {"lookahead_opt", "pipeline_rt"} <= set(conf.EXPORTS_CHECKED)
    targets = {t for pkg in conf.EXPORTS_CHECKED for _, t in conf._exports(pkg)}
    assert {"pipeline_rt.pipeline.Pipeline", "pipeline_rt.methods.METHODS",
            "lookahead_opt.optimizer.PredictiveOptimizer"} <= targets

    def warnings(documented):
        warned = []
        monkeypatch.setattr(conf, "logger", SimpleNamespace(warning=warned.append))
        conf._check_exports(None, SimpleNamespace(get_domain=lambda name: SimpleNamespace(objects=documented)))
        return warned

    assert warnings(dict.fromkeys(targets)) == []
    (missing,) = warnings(dict.fromkeys(targets - {"pipeline_rt.methods.METHODS"}))
    assert missing.startswith("pipeline_rt.METHODS is exported but not documented")


# ----------------------------------------------------------------------------- generated, not copied

def _options(text: str) -> set:
    """Every ``--option`` named in ``text``."""
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text))


def _parser_options() -> set:
    conf = _conf()
    return {o for a in conf.compare_parser()._actions for o in a.option_strings if o.startswith("--")} - {"--help"}


def test_quickstart_option_list_is_the_parsers():
    """docs/quickstart.rst's option list is generated from the parser (every option, its argument
    and help as ``--help`` shows them) and its method list from ``METHODS``; nothing copied by hand."""
    from pipeline_rt import METHODS
    from pipeoptim_compare.cli import build_parser

    conf = _conf()
    page = (ROOT / "docs" / "quickstart.rst").read_text(encoding="utf-8")
    assert ".. pipeoptim-compare-options::" in page and ".. pipeline-methods::" in page
    source = [page]
    conf._generated_text(None, "quickstart", source)
    rendered = source[0]
    assert ".. pipeoptim-compare-options::" not in rendered and ".. pipeline-methods::" not in rendered
    generated = conf.compare_options()
    listed = re.findall(r"^``(.*)``\n   (.*)$", generated, re.M)
    parser = conf.compare_parser()
    fmt = parser._get_formatter()
    want = [(fmt._format_action_invocation(a), fmt._expand_help(a)) for a in parser._actions
            if "--help" not in a.option_strings]
    assert [(inv, re.sub(r"\\(.)", r"\1", help)) for inv, help in listed] == want  # rst escapes undone
    assert {o for inv, _ in listed for o in _options(inv)} == _parser_options()
    assert conf.method_names() == ", ".join(f"``{m}``" for m in METHODS) + "\n"
    # the page names no option the parser lacks (hand-written text around the generated list)
    assert _options(page) <= _parser_options() | {"--help"}, _options(page) - _parser_options()
    assert build_parser().prog == "pipeoptim"


def test_quickstart_lists_every_built_in_task():
    from pipeoptim_compare.tasks import TASKS

    page = (ROOT / "docs" / "quickstart.rst").read_text(encoding="utf-8")
    section = page.split("Built-in tasks\n--------------\n")[1].split("\n----")[0]
    listed = re.findall(r"^``(\w+)``$", section, re.M)
    assert sorted(listed) == sorted(t for t in TASKS if not t.startswith("_"))
    assert not re.search(r"\b(All|all) (two|three|four|five)\b", section)  # no count to go stale


def test_readme_names_only_real_options_and_tasks():
    from pipeoptim_compare.tasks import TASKS

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    compare_text = readme.split("## Two commands")[1].split("\n## ")[0]
    assert _options(compare_text) <= _parser_options() | {"--help"}, _options(compare_text) - _parser_options()
    named = re.search(r"\(`--task`, one of ([^)]*)\)", compare_text)
    assert named is not None
    assert set(re.findall(r"`(\w+)`", named.group(1))) == {t for t in TASKS if not t.startswith("_")}


def test_generated_pages_are_read_again_every_build(tmp_path):
    conf = _conf()
    (tmp_path / "a.rst").write_text("x\n\n.. pipeline-methods::\n")
    (tmp_path / "b.rst").write_text("y\n")
    env = SimpleNamespace(found_docs={"a", "b"}, doc2path=lambda d: tmp_path / f"{d}.rst")
    assert conf._always_reread(None, env, set(), set(), set()) == ["a"]
