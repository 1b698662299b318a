"""The checks ``make docs`` makes: the offline check of the built documentation
(docs/check_anchors.py) and the check that every exported name is documented (docs/conf.py)."""
from __future__ import annotations

import importlib.util
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
