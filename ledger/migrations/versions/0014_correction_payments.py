"""correction_payments: each correction line's part per payment

A correction was posted per member-month only, so a later refund of one of its payments
clawed back from the payment's original cashback lines: what the correction had already
taken was taken again (or, when the counters or the funders' month accounts could not
go that low, the refund was refused forever). From this revision a proposal records,
per payment, its share of the line by (component, funder) and the refunded amount the
plan saw; posting the line re-bases each payment's cashback on it (the payment's
`refund_state` carries `corrected`), and refunds claw back from that.

Corrections posted before this revision have no such rows: their payments' refunds claw
back as before, limited to what the funders' month accounts and the month counters hold
(docs/design.md, "Corrections"). A correction proposed before it and not yet approved is
refused at approval (propose it again).

Revision ID: 0014
Revises: 0013
"""
import sqlalchemy as sa
from alembic import op

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('correction_payments',
    sa.Column('line_id', sa.String(length=200), nullable=False),
    sa.Column('payment_id', sa.String(length=64), nullable=False),
    sa.Column('refunded_won', sa.BigInteger(), nullable=False),
    sa.Column('deltas', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('line_id', 'payment_id', name=op.f('pk_correction_payments'))
    )
    op.create_index('ix_correction_payments_payment', 'correction_payments', ['payment_id'], unique=False)


def downgrade() -> None:
    # A proposed line is posted from these rows, and they are the record of each posted
    # line's part per payment (which its payments were re-based on): refuse rather than
    # drop them, as 0016 refuses to drop withdrawals.
    bind = op.get_bind()
    if bind.execute(sa.text("SELECT count(*) FROM correction_payments")).scalar():
        raise RuntimeError("correction_payments holds corrections' parts per payment; downgrading below 0014 would "
                           "drop them (restore a backup instead)")
    op.drop_index('ix_correction_payments_payment', table_name='correction_payments')
    op.drop_table('correction_payments')
