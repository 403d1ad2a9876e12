"""``dvemb replay`` and ``dvemb trust``: the replay from the command line (docs/replay.md, section 4).

The model, optimizer, data and loss are Python objects: ``--entry module:function`` names a function of the user's
code that takes the log directory and returns a :class:`dvemb.replay.ReplaySpec`. Nothing here imports torch until
a command runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

from dvemb.errors import ConfigError

__all__ = ["load_entry", "register"]


def load_entry(entry: str) -> Any:
    """The function named ``module:function`` (the current directory is searched first, as ``python -m`` does)."""
    module_name, sep, function_name = entry.partition(":")
    if not sep or not module_name or not function_name:
        raise ConfigError(f"--entry {entry!r}: use module:function (e.g. train:replay_spec)")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"--entry {entry!r}: cannot import {module_name!r} ({error})") from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"--entry {entry!r}: {module_name} has no function {function_name!r}")
    return function


def _replay(args: argparse.Namespace) -> int:
    from dvemb.replay.api import ReplaySpec, replay
    from dvemb.replay.comparison import describe, trust
    from dvemb.replay.engine import ReplayArguments
    from dvemb.replay.files import save_replay
    from dvemb.replay.schedule import schedule_from_log

    spec = load_entry(args.entry)(Path(args.log_dir))
    if not isinstance(spec, ReplaySpec):
        raise ConfigError(f"--entry {args.entry!r} returned {type(spec).__name__}, not a dvemb.replay.ReplaySpec")
    arguments = ReplayArguments(
        removal=args.removal,
        checkpoint_every=args.checkpoint_every,
        micro_batches=args.micro_batches,
        query_columns=args.query_columns,
        max_queries=args.max_queries,
        probe=args.probe,
        seed=args.seed,
    )
    result = replay(
        spec.model,
        spec.optimizer,
        schedule_from_log(args.log_dir),
        spec.loss_fn,
        spec.examples,
        spec.queries,
        arguments,
        query_set=args.query_set,
        work_dir=args.work_dir,
    )
    save_replay(result, args.out)
    report: dict[str, Any] = {k: v for k, v in result.record.items() if k not in ("probe", "query_losses")}
    report["probe"] = {k: v for k, v in result.record["probe"].items() if k != "records"}
    if not args.no_trust and (Path(args.out) / "summary.json").exists():
        report["trust"] = trust(args.out, args.query_set)
        print(describe(report["trust"]), file=sys.stderr)
    print(json.dumps(report, indent=2))
    return 0


def _trust(args: argparse.Namespace) -> int:
    from dvemb.replay.comparison import describe, trust

    record = trust(args.results_dir, args.query_set)
    print(describe(record), file=sys.stderr)
    print(json.dumps(record, indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``replay`` and ``trust`` to the ``dvemb`` command."""
    rep = sub.add_parser(
        "replay",
        help="exact first-order influence of every occurrence on a query set, by replaying the run (docs/replay.md)",
    )
    rep.add_argument("log_dir")
    rep.add_argument(
        "--entry",
        required=True,
        help="module:function of your code; function(log_dir) returns a dvemb.replay.ReplaySpec (model at "
        "initialisation, optimizer in its initial state, loss_fn, examples, queries)",
    )
    rep.add_argument("--out", required=True, help="directory for replay-<set>.npy/.json (the results directory)")
    rep.add_argument("--query-set", required=True, help="the name it is saved under (the results' query set)")
    rep.add_argument("--removal", choices=["auto", "batch", "weight"], default="auto")
    rep.add_argument("--checkpoint-every", type=int, default=None, help="steps between kept states (sqrt(T))")
    rep.add_argument("--micro-batches", type=int, default=1, help="parts each step is evaluated in")
    rep.add_argument("--query-columns", choices=["mean", "each"], default="mean")
    rep.add_argument("--max-queries", type=int, default=64)
    rep.add_argument(
        "--probe",
        type=int,
        default=8,
        help="occurrences the linearity probe retrains (0: none); each costs 3 retrainings of the run's tail, so 8 "
        "cost about 12 trainings",
    )
    rep.add_argument("--seed", type=int, default=0)
    rep.add_argument(
        "--work-dir",
        default=None,
        help="keep checkpoints and finished segments here: the same command run again resumes where it stopped",
    )
    rep.add_argument("--no-trust", action="store_true", help="do not compare with the results in --out")
    rep.set_defaults(func=_replay)
    tru = sub.add_parser("trust", help="agreement of a results directory's fast scores with its exact replay")
    tru.add_argument("results_dir")
    tru.add_argument("--query-set", required=True)
    tru.set_defaults(func=_trust)
