"""withdrawals: a member's withdrawal of unspent charged money (잔액 환불)

A member could put money on the card and never take back what was left. From this
revision `POST /v1/members/{member_id}/withdrawals` returns the charged money left to
the member once the policy's share of the charged money put in since the last
withdrawal has been used (docs/design.md, "Withdrawals"). Each request is a row here,
its idempotency record (request hash and stored answer), approved or declined as a
top-up is; an approved one is also a ledger transaction of kind `withdrawal` (Dr the
member's charged money, Cr `operator/cash`).

Revision ID: 0016
Revises: 0015
"""
import sqlalchemy as sa
from alembic import op

revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('withdrawals',
    sa.Column('withdrawal_id', sa.String(length=64), nullable=False),
    sa.Column('request_hash', sa.String(length=64), nullable=False),
    sa.Column('member_id', sa.String(length=64), nullable=False),
    sa.Column('requested_won', sa.BigInteger(), nullable=True),
    sa.Column('amount_won', sa.BigInteger(), nullable=False),
    sa.Column('charged_in_won', sa.BigInteger(), nullable=False),
    sa.Column('occurred_at_us', sa.BigInteger(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('decline_code', sa.String(length=64), nullable=True),
    sa.Column('policy_id', sa.String(length=64), nullable=True),
    sa.Column('response', sa.Text(), nullable=False),
    sa.Column('recorded_at_us', sa.BigInteger(), nullable=False),
    sa.CheckConstraint('amount_won >= 0 AND amount_won <= charged_in_won', name=op.f('ck_withdrawals_amount')),
    sa.PrimaryKeyConstraint('withdrawal_id', name=op.f('pk_withdrawals'))
    )
    op.create_index('ix_withdrawals_member', 'withdrawals', ['member_id'], unique=False)


def downgrade() -> None:
    # An approved withdrawal's ledger transaction outlives the table: without its row the
    # book check fails and a resend of it would be answered anew (declined, nothing to
    # withdraw). Refuse rather than drop the records of money that was paid out.
    bind = op.get_bind()
    if bind.execute(sa.text("SELECT count(*) FROM withdrawals")).scalar():
        raise RuntimeError("withdrawals holds members' withdrawals; downgrading below 0016 would drop their records "
                           "and stored answers while their ledger transactions stay (restore a backup instead)")
    op.drop_index('ix_withdrawals_member', table_name='withdrawals')
    op.drop_table('withdrawals')
