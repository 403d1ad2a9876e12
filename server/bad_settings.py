"""The service's commands answer a bad ``DVEMB_*`` setting as dvemb's own errors: one line, status 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import wraps


def refusing_bad_settings(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``command`` answering a bad ``DVEMB_*`` setting with one line and status 2, as dvemb's own errors are (the
    settings, and pydantic, are imported only when the command runs)."""

    @wraps(command)
    def run(args: argparse.Namespace) -> int:
        from server.settings import SettingsError

        try:
            return command(args)
        except SettingsError as exc:
            print(f"dvemb: error: {exc}", file=sys.stderr)
            return 2

    return run
