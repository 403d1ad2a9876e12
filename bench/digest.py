"""Rebuild (or check) the digest at the top of BENCHMARKS.md from its sections' own words.

    .venv/bin/python -m bench.digest           # rewrite the digest
    .venv/bin/python -m bench.digest --check   # exit 1 when it differs from what the sections say (scripts/check.sh)

Every benchmark rebuilds it when it writes its section (bench/markdown.py ``replace_section``); this command is for
a BENCHMARKS.md edited otherwise (a section's prose), and for the check that nobody edited the digest by hand.
"""

from __future__ import annotations

import argparse
import sys

from bench.markdown import BENCHMARKS, DIGEST_END, DIGEST_START, markers, with_digest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the digest is not what the sections say")
    args = parser.parse_args(argv)
    text = BENCHMARKS.read_text()
    if markers(text, DIGEST_START, DIGEST_END) is None:
        print(f"{BENCHMARKS} needs the digest markers, in this order: {DIGEST_START} ... {DIGEST_END}", file=sys.stderr)
        return 1
    rebuilt = with_digest(text)
    if args.check:
        if rebuilt != text:
            print(
                f"{BENCHMARKS}'s digest differs from its sections: run .venv/bin/python -m bench.digest",
                file=sys.stderr,
            )
            return 1
        return 0
    BENCHMARKS.write_text(rebuilt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
