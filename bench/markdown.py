"""BENCHMARKS.md is shared by every benchmark: each replaces only its own section, and the digest at the top is
rebuilt from the sections whenever one is written (:func:`digest`), so that no figure in it is kept by hand."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
DIGEST_START = "<!-- digest: rebuilt from the sections below by bench/markdown.py; do not edit by hand -->"
DIGEST_END = "<!-- /digest -->"
# A verdict: a paragraph or list item of a section that says whether a target was met ("met", "**NOT met**", ...).
_VERDICT = re.compile(r"\bmet\b", re.IGNORECASE)
_DATE = re.compile(r"\b(20\d\d-\d\d-\d\d)\b")
_COMMAND = re.compile(r"`([^`]*(?:-m bench\.|bench/)[^`]*)`")


def replace_section(title: str, body: str, path: Path = BENCHMARKS) -> Path:
    """Replace (or append) the ``## {title}`` section, leaving every other section byte-identical.

    Args:
        title: the heading without ``## ``.
        body: the whole section, heading included.
        path: the markdown file (re-read here, right before writing: other benchmarks write it too).
    """
    heading = f"## {title}\n"
    block = body.rstrip("\n") + "\n"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(heading)
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + block
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + block + ("" if end == -1 else "\n" + text[end + 1 :])
    path.write_text(with_digest(text))
    return path


def sections(text: str) -> list[tuple[str, str]]:
    """The ``## `` sections of a markdown text, as (title, body without the heading), in order."""
    parts = re.split(r"^## (.+)\n", text, flags=re.MULTILINE)
    return [(parts[i].strip(), parts[i + 1]) for i in range(1, len(parts) - 1, 2)]


def _blocks(body: str) -> list[str]:
    """A section's paragraphs and list items, each joined into one line (tables and markers left out)."""
    blocks: list[str] = []
    current: list[str] = []
    for line in [*body.splitlines(), ""]:  # the empty line closes the last block
        stripped = line.strip()
        starts_item = stripped.startswith(("- ", "* "))
        if not stripped or stripped.startswith(("|", "<!--")) or starts_item:
            if current:
                blocks.append(" ".join(current))
            current = [stripped[2:]] if starts_item else []
            continue
        current.append(stripped)
    return blocks


def _anchor(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def digest(text: str) -> str:
    """The digest of BENCHMARKS.md's sections: for each, when and by which command it was measured (as its own text
    says), and its verdicts quoted whole (every paragraph or list item that says a target was or was not met)."""
    lines = []
    for title, body in sections(text):
        blocks = _blocks(body)
        provenance = " ".join(blocks[:2])
        date, command = _DATE.search(provenance), _COMMAND.search(provenance)
        where = ", ".join(
            part for part in (date.group(1) if date else "", f"`{command.group(1)}`" if command else "") if part
        )
        verdicts = [b for b in blocks if _VERDICT.search(b)]
        head = f"- **[{title}](#{_anchor(title)})**" + (f" ({where})" if where else "")
        if not verdicts:
            lines.append(f"{head}: no verdict line in the section (its figures are there).")
            continue
        lines.append(f"{head}:")
        lines.extend(f"  - {v}" for v in verdicts)
    return "\n".join(lines)


def markers(text: str, start: str, end: str) -> tuple[int, int] | None:
    """Where the ``start`` and ``end`` markers of a block are in ``text``; None unless both are there, in order."""
    first, last = text.find(start), text.find(end)
    return (first, last) if first != -1 and last >= first else None


def _with_block(text: str, start: str, end: str, body: str, where: tuple[int, int]) -> str:
    first, last = where
    return text[:first] + f"{start}\n{body.strip()}\n{end}" + text[last + len(end) :]


def with_digest(text: str) -> str:
    """``text`` with the block between :data:`DIGEST_START` and :data:`DIGEST_END` rebuilt (unchanged without
    the markers)."""
    where = markers(text, DIGEST_START, DIGEST_END)
    if where is None:
        return text
    return _with_block(text, DIGEST_START, DIGEST_END, digest(text[where[1] :]), where)


def replace_block(path: Path, start: str, end: str, body: str) -> None:
    """Replace what lies between the ``start`` and ``end`` markers of ``path`` (markers kept): the README's
    figures are written by the benchmark that measured them, never by hand."""
    text = path.read_text()
    where = markers(text, start, end)
    if where is None:
        raise SystemExit(f"{path} has no {start} ... {end} block to write into")
    path.write_text(_with_block(text, start, end, body, where))


def measured_commit() -> str:
    """HEAD's short hash, and whether dvemb/ differs from it in the working tree: the code a benchmark measured."""
    root = BENCHMARKS.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "dvemb"], cwd=root, capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + (" (dvemb/ with uncommitted changes)" if dirty.stdout.strip() else "")
