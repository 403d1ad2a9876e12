"""Write frontend/js/statuses.js from dvemb/formats/statuses.py, so that the dashboard compares the statuses the API
sends with the server's own values instead of restating them (``--check``: fail when the file is out of date; run
by scripts/check.sh).

    .venv/bin/python scripts/write_statuses_js.py [--check]
"""

from __future__ import annotations

import argparse
import sys
from enum import StrEnum
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dvemb.formats import statuses  # noqa: E402  (the path above first)

TARGET = ROOT / "frontend" / "js" / "statuses.js"


def render() -> str:
    """The module's text: one frozen object per status enum, in the order statuses.__all__ names them."""
    lines = [
        "// Written by scripts/write_statuses_js.py from dvemb/formats/statuses.py: do not edit (scripts/check.sh",
        "// fails when it is out of date). The statuses the API's answers carry, as the server names them.",
    ]
    for name in statuses.__all__:
        enum = getattr(statuses, name)
        if not (isinstance(enum, type) and issubclass(enum, StrEnum)):
            continue
        lines.append("")
        lines.append(f"export const {name} = Object.freeze({{")
        lines += [f'  {member.name}: "{member.value}",' for member in enum]
        lines.append("});")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when frontend/js/statuses.js is out of date")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET.relative_to(ROOT)} is out of date: run .venv/bin/python scripts/write_statuses_js.py")
            return 1
        return 0
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
