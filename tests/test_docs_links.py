"""Every relative link in README.md and docs/*.md resolves: the file (or folder) exists inside
the repository, and a #anchor into a Markdown file names one of its headings, spelt as GitHub
spells anchors (lowercase, punctuation dropped, each space a hyphen, -1, -2 ... for repeats).
Links to other sites are not fetched; links inside code are not links."""
from __future__ import annotations

import pathlib
import re
import urllib.parse

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target "title") and ![alt](target); text may hold one level of brackets
_INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
_HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.I)
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def links(text: str) -> list[tuple[int, str]]:
    found = []
    for number, line in prose_lines(text):
        ref = _REFERENCE.match(line)
        if ref:
            found.append((number, ref.group(1)))
            continue
        for m in _INLINE.finditer(_CODE_SPAN.sub(lambda c: "x" * len(c.group(0)), line)):
            found.append((number, m.group(1)))
    return found


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text as rendered (link targets, emphasis and code
    marks dropped), lowercased, every character that is not a letter, digit, underscore, hyphen
    or space dropped, and each space made a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text)
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(text):
        out.update(_HTML_ANCHOR.findall(line))
        m = _HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(page: pathlib.Path) -> list[str]:
    problems = []
    for number, target in links(page.read_text(encoding="utf-8")):
        where = f"{page.relative_to(ROOT)}:{number}: {target}"
        if not target:
            problems.append(f"{where}: an empty link")
            continue
        if _SCHEME.match(target) or target.startswith("//"):
            continue   # another site, or mailto:
        path_part, _, anchor = target.partition("#")
        path = urllib.parse.unquote(path_part)
        dest = page if not path else (page.parent / path).resolve()
        try:
            dest.relative_to(ROOT)
        except ValueError:
            problems.append(f"{where}: points outside the repository")
            continue
        if not dest.exists():
            problems.append(f"{where}: no such file")
            continue
        if anchor and dest.suffix == ".md":
            known = anchors(dest.read_text(encoding="utf-8"))
            if urllib.parse.unquote(anchor).lower() not in known:
                problems.append(f"{where}: {dest.relative_to(ROOT)} has no heading for #{anchor}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    problems = broken_links(page)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_pages_are_found():
    assert (ROOT / "README.md") in PAGES and len(PAGES) > 1


@pytest.mark.parametrize("heading, slug", [
    ("Engine speed", "engine-speed"),
    ("Soak: faults under load", "soak-faults-under-load"),
    ("SLOs, metrics and drift", "slos-metrics-and-drift"),
    ("Search (`whole.py`, `search.py`)", "search-wholepy-searchpy"),
    ("Watching: drift (`server/plan_monitor.py`)", "watching-drift-serverplan_monitorpy"),
    ("A [linked](x.md) *word*", "a-linked-word"),
    ("a - b", "a---b"),
])
def test_github_slug(heading, slug):
    assert github_slug(heading) == slug


def test_repeated_headings_are_numbered_and_code_is_not_a_link():
    text = "# Notes\n## Notes\n```\n[not a link](missing.md)\n```\nsee `[code](missing.md)`\n"
    assert anchors(text) == {"notes", "notes-1"}
    assert links(text) == []


def test_a_broken_link_and_anchor_are_reported(tmp_path, monkeypatch):
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md#title) [gone](docs/b.md) [bad](docs/a.md#nope) "
                    "[out](../elsewhere.md) [web](https://example.com/x#y)\n")
    problems = broken_links(page)
    assert len(problems) == 3, problems
    assert "no such file" in problems[0] and "#nope" in problems[1] and "outside" in problems[2]
