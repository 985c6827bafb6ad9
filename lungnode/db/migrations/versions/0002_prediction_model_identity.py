"""prediction model identity

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 09:00:00.000000

The prediction row keeps the whole identity of the model that made it: the
synthetic flag, the intended use and what it was trained on join name,
version and SHA-256. Existing rows keep NULL there, which reads as "identity
not recorded"; nothing here guesses it from a bundle that may have changed.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("prediction", schema=None) as batch_op:
        batch_op.add_column(sa.Column("model_synthetic", sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column("model_intended_use", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("model_trained_on", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("prediction", schema=None) as batch_op:
        batch_op.drop_column("model_trained_on")
        batch_op.drop_column("model_intended_use")
        batch_op.drop_column("model_synthetic")
