"""``dvemb top RESULTS``: the top helpful and harmful training examples of a finished computation, offline (no
service, no numpy code to write): the occurrences the dashboard's "Top training examples" lists, or with
``--totals`` the examples ranked by their total influence over all their occurrences."""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["register"]


def register(sub: Any) -> None:
    top = sub.add_parser("top", help="top helpful and harmful training examples of a results directory")
    top.add_argument("results_dir")
    top.add_argument("--query-set", help="the query set (default: the only one, else the first computed)")
    top.add_argument("--query", type=int, default=None, help="one query of the set (default: the set's mean)")
    top.add_argument("-k", type=int, default=10, help="rows per kind (default 10)")
    top.add_argument("--totals", action="store_true", help="examples ranked by total influence, all occurrences")
    top.add_argument("--json", action="store_true", help="print JSON instead of tables")
    top.set_defaults(func=_top)


def _top(args: argparse.Namespace) -> int:
    from dvemb.engine.results import load_results
    from dvemb.errors import ConfigError

    results = load_results(args.results_dir)
    sets = results.query_sets
    query_set = args.query_set or sets[0]
    if args.k < 1:
        raise ConfigError(f"-k {args.k}: give at least 1 row per kind")
    found = {
        kind: _totals(results, query_set, kind, args.query, args.k)
        if args.totals
        else results.top(query_set, kind=kind, query=args.query, k=args.k)
        for kind in ("helpful", "harmful")
    }
    if args.json:
        print(json.dumps({"query_set": query_set, "query": args.query, **found}, indent=2))
        return 0
    what = "examples by total influence" if args.totals else "occurrences"
    scope = "the set's mean" if args.query is None else f"query {args.query}"
    print(f"{query_set} ({scope}), top {what}; positive: removing it raises the query loss (it helped)")
    for kind, rows in found.items():
        print(f"\n{kind}:")
        print(_table(rows, totals=args.totals) if rows else f"  (no {kind} {what})")
    return 0


def _totals(results: Any, query_set: str, kind: str, query: int | None, k: int) -> list[dict[str, Any]]:
    """The k examples with the largest (helpful) or smallest (harmful) total influence, of that sign only."""
    import numpy as np

    from dvemb.errors import ConfigError

    totals = np.asarray(results.totals(query_set), dtype=np.float64)  # (N, Q)
    if query is not None and not 0 <= query < totals.shape[1]:
        raise ConfigError(f"query {query} is out of range 0..{totals.shape[1] - 1}")
    values = totals.mean(axis=1) if query is None else totals[:, query]
    order = np.argsort(-values if kind == "helpful" else values, kind="stable")
    kept = [int(i) for i in order if (values[i] > 0 if kind == "helpful" else values[i] < 0)][:k]
    return [
        {"rank": rank, "total": float(values[i]), "example_id": results.example_ids[i]} for rank, i in enumerate(kept)
    ]


def _table(rows: list[dict[str, Any]], *, totals: bool) -> str:
    heads = ["rank", "total", "example_id"] if totals else ["rank", "score", "step", "epoch", "example_id"]
    cells = [[f"{r[h]:.4g}" if isinstance(r[h], float) else str(r[h]) for h in heads] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    lines = ["  " + "  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True))]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
