"""Fail on string-key reads of a gradient log's manifest or a computation's summary outside the modules that parse
and write them (issue 26): elsewhere the typed ``dvemb.formats.Manifest`` (``GradientLog.info``) and
``dvemb.formats.Summary`` (``Results.info``, ``Job.results``) are read, so that a field is named in one place.

Usage: ``python scripts/check_typed_access.py [ROOT]`` (exit status 1 and the offending lines when any is found).

Exempt, with why:
- ``dvemb/formats/``: defines the typed objects from the JSON;
- ``dvemb/reader.py``, ``dvemb/writer.py``: read and validate, and write, the files themselves;
- ``dvemb/engine/approximations.py``: judges manifests of every format version, partial ones included, tolerantly
  (a missing key is "not known", never an error);
- ``server/db/models.py``: the typed accessors of the database's JSON columns (``Run.rank_manifests``,
  ``Job.results``);
- a SQL expression on the JSON column (``Job.summary["steps"].as_integer()``, or on an ``alias`` of the table): the
  database reads it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

CHECKED = ("dvemb", "server", "worker", "demo")
EXEMPT = (
    "dvemb/formats/",
    "dvemb/reader.py",
    "dvemb/writer.py",
    "dvemb/engine/approximations.py",
    "server/db/models.py",
)
#: ``manifest["k"]``, ``summary.get("k")``, and ``(job.summary or {}).get("k")``.
READ = re.compile(
    r"(?<!Job\.)(?<!alias\.)\b(manifest|manifests|summary)(\s+or\s+\{\}\s*\))?\s*(\[\s*['\"]|\.get\s*\()"
)


def offending(root: Path) -> list[str]:
    """``path:line: text`` of every string-key read outside the exempt modules."""
    found = []
    for top in CHECKED:
        for path in sorted((root / top).rglob("*.py")):
            relative = path.relative_to(root).as_posix()
            if relative.startswith(EXEMPT):
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if READ.search(line.split("#", 1)[0]):
                    found.append(f"{relative}:{number}: {line.strip()}")
    return found


def main() -> int:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent
    found = offending(root)
    for line in found:
        print(line, file=sys.stderr)
    if found:
        print(
            f"{len(found)} string-key read(s) of a manifest or summary: use the typed dvemb.formats.Manifest "
            "(GradientLog.info) or Summary (Results.info, Job.results), adding a field there if it is missing",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
