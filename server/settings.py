"""Service settings, read from ``DVEMB_*`` environment variables (the core library reads none).

With nothing set, everything lives under ``./dvemb-data``: a SQLite database, a filesystem broker
and a local storage directory (the embedded mode). The distributed mode sets
``DVEMB_DATABASE_URL`` (Postgres), ``DVEMB_BROKER_URL`` (Redis) and ``DVEMB_STORAGE_URL`` (an S3-compatible
bucket, ``s3://bucket/prefix``) or ``DVEMB_STORAGE_DIR`` (a volume shared with every worker).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, ValidationError
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, SettingsConfigDict


class SettingsError(ValueError):
    """A ``DVEMB_*`` variable holds a value the service cannot use (the message names it and what is expected)."""


class Settings(BaseSettings):
    """All service settings; see docs/service.md."""

    model_config = SettingsConfigDict(env_prefix="DVEMB_", extra="ignore")

    data_dir: Path = Path("dvemb-data")
    database_url: str | None = None
    # PostgreSQL connections of one process: each of its two pools (the ORM's and the hot reads') keeps up to
    # pool_size and opens up to max_overflow more under load, so a process holds at most
    # 2 x (pool_size + max_overflow); a request finding its pool spent waits pool_timeout_seconds, then is answered
    # 503 (busy). Size them so that every API process and worker together stay under the server's max_connections
    # (docs/service.md, "Database connections").
    database_pool_size: int = Field(default=20, ge=1)
    database_max_overflow: int = Field(default=20, ge=0)
    database_pool_timeout_seconds: float = Field(default=30.0, gt=0)
    broker_url: str | None = None
    storage_dir: Path | None = None
    storage_url: str | None = None  # s3://bucket/prefix: logs and results in an S3-compatible bucket (endpoint and
    # credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ALLOW_HTTP)
    scratch_dir: Path | None = None  # this machine's copies of objects (the cache) and jobs' working directories
    cache_bytes: int = 16 << 30  # the cache of objects read from a bucket stays under this (least recently used go)
    max_file_bytes: int = 64 << 30
    max_run_bytes: int = 1 << 40
    max_files_per_run: int = 100_000
    max_pending_files: int = 500  # files of one project waiting for the validator (or their manifest) at once
    max_request_bytes: int = 32 << 20  # any request body but an upload's data (JSON is parsed whole)
    task_visibility_timeout: int = 3600  # seconds before an unacknowledged task of a lost worker is redelivered
    task_restore_interval: int = 10  # seconds between the Redis broker's sweeps for such tasks
    job_lease_seconds: float = 30.0  # a running job's worker renews its lease every third of this; a task
    # delivered again while the lease is alive waits (the broker redelivers long jobs), one whose lease expired
    # takes over (its worker died)
    task_max_attempts: int = 3  # a job whose worker dies this many times fails with the reason
    compute_workers: int = 1  # worker processes that compute jobs: a job whose options do not set `segments`
    # is split into this many segments, run in parallel and combined exactly (docs/service.md)
    task_deadline_seconds: float = Field(default=300.0, gt=0)  # a queued job or received file not claimed by a
    # worker this long after its task was sent has its task sent again (then after as long as it has waited)
    reconcile_seconds: float = 5.0  # the API's reconciler looks this often for unsent tasks and expired leases
    outbox_grace_seconds: float = 10.0  # an outbox entry is the reconciler's once it is this old (before that,
    # the request that wrote it is sending it)
    upload_idle_seconds: float = 30.0  # a PATCH whose client sends nothing this long ends (offset kept)
    validation_wait_seconds: float = 60.0  # the last upload PATCH waits this long for the validator's verdict
    compare_timeout_seconds: float = Field(default=30.0, ge=0)  # PostgreSQL stops a comparison's statements past this
    # (GET /compare and its exports answer 504 then); 0: no limit
    read_timeout_seconds: float = Field(default=15.0, ge=0)  # ... every other GET's statements, hot reads included
    write_timeout_seconds: float = Field(default=300.0, ge=0)  # ... a POST, PATCH or DELETE's (a large run's
    # deletion removes millions of result rows)

    @property
    def database(self) -> str:
        """The SQLAlchemy URL: the setting, or a SQLite file in the data directory."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'dvemb.db').resolve()}"

    @property
    def broker(self) -> str:
        """The Celery broker: the setting, or kombu's filesystem transport in the data directory."""
        return self.broker_url or "filesystem://"

    @property
    def broker_folder(self) -> Path:
        """Folder of the filesystem broker (embedded mode)."""
        return (self.data_dir / "broker").resolve()

    @property
    def storage(self) -> Path:
        """Root of stored logs and results when they are in a local directory (no ``storage_url``)."""
        return (self.storage_dir or self.data_dir / "storage").resolve()

    @property
    def scratch(self) -> Path:
        """This machine's scratch directory (used with a bucket)."""
        return (self.scratch_dir or self.data_dir / "scratch").resolve()


@lru_cache
def get_settings() -> Settings:
    """The process's settings (cached; tests clear the cache after changing the environment).

    Raises:
        SettingsError: a ``DVEMB_*`` variable holds a value the service cannot use; the message names each variable,
            the value found and what is expected (pydantic's own message names the field, not the variable).
    """
    try:
        return Settings()
    except ValidationError as exc:
        found = "; ".join(_in_words(error) for error in exc.errors())
        raise SettingsError(f"{found} (docs/service.md lists the settings)") from None


def _in_words(error: ErrorDetails) -> str:
    variable = "DVEMB_" + "_".join(str(part) for part in error["loc"]).upper()
    return f"{variable}={error.get('input')!r}: {error['msg'].lower()}"
