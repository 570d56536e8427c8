"""The README stays short and keeps CI's test command; every relative link in README.md and
docs/*.md points at a file that exists (and, for a #anchor into a Markdown file, at a heading)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Pages other branches are adding; a link to one is checked as soon as it exists.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def links(text: str) -> list[str]:
    """Targets of the Markdown links and images in ``text``, code blocks left out."""
    return LINK.findall(FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    s = re.sub(r"[`*_]", "", heading.strip().lower())
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {slug(m) for m in re.findall(r"^#{1,6}\s+(.*)$", text, re.M)}


def broken(page: Path) -> list[str]:
    """The links of ``page`` that do not resolve, as 'target (why)'."""
    out = []
    for target in links(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            out.append(f"{target} (no such file)")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            out.append(f"{target} (no heading #{anchor})")
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_resolve(page):
    assert broken(page) == []


def test_link_checker_finds_broken_links(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(
        "# Top\n[ok](p.md#top) [gone](nothere.md) [bad](p.md#nowhere)\n"
        "```\n[in code](skipped.md)\n```\n[web](https://example.com)\n",
        encoding="utf-8",
    )
    assert broken(page) == ["nothere.md (no such file)", "p.md#nowhere (no heading #nowhere)"]


def test_readme_is_short_and_keeps_the_ci_command():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    command = "./setup.sh && .venv/bin/python -m pytest -q"
    assert any(line.strip() == command for block in FENCE.findall(text) for line in block.splitlines())
    assert (ROOT / ".ci" / "run").read_text().splitlines()[-1] == command
