"""Every relative link in README.md and docs/*.md points to a file that exists, and every
``#anchor`` into a Markdown file names one of its headings (GitHub's heading ids).

docs/cli.md is generated from the code by another change; until it exists, links to it are
allowed and it is not checked itself.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "docs" / "cli.md"

FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target); the target ends at whitespace or ")" (an optional "title" is ignored).
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def doc_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [f for f in files if f.exists() and not (f == GENERATED)]


def _strip_code(text: str) -> str:
    return CODE_SPAN.sub("", FENCE.sub("", text))


def links(text: str) -> list[str]:
    return LINK.findall(_strip_code(text))


def anchors(text: str) -> set[str]:
    """GitHub's heading ids: lowercase, punctuation dropped (except - and _), spaces to hyphens,
    repeats numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    for title in HEADING.findall(FENCE.sub("", text)):
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link in a heading keeps its text
        slug = re.sub(r"[^\w\- ]", "", title.replace("`", "").lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(md: Path) -> list[str]:
    problems = []
    for target in links(md.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...
            continue
        path_part, _, fragment = target.partition("#")
        dest = (md.parent / path_part).resolve() if path_part else md
        if dest == GENERATED and not dest.exists():
            continue
        if not dest.exists():
            problems.append(f"{target}: no such file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
            continue
        if fragment and dest.suffix == ".md" and fragment not in anchors(dest.read_text(encoding="utf-8")):
            problems.append(f"{target}: no heading #{fragment} in {dest.relative_to(ROOT)}")
    return problems


@pytest.mark.parametrize("md", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(md: Path) -> None:
    assert broken_links(md) == []


def test_the_checker_sees_links() -> None:
    text = "[a](docs/x.md) ![b](img.png) `[c](not/a/link)`\n```\n[d](nor/this)\n```\n[e](https://x.org)"
    assert links(text) == ["docs/x.md", "img.png", "https://x.org"]
    assert anchors("# Quick start\n## `--prune-mlp auto`\n## Quick start\n") == {
        "quick-start", "--prune-mlp-auto", "quick-start-1"}


def test_readme_links_every_docs_page() -> None:
    readme = {(ROOT / t.partition("#")[0]).resolve() for t in links((ROOT / "README.md").read_text(encoding="utf-8"))}
    missing = [str(p.relative_to(ROOT)) for p in doc_files() if p.parent.name == "docs" and p.resolve() not in readme]
    assert missing == []
