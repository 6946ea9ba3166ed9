"""correction_payments.base: the right policy's base for each corrected payment

A correction moved a payment's cashback and its member-month's cashback counters, but not
the payment's base nor whether it counted toward the month, nor the month's eligible
spend: a right policy that counted a payment the wrong one did not (a higher sales
ceiling) left the month's band position where the wrong policy had it, and a later
payment in the month earned the band room again, past the monthly cap (300,000 at a
40억 merchant counted at a 50억 ceiling: the month's eligible spend stayed 300,000, not
600,000, and 200,000 more earned 20,000 over the 50,000 cap). From this revision a
proposal records, per payment, whether the right policy counts it toward the month and
the balances it earns cashback on; posting re-bases the payment's `base_won`,
`counts_toward_month` and the base its refunds gave back on them, and moves the month's
eligible spend by the difference (docs/design.md, "Corrections").

Rows planned before this revision have NULL there: a correction proposed before it and
not yet approved is refused at approval (propose it again); the rest of one approved
before it posts as before, the payments' base left as it was.

Revision ID: 0017
Revises: 0016
"""
import sqlalchemy as sa
from alembic import op

revision = '0017'
down_revision = '0016'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('correction_payments') as batch:
        batch.add_column(sa.Column('base', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('correction_payments') as batch:
        batch.drop_column('base')
