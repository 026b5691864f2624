"""Every citation of the format notes must name a section that exists in ``docs/formats.md``.

Code and docs cite the format notes as ``formats.md §1.8`` (also ranges ``§1.12–§1.16``, which cite
every section between the two in the document's order, and lists ``§1.7, §1.10``) and name the golden
fixtures of §0.4 as ``F1``/``F2``. These tests keep those citations resolvable inside the repository:
a renumbered or deleted heading, or a typo in a citation, fails here with the file and line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from fixtures import REPO

ROOT = REPO
DOC = ROOT / "docs" / "formats.md"
SCAN_DIRS = ("obd", "frontends", "tests", "bench", "docs", "fixtures")
SCAN_FILES = ("README.md",)
SCAN_SUFFIXES = {".py", ".md", ".json", ".sh"}
#: This file spells out the patterns it looks for, so it is not scanned itself.
SELF = Path(__file__).resolve()

#: A numbered heading of docs/formats.md: "## 1. LSMT layer format", "### 1.8 RW layer in append mode".
HEADING = re.compile(r"^#{2,4}\s+(\d+(?:\.\d+)*)\.?\s+\S", re.MULTILINE)
SECTION = r"§\s*(\d+(?:\.\d+)*)"
#: The first section after the file name, then any number of ", §x" (list) or "–§x" (range) continuations.
CITATION = re.compile(
    r"formats\.md\s*" + SECTION + r"((?:\s*(?:,|[–—-])\s*" + SECTION + r")*)", re.IGNORECASE
)
CONTINUATION = re.compile(r"\s*(,|[–—-])\s*" + SECTION)
FIXTURE_CITATION = re.compile(r"formats\.md\s*(?:§\s*0\.4\s*)?(?:fixture\s+)?(F\d+)\b", re.IGNORECASE)
FIXTURE_DEFINITION = re.compile(r"\*\*(F\d+)\b")
#: The team-internal spec the citations used to point at; it is not part of the repository.
MISSING_SPEC = re.compile(r"FORMATS\.md")


@dataclass(frozen=True)
class Citation:
    """One cited section (ranges already expanded), with where it was cited."""

    section: str
    path: str
    line: int
    text: str


def _scanned_files() -> list[Path]:
    files = [ROOT / name for name in SCAN_FILES if (ROOT / name).is_file()]
    for top in SCAN_DIRS:
        base = ROOT / top
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            if path.suffix not in SCAN_SUFFIXES or not path.is_file() or "__pycache__" in path.parts:
                continue
            if path.resolve() != SELF:
                files.append(path)
    return files


@cache
def _texts() -> tuple[tuple[str, str], ...]:
    """(repository-relative path, text) of every scanned file."""
    return tuple(
        (str(path.relative_to(ROOT)), path.read_text(encoding="utf-8", errors="replace"))
        for path in _scanned_files()
    )


@cache
def headings() -> tuple[str, ...]:
    """Section numbers of docs/formats.md, in document order."""
    return tuple(HEADING.findall(DOC.read_text(encoding="utf-8")))


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _expand(first: str, last: str) -> list[str] | None:
    """Every heading from ``first`` to ``last`` in document order, or None if that is not a range."""
    order = headings()
    if first not in order or last not in order or order.index(first) > order.index(last):
        return None
    return list(order[order.index(first) : order.index(last) + 1])


def citations() -> list[Citation]:
    """Every section cited anywhere in the scanned files."""
    out: list[Citation] = []
    for path, text in _texts():
        for m in CITATION.finditer(text):
            line = _line_of(text, m.start())
            quoted = " ".join(m.group(0).split())
            previous = m.group(1)
            out.append(Citation(previous, path, line, quoted))
            for sep, section in CONTINUATION.findall(m.group(2)):
                if sep == ",":
                    out.append(Citation(section, path, line, quoted))
                else:
                    span = _expand(previous, section)
                    # an unresolvable range still cites both ends, so the failure names them
                    for s in span[1:] if span else [section]:
                        out.append(Citation(s, path, line, quoted))
                previous = section
    return out


def test_headings_are_unique_and_cover_sections_0_to_9() -> None:
    order = headings()
    assert len(order) == len(set(order)), f"duplicate section numbers in {DOC.name}"
    top = {h for h in order if "." not in h}
    assert {str(n) for n in range(10)} <= top, (
        f"missing top-level sections: {sorted(set(map(str, range(10))) - top)}"
    )


def test_citations_are_found() -> None:
    """The scanner itself works: the tree is full of citations, ranges included."""
    found = citations()
    assert len({c.path for c in found}) >= 10
    assert any(c.text.count("§") > 1 for c in found)


def test_cited_sections_exist() -> None:
    known = set(headings())
    missing = sorted(
        {f"{c.path}:{c.line}: §{c.section} ({c.text!r})" for c in citations() if c.section not in known}
    )
    assert not missing, f"citations of sections {DOC.relative_to(ROOT)} does not have:\n" + "\n".join(missing)


def test_cited_fixtures_exist() -> None:
    defined = set(FIXTURE_DEFINITION.findall(DOC.read_text(encoding="utf-8")))
    missing = sorted(
        {
            f"{path}:{_line_of(text, m.start())}: {m.group(1)}"
            for path, text in _texts()
            for m in FIXTURE_CITATION.finditer(text)
            if m.group(1) not in defined
        }
    )
    assert not missing, "citations of golden fixtures §0.4 does not define:\n" + "\n".join(missing)


def test_no_citation_of_missing_spec() -> None:
    """Nothing may cite the upper-case spec file, which is not in the repository; cite docs/formats.md.

    Expected to fail until every old citation has been rewritten to ``docs/formats.md §x``.
    """
    stale = [
        f"{path}:{_line_of(text, m.start())}" for path, text in _texts() for m in MISSING_SPEC.finditer(text)
    ]
    assert not stale, f"{len(stale)} citation(s) of a spec outside the repository:\n" + "\n".join(stale)
