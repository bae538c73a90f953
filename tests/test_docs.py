"""The repository stands alone: every document a tracked file cites is in it, and every section a
citation names (``docs/math.md, "Losses"``) is a heading of that document."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = (".py", ".md", ".toml", ".sh")

#: a document named in text: a relative path ending in .md, not part of a URL or a longer path
DOC = re.compile(r"(?<![\w/.:-])((?:[\w.-]+/)*[\w-][\w.-]*\.md)\b")
#: a citation of a section: the document, then (after a comma, colon or "'s") a quoted heading
SECTION = re.compile(DOC.pattern[:-2] + r"(?:'s)?\)?[,:]?\s+(?:end of\s+)?\(?\\?\"([^\"\\]{1,80})\\?\"")


def repo_files() -> list[str]:
    """Every file git knows here (tracked, or new and not ignored), relative to the root."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [line for line in out.splitlines() if (ROOT / line).is_file()]


def joined(text: str) -> str:
    """The text with each line break and the comment marker that continues a line (``#``, ``#:``)
    read as one space, so that a citation wrapped over two lines reads as one."""
    return re.sub(r"[ \t]*\n[ \t]*(?:#+:?[ \t]*)?", " ", text)


def resolve(doc: str, cited_in: Path, known: set[Path]) -> Path | None:
    """The document a citation means: relative to the citing file, to the repository root, or to docs/."""
    for base in (cited_in.parent, ROOT, ROOT / "docs"):
        path = (base / doc).resolve()
        if path in known:
            return path
    return None


def headings(doc: Path) -> set[str]:
    """The titles of a markdown file's headings (outside fenced code), without backquotes."""
    titles, fenced = set(), False
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6}\s+(.+?)\s*#*\s*$", line)):
            titles.add(m.group(1).replace("`", ""))
    return titles


def cites(title: str, section: str) -> bool:
    """A heading answers a citation when it is the section, or the section then ':' ("Metrics" for
    "Metrics: Fréchet distances")."""
    return title == section or title.startswith(section + ":")


def citations() -> tuple[list[str], list[str]]:
    """(each citation of a missing document, each citation of a missing section), as FILE: text."""
    names = repo_files()
    known = {(ROOT / p).resolve() for p in names}
    #: the files that cite: sources, documents, specs and scripts (CI's included); not this one's examples
    files = [ROOT / p for p in names if (p.endswith(SUFFIXES) or p.startswith(".ci/")) and p != "tests/test_docs.py"]
    missing_docs, missing_sections = [], []
    for path in files:
        try:
            text = joined(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
        rel = path.relative_to(ROOT)
        for m in DOC.finditer(text):
            if resolve(m.group(1), path, known) is None:
                missing_docs.append(f"{rel}: {m.group(1)}")
        for m in SECTION.finditer(text):
            doc = resolve(m.group(1), path, known)
            if doc is not None and not any(cites(t, m.group(2)) for t in headings(doc)):
                missing_sections.append(f'{rel}: {m.group(1)}, "{m.group(2)}"')
    return missing_docs, missing_sections


def test_every_cited_document_is_in_the_repository():
    missing, _ = citations()
    assert missing == [], "cited but not in the repository:\n" + "\n".join(missing)


def test_every_cited_section_is_a_heading_of_its_document():
    _, missing = citations()
    assert missing == [], "cited sections with no such heading:\n" + "\n".join(missing)


def test_the_math_and_the_design_are_cited_where_the_code_says():
    """The two pages the code leans on most, and the sections its docstrings name."""
    math, design = headings(ROOT / "docs" / "math.md"), headings(ROOT / "docs" / "design.md")
    for section in ("Conventions", "Stochastic interpolant", "Flow map and its parameterization", "Losses",
                    "Diagonal", "Lagrangian", "Eulerian", "Progressive", "Residual loss per sample",
                    "Sampling of (s, t)", "Cost model", "What the paper reports", "The checkerboard",
                    "Exact oracles"):
        assert section in math
    for section in ("Data flow", "load", "validate", "compile", "train", "evaluate", "Seams", "The run folder",
                    "Conventions"):
        assert section in design


@pytest.mark.parametrize("text, problem", [
    ('see MISSING.md, "Losses"', "doc"),
    ('(docs/math.md, "No such section")', "section"),
    ('docs/math.md, "What the paper\n# reports"', None),
    ('docs/images-and-gpus.md, \\"Metrics\\"', None),
    ("https://example.org/NOT-HERE.md", None),
])
def test_the_checker_itself(tmp_path, text, problem):
    """The check finds a missing document and a missing section, and accepts a citation wrapped over
    two comment lines, an escaped quote and a URL."""
    cited_in = ROOT / "tests" / "x.py"
    known = {(ROOT / p).resolve() for p in repo_files()}
    body = joined(text)
    docs = [m.group(1) for m in DOC.finditer(body) if resolve(m.group(1), cited_in, known) is None]
    sections = [m.group(2) for m in SECTION.finditer(body)
                if (d := resolve(m.group(1), cited_in, known)) is not None
                and not any(cites(t, m.group(2)) for t in headings(d))]
    assert bool(docs) == (problem == "doc") and bool(sections) == (problem == "section")
