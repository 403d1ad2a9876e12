"""log_files.lease_expires_at and attempts: a validator's lease, renewed by its heartbeat, and its attempts

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 16:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("log_files", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
    # A file left 'validating' by a validator that died before this revision has no lease: an expired one lets
    # the reconciler queue it again.
    op.execute("UPDATE log_files SET lease_expires_at = CURRENT_TIMESTAMP WHERE status = 'validating'")


def downgrade() -> None:
    with op.batch_alter_table("log_files", schema=None) as batch_op:
        batch_op.drop_column("attempts")
        batch_op.drop_column("lease_expires_at")
