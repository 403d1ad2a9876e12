"""BENCHMARKS.md is shared by every benchmark: each replaces only its own section."""

from __future__ import annotations

import subprocess
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


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
    path.write_text(text)
    return path


def replace_block(path: Path, start: str, end: str, body: str) -> None:
    """Replace what lies between the ``start`` and ``end`` markers of ``path`` (markers kept): the README's
    figures are written by the benchmark that measured them, never by hand."""
    text = path.read_text()
    first, last = text.find(start), text.find(end)
    if first == -1 or last < first:
        raise SystemExit(f"{path} has no {start} ... {end} block to write into")
    path.write_text(text[:first] + f"{start}\n{body.strip()}\n{end}" + text[last + len(end) :])


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
