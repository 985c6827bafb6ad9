"""delivery commitment: the Storage Commitment transaction of a delivery and when its report is due

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("delivery", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("commit_transaction_uid", sa.String(length=64), nullable=True)
        )
        batch_op.add_column(sa.Column("commit_due_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_delivery_commit_transaction_uid"),
            ["commit_transaction_uid"],
            unique=False,
        )
        batch_op.create_index(
            batch_op.f("ix_delivery_commit_due_at"), ["commit_due_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("delivery", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_delivery_commit_due_at"))
        batch_op.drop_index(batch_op.f("ix_delivery_commit_transaction_uid"))
        batch_op.drop_column("commit_due_at")
        batch_op.drop_column("commit_transaction_uid")
