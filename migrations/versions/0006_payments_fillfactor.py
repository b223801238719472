"""Leave room on payments' pages, so a refund's reservation is a HOT update.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30

Every refund updates its payment's row twice (the reservation, then the refunded
amount), and the columns it changes are in no index. On a full page such an update still
writes a new entry into each of the payment's five indexes (random keys among them);
with free space on the page PostgreSQL keeps the new row version on the same page and
touches no index (a heap-only tuple). 85 % leaves that room. PostgreSQL only: SQLite has
no such setting.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FILLFACTOR = 85


def upgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE payments SET (fillfactor = {FILLFACTOR})")


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute("ALTER TABLE payments RESET (fillfactor)")
