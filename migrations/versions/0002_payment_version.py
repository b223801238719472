"""Add payments.version, bumped by every status change.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30

A reconciler reads a payment, asks the provider, and settles it only if the payment's
version is still the one it read: a re-submission in between (unknown -> pending ->
unknown) makes its "never saw it" verdict stale.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A plain ALTER TABLE ... ADD COLUMN: SQLite supports it for a column with a default,
    # and it keeps `alembic upgrade head --sql` working on SQLite.
    op.add_column(
        "payments", sa.Column("version", sa.Integer(), server_default=sa.text("0"), nullable=False)
    )


def downgrade() -> None:
    with op.batch_alter_table("payments") as batch:
        batch.drop_column("version")
