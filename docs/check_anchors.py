"""Checks a built HTML documentation tree offline: every internal link reaches an existing page
and anchor, and no page loads a script or stylesheet from the network.

    python docs/check_anchors.py docs/_build/html

Exits 1 and names each broken ``page -> target#anchor`` (and each remote asset) otherwise.
``make docs`` runs it after ``sphinx-build``.
"""
from __future__ import annotations

import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Dict, List, Set, Tuple
from urllib.parse import unquote, urlsplit


class _Page(HTMLParser):
    """The ids a page defines, the links it makes and the assets it loads."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: Set[str] = set()
        self.links: List[str] = []
        self.assets: List[str] = []

    def handle_starttag(self, tag: str, attrs: List[Tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for key in ("id", "name") if tag == "a" else ("id",):
            if a.get(key):
                self.ids.add(str(a[key]))
        if tag == "a" and a.get("href"):
            self.links.append(str(a["href"]))
        if tag == "script" and a.get("src"):
            self.assets.append(str(a["src"]))
        if tag == "link" and a.get("rel") == "stylesheet" and a.get("href"):
            self.assets.append(str(a["href"]))


def check(root: Path) -> List[str]:
    """Every problem found under the HTML tree ``root``, one line each (empty: all good)."""
    pages: Dict[Path, _Page] = {}
    for path in sorted(root.rglob("*.html")):
        page = _Page()
        page.feed(path.read_text(encoding="utf-8"))
        pages[path.resolve()] = page
    problems = []
    for path, page in pages.items():
        rel = path.relative_to(root.resolve())
        for src in page.assets:
            if urlsplit(src).scheme or src.startswith("//"):
                problems.append(f"{rel}: loads {src} from the network")
        for href in page.links:
            url = urlsplit(href)
            if url.scheme or href.startswith("//"):
                continue  # external: not checked (no network)
            target = (path.parent / unquote(url.path)).resolve() if url.path else path
            if target.suffix != ".html":
                if not target.exists():
                    problems.append(f"{rel}: link to missing file {href}")
                continue
            if target not in pages:
                problems.append(f"{rel}: link to missing page {href}")
            elif url.fragment and unquote(url.fragment) not in pages[target].ids:
                problems.append(f"{rel}: link to missing anchor {href}")
    return problems


def main(argv: List[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python docs/check_anchors.py BUILT_HTML_DIR", file=sys.stderr)
        return 2
    problems = check(Path(argv[0]))
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        print(f"{len(problems)} broken internal link(s) or remote asset(s) in {argv[0]}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
