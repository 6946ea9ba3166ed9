"""ledger_txns.ref as wide as the composite keys it holds

A ledger transaction's `ref` is its command's idempotency key: a caller's id (1–64
characters) for top-ups, payments, refunds, withdrawals and grants, but
`program_id/member_id` (up to 129) for an expired grant lot and
`correction_id/member_id/month` (up to 137) for a correction line. The column held 64,
so on PostgreSQL the expiry of a program with a long-id recipient, and the posting of a
correction covering a long-id member, failed their whole batch (string data right
truncation) every time they were run: the program never expired and the correction
never posted. 200, as `correction_lines.line_id`. Widening a varchar does not rewrite the
table on PostgreSQL; SQLite does not enforce the length, so nothing changes there.

Revision ID: 0018
Revises: 0017
"""
import sqlalchemy as sa
from alembic import op

revision = '0018'
down_revision = '0017'
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.alter_column("ledger_txns", "ref", type_=sa.String(200), existing_type=sa.String(64), existing_nullable=False)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    long = op.get_bind().execute(sa.text("SELECT count(*) FROM ledger_txns WHERE length(ref) > 64")).scalar_one()
    if long:
        raise RuntimeError(f"{long} ledger transaction(s) have a ref longer than 64 characters (an expired lot or "
                           "a correction line of long ids): 0017 cannot hold them; not downgraded")
    op.alter_column("ledger_txns", "ref", type_=sa.String(64), existing_type=sa.String(200), existing_nullable=False)
