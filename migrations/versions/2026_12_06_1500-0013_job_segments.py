"""job_segments: the segments of a segmented job, claimed through the database (issue 25: workers on machines that
share no filesystem)

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06 15:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "job_segments",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("segment", sa.Integer(), nullable=False),
        sa.Column("plan", sa.String(64), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("process", sa.String(300), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.UniqueConstraint("job_id", "segment", name="uq_job_segments_segment"),
    )
    op.create_index("ix_job_segments_job_id", "job_segments", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_job_segments_job_id", table_name="job_segments")
    op.drop_table("job_segments")
