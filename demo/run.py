"""The demo itself (`dvemb demo`, registered by demo/cli.py): two real trainings through the real path
(recorder, upload, worker, database), then the dashboard."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
import webbrowser
from pathlib import Path
from typing import Any

import httpx

from demo.charlm import train_charlm
from demo.digits import train_digits


class _Service:
    """The embedded service (API in a thread, one local worker process), exactly as `dvemb serve` runs it."""

    def __init__(self, port: int) -> None:
        import uvicorn

        from server.cli import LocalWorker, lost_worker_release, new_token, prepare
        from server.main import create_app
        from server.tasks import worker_command

        prepare()
        self.token = new_token("demo", "demo")
        self.url = f"http://127.0.0.1:{port}"
        # Restarted if it dies, its jobs queued again at once, as `dvemb serve` does.
        self.worker = LocalWorker(worker_command(), quiet=True, on_restart=lost_worker_release()).start()
        self.server = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        # Said now, so that the runs and their analyses can be watched while the demo trains (issue 24).
        print(
            f"dashboard: {self.url}/#/runs (API token: {self.token}); the runs appear as they are uploaded", flush=True
        )

    def get(self, path: str, **params: Any) -> Any:
        response = httpx.get(
            f"{self.url}/api/v1{path}", params=params, headers={"Authorization": f"Bearer {self.token}"}
        )
        response.raise_for_status()
        return response.json()

    def wait_job(self, job_id: int) -> dict[str, Any]:
        while True:
            job: dict[str, Any] = self.get(f"/jobs/{job_id}")
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(0.5)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.worker.stop()


def _upload(service: _Service, log_dir: Path, name: str) -> dict[str, Any]:
    from dvemb.client import upload_log

    result = upload_log(log_dir, server=service.url, token=service.token, run_name=name, analyze=True)
    if "job" not in result:
        raise RuntimeError(f"the {name} log was not accepted: {result}")
    job = service.wait_job(result["job"]["id"])
    if job["status"] != "succeeded":
        raise RuntimeError(f"the {name} analysis {job['status']}: {job['error']}")
    return job


def flipped_label_findings(service: _Service, job_id: int, flipped: list[int], train_size: int) -> dict[str, Any]:
    """Precision of 'most harmful by total influence on the clean test set' at the size of the flipped set."""
    k = len(flipped)
    ranked = service.get(f"/jobs/{job_id}/examples", query_set="clean-test", kind="harmful", limit=k)["data"]
    hits = len({int(r["example_id"]) for r in ranked} & set(flipped))
    return {
        "flipped": k,
        "train_size": train_size,
        "precision_at_k": hits / k,
        "chance": k / train_size,
        "lift_over_chance": (hits / k) / (k / train_size),
    }


def phase_findings(service: _Service, job_id: int, steps: int) -> dict[str, Any]:
    """Share of the total |influence / lr| in the first and last tenth of training, against the middle."""
    curve = service.get(f"/jobs/{job_id}/curve", query_set="held-out-text", points=max(steps, 2))
    per_lr = [abs(a / lr) if lr else 0.0 for a, lr in zip(curve["abs_sum"], curve["lr"], strict=True)]
    total = sum(per_lr) or 1.0
    tenth = max(1, len(per_lr) // 10)
    return {
        "first_tenth": sum(per_lr[:tenth]) / total,
        "last_tenth": sum(per_lr[-tenth:]) / total,
        "middle": sum(per_lr[tenth:-tenth]) / total,
        "phases": service.get(f"/jobs/{job_id}/phases", query_set="held-out-text"),
    }


def run_demo(args: argparse.Namespace) -> int:
    from server.cli import sigterm_as_interrupt

    with sigterm_as_interrupt():  # SIGTERM stops the demo like Ctrl-C: its worker is stopped with it
        return _run_demo(args)


def _run_demo(args: argparse.Namespace) -> int:
    started = time.monotonic()
    service = _Service(args.port)
    work = Path(tempfile.mkdtemp(prefix="dvemb-demo-"))
    try:
        print("training an MLP on digits with 5% of its labels flipped (recorder on, ggn curvature) ...", flush=True)
        digits = train_digits(work / "digits", quick=args.quick)
        digits_job = _upload(service, digits.log_dir, f"digits-flipped-labels-{int(time.time())}")
        print("training a character-level transformer on Python's own source (warmup + cosine) ...", flush=True)
        lm_dir = train_charlm(work / "charlm", quick=args.quick)
        lm_job = _upload(service, lm_dir, f"charlm-stdlib-{int(time.time())}")
        lm_steps = int(service.get(f"/jobs/{lm_job['id']}/summary")["steps"])
        findings: dict[str, Any] = {
            "digits": {
                "job": digits_job["id"],
                "test_accuracy": digits.test_accuracy,
                **flipped_label_findings(service, digits_job["id"], digits.flipped, digits.train_size),
            },
            "charlm": {"job": lm_job["id"], **phase_findings(service, lm_job["id"], lm_steps)},
            "seconds": time.monotonic() - started,
            "dashboard": service.url,
            "token": service.token,
        }
        print(json.dumps(findings, indent=2), flush=True)
        d = findings["digits"]
        print(
            f"\nflipped labels among the {d['flipped']} most harmful examples: {d['precision_at_k']:.0%} "
            f"(chance {d['chance']:.0%}); open {service.url}/#/runs/ and sign in with the token above.",
            flush=True,
        )
        if not args.no_browser:
            webbrowser.open(service.url)
        if not args.exit_when_done:
            print("serving the dashboard; Ctrl-C to stop", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        service.stop()
        if getattr(args, "keep_logs", False):
            print(f"the demo's gradient logs are kept in {work}", flush=True)
        else:  # the logs are on the server now (hundreds of MB a demo): nothing is left in the temp directory
            shutil.rmtree(work, ignore_errors=True)
    return 0
