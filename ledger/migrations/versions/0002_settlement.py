"""settlement: settlements, coverage, merchant payouts, reopen requests

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 03:40:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('settlements',
    sa.Column('settlement_id', sa.String(length=64), nullable=False),
    sa.Column('business_date', sa.String(length=10), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('watermark_us', sa.BigInteger(), nullable=False),
    sa.Column('prev_watermark_us', sa.BigInteger(), nullable=False),
    sa.Column('watermark_txn_id', sa.BigInteger(), nullable=True),
    sa.Column('payout_date', sa.String(length=10), nullable=False),
    sa.Column('totals', sa.Text(), nullable=False),
    sa.Column('checks', sa.Text(), nullable=False),
    sa.Column('config', sa.Text(), nullable=False),
    sa.Column('run_by', sa.String(length=200), nullable=False),
    sa.Column('created_at_us', sa.BigInteger(), nullable=False),
    sa.CheckConstraint("status IN ('settled', 'failed', 'reopened', 'superseded')", name=op.f('ck_settlements_status')),
    sa.CheckConstraint("kind IN ('day', 'correction')", name=op.f('ck_settlements_kind')),
    sa.CheckConstraint('watermark_us >= prev_watermark_us', name=op.f('ck_settlements_window')),
    sa.PrimaryKeyConstraint('settlement_id', name=op.f('pk_settlements')),
    sa.UniqueConstraint('business_date', 'version', name='uq_settlements_date_version')
    )
    op.create_index('ix_settlements_status', 'settlements', ['status', 'watermark_us'], unique=False)
    op.create_table('settlement_coverage',
    sa.Column('settlement_id', sa.String(length=64), nullable=False),
    sa.Column('business_date', sa.String(length=10), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('txn_count', sa.BigInteger(), nullable=False),
    sa.Column('from_us', sa.BigInteger(), nullable=True),
    sa.Column('to_us', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('settlement_id', 'business_date', name=op.f('pk_settlement_coverage'))
    )
    op.create_table('settlement_payouts',
    sa.Column('settlement_id', sa.String(length=64), nullable=False),
    sa.Column('for_business_date', sa.String(length=10), nullable=False),
    sa.Column('merchant_id', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('payment_count', sa.BigInteger(), nullable=False),
    sa.Column('refund_count', sa.BigInteger(), nullable=False),
    sa.Column('sales_won', sa.BigInteger(), nullable=False),
    sa.Column('refunds_won', sa.BigInteger(), nullable=False),
    sa.Column('net_sales_won', sa.BigInteger(), nullable=False),
    sa.Column('fee_bp', sa.Integer(), nullable=False),
    sa.Column('fee_won', sa.BigInteger(), nullable=False),
    sa.Column('merchant_share_won', sa.BigInteger(), nullable=False),
    sa.Column('net_payable_won', sa.BigInteger(), nullable=False),
    sa.Column('payout_date', sa.String(length=10), nullable=False),
    sa.CheckConstraint('net_payable_won = net_sales_won - fee_won - merchant_share_won', name=op.f('ck_settlement_payouts_net')),
    sa.PrimaryKeyConstraint('settlement_id', 'for_business_date', 'merchant_id', name=op.f('pk_settlement_payouts'))
    )
    op.create_index('ix_settlement_payouts_merchant', 'settlement_payouts', ['merchant_id', 'for_business_date'], unique=False)
    op.create_table('settlement_reopen_requests',
    sa.Column('request_id', sa.String(length=64), nullable=False),
    sa.Column('settlement_id', sa.String(length=64), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('requested_by', sa.String(length=200), nullable=False),
    sa.Column('requested_at_us', sa.BigInteger(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('decided_by', sa.String(length=200), nullable=True),
    sa.Column('decided_at_us', sa.BigInteger(), nullable=True),
    sa.CheckConstraint("status IN ('pending', 'approved', 'rejected')", name=op.f('ck_settlement_reopen_requests_status')),
    sa.CheckConstraint('decided_by IS NULL OR decided_by <> requested_by', name=op.f('ck_settlement_reopen_requests_second_person')),
    sa.PrimaryKeyConstraint('request_id', name=op.f('pk_settlement_reopen_requests'))
    )
    op.create_index('ix_settlement_reopen_requests_settlement', 'settlement_reopen_requests', ['settlement_id'], unique=False)
    # Read paths over the book of record (indexes only; the ledger's rows are untouched).
    op.create_index('ix_ledger_txns_recorded', 'ledger_txns', ['recorded_at_us'], unique=False)
    op.create_index('ix_payments_occurred', 'payments', ['occurred_at_us'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_payments_occurred', table_name='payments')
    op.drop_index('ix_ledger_txns_recorded', table_name='ledger_txns')
    op.drop_index('ix_settlement_reopen_requests_settlement', table_name='settlement_reopen_requests')
    op.drop_table('settlement_reopen_requests')
    op.drop_index('ix_settlement_payouts_merchant', table_name='settlement_payouts')
    op.drop_table('settlement_payouts')
    op.drop_table('settlement_coverage')
    op.drop_index('ix_settlements_status', table_name='settlements')
    op.drop_table('settlements')
