"""example ranking indexes end with example_id: a page of examples ranked by total (ties by id) is read from the
index in either direction, instead of sorting every example of the set (issue 25.5)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 09:10:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = {
    "ix_example_totals_ranking": ["job_id", "query_set", "total"],
    "ix_example_totals_label": ["job_id", "query_set", "label", "total"],
    "ix_example_totals_source": ["job_id", "query_set", "source", "total"],
}


def upgrade() -> None:
    with op.batch_alter_table("example_totals", schema=None) as batch_op:
        for name, columns in INDEXES.items():
            batch_op.drop_index(name)
            batch_op.create_index(name, [*columns, "example_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("example_totals", schema=None) as batch_op:
        for name, columns in INDEXES.items():
            batch_op.drop_index(name)
            batch_op.create_index(name, columns, unique=False)
