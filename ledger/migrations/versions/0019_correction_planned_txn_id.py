"""corrections.planned_txn_id: the highest ledger transaction id a proposal's plan saw

Posting refuses a line whose member-month has a payment (or a refund) recorded since the
plan that the plan did not take in (`payments_recorded_since_planned`). "Since" was read
from the wall clock alone (`recorded_at_us` after the proposal's time): a payment recorded
while the clock ran a minute behind was stamped before the plan, taken for planned, and
the month passed its cap (the operator audit: 21,550 under 20,000). Transaction ids only
grow, so a payment whose ledger transaction id is above the highest the plan saw was
recorded after it, whatever the clock said. NULL: proposed before this revision, checked
by the time alone, as before.

Revision ID: 0019
Revises: 0018
"""
import sqlalchemy as sa
from alembic import op

revision = '0019'
down_revision = '0018'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("corrections") as batch:
        batch.add_column(sa.Column("planned_txn_id", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("corrections") as batch:
        batch.drop_column("planned_txn_id")
