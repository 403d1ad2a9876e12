"""log_files.lease_expires_at and attempts: a validator's lease, renewed by its heartbeat, and its attempts

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 16:00:00
"""

import datetime as dt
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DEFAULT_LEASE_SECONDS = 30  # a copy, not an import: a migration stays as it was written


def upgrade() -> None:
    with op.batch_alter_table("log_files", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
    # A file left 'validating' before this revision has no lease. Its validator may be dead (then the reconciler
    # must queue it again) or, during a rolling deploy, alive and running the old code, which renews no lease and
    # writes its verdict without a claim check: an expired lease would have the file validated twice at once.
    # A full lease of the default DVEMB_JOB_LEASE_SECONDS (30 s, server/settings.py) gives a live one time to
    # finish first; docs/service.md asks for the validators to be upgraded together.
    log_files = sa.table(
        "log_files", sa.column("status", sa.String()), sa.column("lease_expires_at", sa.DateTime(timezone=True))
    )
    lease = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=DEFAULT_LEASE_SECONDS)
    op.execute(log_files.update().where(log_files.c.status == "validating").values(lease_expires_at=lease))


def downgrade() -> None:
    with op.batch_alter_table("log_files", schema=None) as batch_op:
        batch_op.drop_column("attempts")
        batch_op.drop_column("lease_expires_at")
