"""``dvemb demo`` (registered through the ``dvemb.commands`` entry points; the demo loads on use)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    demo = sub.add_parser("demo", help="train real models with the recorder, compute influence, serve the dashboard")
    demo.add_argument("--quick", action="store_true", help="smaller models and data (for tests, about a minute)")
    demo.add_argument("--no-browser", action="store_true", help="print the dashboard's URL instead of opening it")
    demo.add_argument("--port", type=int, default=8000)
    demo.add_argument("--exit-when-done", action="store_true", help="stop the server once the results are in")
    demo.add_argument(
        "--keep-logs", action="store_true", help="keep the gradient logs the demo recorded (in the temp directory)"
    )
    demo.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from demo.run import run_demo

    return run_demo(args)
