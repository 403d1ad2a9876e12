"""An exact replay of a job's run on one query set, from the run's replay bundle (dvemb.replay.bundle), and its
agreement with the job's scores (docs/replay.md, "In the service").

The replay's work directory (its checkpoints and finished adjoint segments, dvemb/replay/resume.py) is kept in
storage as it is written (``runs/<run>/results/<job>/replay-work/<set>/``): a replay whose worker died is taken
over by any worker, which copies that directory to its own scratch and resumes from the last checkpoint or segment
with the same scores. When the replay succeeds its files and ``trust-<set>.json`` join the job's results, the
agreement becomes the set's replay agreement (shown on the run's page), and the work directory is removed.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import update

from dvemb.errors import DvembError
from dvemb.formats import (
    EXAMPLES,
    OCCURRENCES,
    REPLAY_BUNDLE,
    SUMMARY,
    Summary,
    is_replay_bundle_name,
    scores_file,
)
from dvemb.replay import ReplayArguments, replay, save_replay, schedule_from_log, trust
from dvemb.replay.bundle import open_bundle
from dvemb.replay.comparison import trust_file
from dvemb.replay.engine import checkpoint_spacing
from dvemb.replay.files import replay_files
from server.db.agreements import store_agreement
from server.db.leases import Lease, hold
from server.db.models import Job, ReplayJob
from server.db.session import session_factory
from server.db.states import ReplayStatus, transition
from server.settings import get_settings
from server.storage import Storage, get_storage, log_key, results_key

__all__ = ["run_replay", "work_key"]

logger = logging.getLogger(__name__)


def work_key(run_id: int, job_id: int, query_set: str) -> str:
    """Where a replay's work directory is kept in storage while it runs."""
    return results_key(run_id, job_id, f"replay-work/{query_set}")


def run_replay(replay_id: int, transient_retries_left: int = 0) -> None:
    """Replay, compare with the job's scores, store the agreement (module docstring).

    Raises:
        LeaseHeld: another worker is replaying it (its lease is alive): the task should come back later.
    """
    factory = session_factory()
    lease = get_settings().job_lease_seconds
    # The jobs' lease (server/db/leases.py, Lease): claimed once, taken over when its worker died, failed at the
    # attempt cap, every write fenced by the claim's token; a transient database error hands the claim back.
    with Lease(
        ReplayJob,
        replay_id,
        working=ReplayStatus.RUNNING,
        waiting=ReplayStatus.QUEUED,
        lease=lease,
        transient_retries_left=transient_retries_left,
        gave_up=_gave_up,
        fail=lambda _session, row, mine, problem: _fail(row.id, mine, problem),
    ) as held:
        if not held:
            return  # done, failed, deleted, or past the attempt cap
        mine, query_set, options = held.mine, held.row.query_set, dict(held.row.options)
        with factory() as session:
            job = session.get(Job, held.row.job_id)
            assert job is not None
            run_id, job_id = int(job.run_id), int(job.id)
            removal = Summary.from_json(job.summary).removal if job.summary else "auto"
        try:
            record, summary = _replay(get_storage(), run_id, job_id, replay_id, query_set, options, removal, mine)
            with factory() as session:
                job = session.get(Job, job_id)
                if job is None or not hold(session, ReplayJob, replay_id, ReplayStatus.RUNNING, mine, lease):
                    session.rollback()
                    return
                store_agreement(session, job_id=job_id, query_set=query_set, record=record)
                row = session.get(ReplayJob, replay_id)
                assert row is not None
                transition(
                    session,
                    row,
                    ReplayStatus.SUCCEEDED,
                    when=mine,
                    summary=summary,
                    progress=1.0,
                    lease_expires_at=None,
                    finished_at=dt.datetime.now(dt.UTC),
                )
                session.commit()
            get_storage().delete_prefix(work_key(run_id, job_id, query_set))
        except DvembError as error:  # the bundle, the log or the options: the user's to fix, said in words
            _fail(replay_id, mine, get_storage().public_message(str(error)))


def _gave_up(cap: int) -> str:
    return (
        f"the replay was started {cap} times and its worker stopped each time before it finished (out of memory? "
        "killed?); ask again with a larger checkpoint_every once the cause is fixed"
    )


def _replay(
    storage: Storage,
    run_id: int,
    job_id: int,
    replay_id: int,
    query_set: str,
    options: dict[str, Any],
    removal: str,
    mine: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The replay and its comparison: (trust record, the replay's summary less its probe's rows)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    built = open_bundle(storage.local_file(log_key(run_id, REPLAY_BUNDLE)), device)
    if query_set not in built.query_sets:
        raise DvembError(
            f"the run's replay bundle has no query set {query_set!r} (it has {sorted(built.query_sets)}): write the "
            "bundle with that set's examples"
        )
    arguments = ReplayArguments(
        removal=removal,
        checkpoint_every=options.get("checkpoint_every"),
        probe=int(options.get("probe", 0)),
        autocast=built.autocast,
        micro_batches=built.micro_batches,
    )
    prefix = work_key(run_id, job_id, query_set)
    work = get_settings().scratch / "replays" / str(replay_id)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for key in storage.keys(prefix):  # what an earlier attempt left: resumed from
        (work / key.rsplit("/", 1)[-1]).write_bytes(storage.read_bytes(key))
    needed = {SUMMARY, OCCURRENCES, EXAMPLES, scores_file(query_set)}  # what the comparison reads
    with (
        storage.local_copy(log_key(run_id), keep=lambda name: not is_replay_bundle_name(name)) as log,
        storage.local_copy(results_key(run_id, job_id), keep=needed.__contains__) as out,
    ):
        schedule = schedule_from_log(log)
        progress = _Progress(replay_id, mine, schedule.num_steps, arguments.checkpoint_every)

        def saved(path: Path) -> None:
            storage.put_file(f"{prefix}/{path.name}", path)
            progress.saved(path.name)

        result = replay(
            built.model,
            built.optimizer,
            schedule,
            built.loss_fn,
            built.examples,
            built.query_sets[query_set],
            arguments,
            query_set=query_set,
            work_dir=work,
            on_saved=saved,
        )
        save_replay(result, out)
        record = trust(out, query_set)
        for name in (*replay_files(query_set), trust_file(query_set)):
            storage.put_file(results_key(run_id, job_id, name), out / name)
    shutil.rmtree(work, ignore_errors=True)
    probe = {k: v for k, v in result.record["probe"].items() if k != "records"}
    return record, {**result.record, "probe": probe, "device": device}


class _Progress:
    """The replay's share done, from the files it saves: the forward pass's checkpoints are the first half, the
    adjoint's finished segments the second."""

    def __init__(self, replay_id: int, mine: Any, steps: int, every: int | None) -> None:
        self.replay_id, self.mine, self.steps = replay_id, mine, steps
        self.segments = math.ceil(steps / checkpoint_spacing(steps, every))
        self.adjoint_saves = 0

    def saved(self, name: str) -> None:
        if name.startswith("state-"):
            stem = name.removeprefix("state-").removesuffix(".safetensors")
            share = 0.5 if stem == "final" else 0.5 * int(stem) / self.steps
        elif name.startswith("adjoint"):
            self.adjoint_saves += 1
            share = 0.5 + 0.5 * min(1.0, self.adjoint_saves / self.segments)
        else:
            return
        with session_factory()() as session:
            session.execute(
                update(ReplayJob)
                .where(ReplayJob.id == self.replay_id, ReplayJob.status == ReplayStatus.RUNNING, self.mine)
                .values(progress=min(share, 0.99))
            )
            session.commit()


def _fail(replay_id: int, mine: Any, problem: str) -> None:
    with session_factory()() as session:
        row = session.get(ReplayJob, replay_id)
        if row is not None:
            transition(
                session,
                row,
                ReplayStatus.FAILED,
                when=mine,
                error=problem,
                lease_expires_at=None,
                finished_at=dt.datetime.now(dt.UTC),
            )
        session.commit()
