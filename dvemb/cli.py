"""The ``dvemb`` command line.

Core subcommands live here (``inspect``, ``compute``, and the client's ``upload``); packages installed
next to the core (the server, the worker, the demo) add theirs through the ``dvemb.commands`` entry-point
group, so the core never imports them. Every command imports what it needs when it runs: ``dvemb --help``
loads neither torch nor the server.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING

from dvemb import top_cli
from dvemb.client import cli as client_cli
from dvemb.errors import ConfigError, DvembError
from dvemb.replay import cli as replay_cli

if TYPE_CHECKING:
    from dvemb.engine import ComputeProgress

__all__ = ["main"]

Register = Callable[[argparse._SubParsersAction], None]  # type: ignore[type-arg]


def _inspect(args: argparse.Namespace) -> int:
    from dvemb.reader import open_log

    log = open_log(args.log_dir)
    if args.verify:
        log.validate()
    summary = {
        "log": str(log.directory),
        "status": log.end_note(),
        "verified": bool(args.verify),
        "steps": log.num_steps,
        "world_size": log.world_size,
        "dtype": log.info.dtype,
        "loss_reduction": log.loss_reduction,
        "curvature": log.info.curvature,
        "optimizer": log.info.optimizer.get("type"),
        "format_version": log.info.version,
        "propagation": log.propagation,
        "tracked_parameters": log.info.tracked_parameters,
        "total_parameters": log.info.total_parameters,
        "layers": [{"name": layer.name, "kind": layer.kind, "dim": layer.dim} for layer in log.layers],
        "shards": log.num_shards(),
        "query_sets": log.query_set_names(),
    }
    print(json.dumps(summary, indent=2))
    return 0


def _progress_printer() -> Callable[[ComputeProgress], None]:
    """A one-line progress bar with ETA on stderr."""

    def show(p: ComputeProgress) -> None:
        width = 30
        filled = int(width * p.fraction)
        eta = "?" if p.eta_s is None else f"{p.eta_s:.0f}s"
        step = "" if p.current_step is None else f"step {p.current_step:>8}  "
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {p.fraction:6.1%}  {step}"
            f"{p.steps_done}/{p.total_steps} steps  elapsed {p.elapsed_s:.0f}s  ETA {eta}   "
        )
        if p.steps_done >= p.total_steps:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def _compute(args: argparse.Namespace) -> int:
    from dvemb.engine import ComputeArguments, compute
    from dvemb.formats import Summary

    out = Path(args.out)
    existing = next(p for p in (out, *out.parents) if p.exists())  # the results go under it
    if not existing.is_dir():
        raise ConfigError(f"--out {out}: {existing} is a file; pass a directory for the results (created if missing)")

    arguments = ComputeArguments(
        curvature=args.curvature,
        blocks=args.blocks,
        device=args.device,
        accumulate_dtype="float64" if args.float64 else "float32",
        top_k=args.top_k,
        query_sets=tuple(args.query_set) if args.query_set else None,
        save_embeddings=not args.no_embeddings,
        self_influence=args.self_influence,
        propagation=args.propagation,
        second_moment=not args.no_second_moment,
        second_moment_lifted={"auto": None, "on": True, "off": False}[args.second_moment_lifted],
        projected_preconditioner=args.projected_preconditioner,
        removal=args.removal,
        segments=args.segments,
        embeddings_dtype=args.embeddings_dtype,
    )
    progress = None if args.quiet else _progress_printer()
    summary = Summary.from_json(
        compute(args.log_dir, args.out, arguments, progress=progress, overwrite=args.overwrite, workers=args.workers)
    )
    brief = {
        "results": str(args.out),
        "steps": summary.steps,
        "occurrences": summary.occurrences,
        "curvature": summary.curvature,
        "propagation": summary.propagation_label,
        "seconds": round(summary.seconds or 0.0, 2),
        "segments": summary.segments,
        "note": summary.note,
        "phases": {name: q.phases["ranges"] for name, q in summary.query_sets.items()},
    }
    print(json.dumps(brief, indent=2))
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The parser with core subcommands and those registered by installed dvemb packages."""
    parser = argparse.ArgumentParser(prog="dvemb", description="Data value embeddings for PyTorch training runs.")
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="summarise (and with --verify, fully validate) a gradient log")
    inspect.add_argument("log_dir")
    inspect.add_argument("--verify", action="store_true", help="read every file and check checksums and values")
    inspect.set_defaults(func=_inspect)
    comp = sub.add_parser("compute", help="compute data value embeddings, scores and phases of a gradient log")
    comp.add_argument("log_dir")
    comp.add_argument("--out", required=True, help="results directory (resumes an interrupted run found there)")
    comp.add_argument("--curvature", choices=["empirical", "ggn"], default=None, help="default: the log's own mode")
    comp.add_argument("--blocks", choices=["auto", "layer", "full"], default="auto")
    comp.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    comp.add_argument("--float64", action="store_true", help="accumulate the recursion in float64")
    comp.add_argument("--top-k", type=int, default=100)
    comp.add_argument("--query-set", action="append", help="score only this query set (repeatable)")
    comp.add_argument("--no-embeddings", action="store_true", help="do not write embeddings.npy")
    comp.add_argument("--self-influence", action="store_true", help="also write self_influence.npy")
    comp.add_argument(
        "--propagation",
        choices=["auto", "optimizer", "sgd-proxy"],
        default="auto",
        help="auto: the optimizer's own first-order map when modelled (SGD, momentum, Adam, AdamW), else the SGD "
        "proxy; optimizer: the same but fail instead of the proxy; sgd-proxy: the paper's proxy (docs/optimizers.md)",
    )
    comp.add_argument(
        "--no-second-moment", action="store_true", help="Adam: leave out how removing an example changes v"
    )
    comp.add_argument(
        "--second-moment-lifted",
        default="auto",
        choices=["auto", "on", "off"],
        help="Adam: carry that term in small projected layers over their own coordinates: auto (default: while its "
        "states hold at most 16x the recursion's), on (wherever memory allows), off "
        "(docs/optimizers.md section 3)",
    )
    comp.add_argument(
        "--projected-preconditioner",
        choices=["kronecker", "scalar"],
        default="kronecker",
        help="how Adam's preconditioner acts in projected coordinates",
    )
    comp.add_argument(
        "--removal",
        choices=["auto", "batch", "weight"],
        default="auto",
        help="what removing an example means: batch (it leaves its batch, whose mean is over the others; the "
        "default for a mean-reduced loss) or weight (its weight in the step's loss becomes 0; a summed loss)",
    )
    comp.add_argument(
        "--segments",
        type=_positive_int,
        default=1,
        help="split training into K segments computed independently and combined exactly (influence checkpointing)",
    )
    comp.add_argument(
        "--workers", type=_positive_int, default=1, help="processes that run the segments (with --segments > 1)"
    )
    comp.add_argument(
        "--embeddings-dtype",
        choices=["auto", "float32", "float16"],
        default="auto",
        help="dtype of embeddings.npy (auto: the accumulation dtype; float16 halves it, scores use full precision)",
    )
    comp.add_argument("--overwrite", action="store_true", help="replace other results in --out")
    comp.add_argument("--quiet", action="store_true", help="no progress bar")
    comp.set_defaults(func=_compute)
    top_cli.register(sub)
    client_cli.register(sub)
    replay_cli.register(sub)
    for entry in entry_points(group="dvemb.commands"):
        try:
            register: Register = entry.load()
        except ImportError:  # a package of this distribution that is not installed here (e.g. in a slim image)
            continue
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``dvemb`` command; errors of dvemb are printed as one line and exit with status 2."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except DvembError as exc:
        print(f"dvemb: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file system refusal (permissions, a full disk): its message names the path
        print(f"dvemb: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
