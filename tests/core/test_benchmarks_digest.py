"""BENCHMARKS.md's digest is rebuilt from the sections' own words, never kept by hand (bench/markdown.py)."""

from __future__ import annotations

from pathlib import Path

from bench.markdown import DIGEST_END, DIGEST_START, digest, replace_section, with_digest

DOC = f"""# Benchmarks

Intro.

{DIGEST_START}
stale words written by hand
{DIGEST_END}

## Speed: the engine

Produced by `.venv/bin/python -m bench.engine_speed` on 2026-12-06 16:07 UTC, 91 s.

| shape | ratio | met? |
|---|---|---|
| d=256 | 0.3 | not met |

Reading: at least 60% of GEMM **NOT met**
at d = 256 (a paragraph on two lines).

- the other target: met (1.2x)
- a plain list item

## Memory

Command: `.venv/bin/python -m bench.engine_memory` (2026-12-03).

Peak 158 MB, metrics only.
"""


def test_the_digest_quotes_each_sections_verdicts_with_its_provenance() -> None:
    assert digest(DOC.split(DIGEST_END)[1]) == (
        "- **[Speed: the engine](#speed-the-engine)** (2026-12-06, `.venv/bin/python -m bench.engine_speed`):\n"
        "  - Reading: at least 60% of GEMM **NOT met** at d = 256 (a paragraph on two lines).\n"
        "  - the other target: met (1.2x)\n"
        "- **[Memory](#memory)** (2026-12-03, `.venv/bin/python -m bench.engine_memory`): no verdict line in the"
        " section (its figures are there)."
    )


def test_a_hand_edit_of_the_digest_is_replaced_and_a_file_without_markers_is_left_alone() -> None:
    rebuilt = with_digest(DOC)
    assert "stale words" not in rebuilt and rebuilt != DOC and with_digest(rebuilt) == rebuilt
    assert rebuilt.split(DIGEST_END)[1] == DOC.split(DIGEST_END)[1]  # the sections are untouched
    plain = DOC.replace(DIGEST_START, "").replace(DIGEST_END, "")
    assert with_digest(plain) == plain


def test_writing_a_section_rebuilds_the_digest(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(with_digest(DOC))
    replace_section(
        "Memory", "## Memory\n\nCommand: `python -m bench.engine_memory` (2026-12-07).\n\nBound: met.\n", path
    )
    text = path.read_text()
    assert "- **[Memory](#memory)** (2026-12-07, `python -m bench.engine_memory`):\n  - Bound: met." in text
    assert with_digest(text) == text


def test_the_repository_digest_is_current() -> None:
    text = (Path(__file__).resolve().parents[2] / "BENCHMARKS.md").read_text()
    assert with_digest(text) == text, "BENCHMARKS.md's digest is stale: run .venv/bin/python -m bench.digest"
