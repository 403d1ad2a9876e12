"""topk_windows and window_topk_rows: top examples per phase, tenth of training, epoch or step range

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 13:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "topk_windows",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("query_set", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("step_min", sa.Integer(), nullable=False),
        sa.Column("step_max", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("top_k", sa.Integer(), nullable=False),
        sa.Column("occurrences", sa.BigInteger(), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_topk_windows_job_id_jobs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_topk_windows")),
        sa.UniqueConstraint("job_id", "query_set", "kind", "step_min", "step_max", "epoch", name="uq_topk_windows_key"),
    )
    with op.batch_alter_table("topk_windows", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_topk_windows_job_id"), ["job_id"], unique=False)
    op.create_table(
        "window_topk_rows",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("window_id", sa.Integer(), nullable=False),
        sa.Column("query", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("row", sa.BigInteger(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("example_id", sa.String(length=255), nullable=False),
        sa.Column("label", sa.String(length=255), nullable=True),
        sa.Column("source", sa.String(length=255), nullable=True),
        sa.ForeignKeyConstraint(
            ["window_id"],
            ["topk_windows.id"],
            name=op.f("fk_window_topk_rows_window_id_topk_windows"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_window_topk_rows")),
        sa.UniqueConstraint("window_id", "query", "kind", "rank", name="uq_window_topk_rows_position"),
    )


def downgrade() -> None:
    op.drop_table("window_topk_rows")
    with op.batch_alter_table("topk_windows", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_topk_windows_job_id"))
    op.drop_table("topk_windows")
