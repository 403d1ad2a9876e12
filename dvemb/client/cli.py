"""``dvemb upload``: the client's command (registered by the core CLI; its packages are imported on use)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    upload = sub.add_parser("upload", help="upload a gradient log to a server (resumable)")
    upload.add_argument("log_dir")
    upload.add_argument("--server", required=True, help="e.g. http://127.0.0.1:8000")
    upload.add_argument("--token", default=os.environ.get("DVEMB_TOKEN"), help="API token (or DVEMB_TOKEN)")
    upload.add_argument("--run", help="run name (default: the log directory's name)")
    upload.add_argument("--analyze", action="store_true", help="start an analysis once uploaded")
    upload.add_argument("--wait", action="store_true", help="with --analyze, wait for the analysis to finish")
    upload.add_argument(
        "--parallel",
        type=int,
        default=None,
        metavar="N",
        help="data files sent at once (default 4; manifests and shard indexes always go first, one at a time)",
    )
    upload.set_defaults(func=_upload)
    agreement = sub.add_parser(
        "upload-agreement",
        help="attach `dvemb trust`'s record (trust-<set>.json) to the service's analysis of the same log",
    )
    agreement.add_argument("trust_file", help="trust-<set>.json, written by `dvemb trust` or `dvemb replay`")
    agreement.add_argument("--job", type=int, required=True, help="the service's analysis (job id) of the same log")
    agreement.add_argument("--server", required=True, help="e.g. http://127.0.0.1:8000")
    agreement.add_argument("--token", default=os.environ.get("DVEMB_TOKEN"), help="API token (or DVEMB_TOKEN)")
    agreement.set_defaults(func=_upload_agreement)
    replayed = sub.add_parser(
        "request-replay",
        help="have the service replay an analysis's run exactly from its replay bundle, and store the agreement",
    )
    replayed.add_argument("--job", type=int, required=True, help="the service's analysis (job id)")
    replayed.add_argument("--query-set", required=True, help="the query set to replay (one of the analysis's)")
    replayed.add_argument("--probe", type=int, default=0, help="occurrences probed for linearity (0-32)")
    replayed.add_argument("--wait", action="store_true", help="follow the replay until it ends")
    replayed.add_argument("--server", required=True, help="e.g. http://127.0.0.1:8000")
    replayed.add_argument("--token", default=os.environ.get("DVEMB_TOKEN"), help="API token (or DVEMB_TOKEN)")
    replayed.set_defaults(func=_request_replay)


def _request_replay(args: argparse.Namespace) -> int:
    try:
        from dvemb.client.upload import UploadError, start_replay
    except ImportError as exc:
        print(f"dvemb request-replay needs the client extra ({exc.name} is missing): pip install 'dvemb[client]'",
              file=sys.stderr)  # fmt: skip
        return 2
    if not args.token:
        print("dvemb request-replay: --token (or DVEMB_TOKEN) is required", file=sys.stderr)
        return 2
    try:
        replay = start_replay(
            server=args.server, token=args.token, job=args.job, query_set=args.query_set, probe=args.probe,
            wait=args.wait,
        )  # fmt: skip
    except UploadError as exc:
        print(f"dvemb request-replay: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(replay, indent=2))
    return 0 if replay["status"] != "failed" else 1


def _upload_agreement(args: argparse.Namespace) -> int:
    try:
        from dvemb.client.upload import UploadError, upload_agreement
    except ImportError as exc:
        print(
            f"dvemb upload-agreement needs the client extra ({exc.name} is missing): pip install 'dvemb[client]'",
            file=sys.stderr,
        )
        return 2
    if not args.token:
        print("dvemb upload-agreement: --token (or DVEMB_TOKEN) is required", file=sys.stderr)
        return 2
    try:
        stored = upload_agreement(Path(args.trust_file), server=args.server, token=args.token, job=args.job)
    except UploadError as exc:
        print(f"dvemb upload-agreement: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(stored, indent=2))
    return 0


def _upload(args: argparse.Namespace) -> int:
    try:
        from dvemb.client import upload_log, wait_for_job
    except ImportError as exc:
        print(
            f"dvemb upload needs the client extra ({exc.name} is missing): pip install 'dvemb[client]'", file=sys.stderr
        )
        return 2
    if not args.token:
        print("dvemb upload: --token (or DVEMB_TOKEN) is required", file=sys.stderr)
        return 2
    from dvemb.client.upload import PARALLEL_UPLOADS, UploadError

    log_dir = Path(args.log_dir)
    try:
        result = upload_log(
            log_dir,
            server=args.server,
            token=args.token,
            run_name=args.run or log_dir.resolve().name,
            analyze=args.analyze,
            parallel=PARALLEL_UPLOADS if args.parallel is None else args.parallel,
        )
        if args.analyze and args.wait and result.get("job"):
            result["job"] = wait_for_job(args.server, args.token, result["job"]["id"])
    except UploadError as exc:
        print(f"dvemb upload: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    print(f"dashboard: {result['url']}", file=sys.stderr)
    return 0 if not result.get("rejected") else 1
