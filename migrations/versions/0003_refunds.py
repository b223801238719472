"""Add refunds (with their attempts and events) and the refund ceiling on payments.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30

``payments.refund_reserved_minor`` holds the amount of every refund that is or may be
moving money; ``amount_refunded_minor`` the part the provider confirmed. A CHECK keeps
``0 <= refunded <= reserved <= amount`` whatever the code does. A frozen copy of the
definitions, like 0001.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATES = "'pending', 'succeeded', 'failed', 'unknown'"
SERIAL = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
CEILING = (
    "0 <= amount_refunded_minor AND amount_refunded_minor <= refund_reserved_minor "
    "AND refund_reserved_minor <= amount_minor"
)
CEILING_NAME = "ck_payments_refunds_within_amount"


def upgrade() -> None:
    op.add_column(
        "payments",
        sa.Column(
            "refund_reserved_minor", sa.BigInteger(), server_default=sa.text("0"), nullable=False
        ),
    )
    if op.get_context().dialect.name == "sqlite":
        # SQLite adds no table constraint to an existing table, but takes a column's CHECK
        # in ADD COLUMN (and keeps `alembic upgrade head --sql` working, no table copy).
        op.execute(
            "ALTER TABLE payments ADD COLUMN amount_refunded_minor BIGINT DEFAULT 0 NOT NULL "
            f"CONSTRAINT {CEILING_NAME} CHECK ({CEILING})"
        )
    else:
        op.add_column(
            "payments",
            sa.Column(
                "amount_refunded_minor",
                sa.BigInteger(),
                server_default=sa.text("0"),
                nullable=False,
            ),
        )
        op.create_check_constraint(op.f(CEILING_NAME), "payments", CEILING)

    op.create_table(
        "refunds",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("payment_id", sa.String(40), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=False),
        sa.Column("request_fingerprint", sa.String(64), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("metadata_json", sa.Text(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("provider_refund_id", sa.String(255), nullable=True),
        sa.Column("failure_code", sa.String(64), nullable=True),
        sa.Column("failure_message", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reconcile_lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("version", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.CheckConstraint("amount_minor > 0", name=op.f("ck_refunds_amount_positive")),
        sa.CheckConstraint(f"status IN ({STATES})", name=op.f("ck_refunds_status_valid")),
        sa.ForeignKeyConstraint(
            ["payment_id"], ["payments.id"], name=op.f("fk_refunds_payment_id_payments")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_refunds")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_refunds_idempotency_key")),
    )
    op.create_index(op.f("ix_refunds_payment_id"), "refunds", ["payment_id"])
    op.create_index(op.f("ix_refunds_status_updated_at"), "refunds", ["status", "updated_at"])

    op.create_table(
        "refund_attempts",
        sa.Column("id", SERIAL, autoincrement=True, nullable=False),
        sa.Column("refund_id", sa.String(40), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("error", sa.String(255), nullable=True),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.CheckConstraint(
            "kind IN ('refund', 'lookup')", name=op.f("ck_refund_attempts_kind_valid")
        ),
        sa.ForeignKeyConstraint(
            ["refund_id"], ["refunds.id"], name=op.f("fk_refund_attempts_refund_id_refunds")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_refund_attempts")),
    )
    op.create_index(op.f("ix_refund_attempts_refund_id"), "refund_attempts", ["refund_id"])

    op.create_table(
        "refund_events",
        sa.Column("id", SERIAL, autoincrement=True, nullable=False),
        sa.Column("refund_id", sa.String(40), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("from_status", sa.String(16), nullable=True),
        sa.Column("to_status", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(255), nullable=True),
        sa.CheckConstraint(
            f"to_status IN ({STATES})", name=op.f("ck_refund_events_to_status_valid")
        ),
        sa.ForeignKeyConstraint(
            ["refund_id"], ["refunds.id"], name=op.f("fk_refund_events_refund_id_refunds")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_refund_events")),
    )
    op.create_index(op.f("ix_refund_events_refund_id"), "refund_events", ["refund_id"])


def downgrade() -> None:
    for table in ("refund_events", "refund_attempts"):
        op.drop_index(op.f(f"ix_{table}_refund_id"), table_name=table)
        op.drop_table(table)
    op.drop_index(op.f("ix_refunds_status_updated_at"), table_name="refunds")
    op.drop_index(op.f("ix_refunds_payment_id"), table_name="refunds")
    op.drop_table("refunds")
    with op.batch_alter_table("payments") as batch:
        batch.drop_constraint(op.f(CEILING_NAME), type_="check")
        batch.drop_column("amount_refunded_minor")
        batch.drop_column("refund_reserved_minor")
