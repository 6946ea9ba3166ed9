"""book of record

Revision ID: 0001
Revises: 
Create Date: 2026-11-22 03:15:09.843743
"""
from alembic import op

from ledger.migrations.guards import create_guards, drop_guards
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('accounts',
    sa.Column('account_id', sa.String(length=200), nullable=False),
    sa.Column('type', sa.String(length=16), nullable=False),
    sa.Column('owner_id', sa.String(length=64), nullable=True),
    sa.Column('balance_won', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('floor_zero', sa.Boolean(), nullable=False),
    sa.CheckConstraint("type IN ('asset', 'liability', 'income', 'expense', 'equity')", name=op.f('ck_accounts_type')),
    sa.CheckConstraint('NOT floor_zero OR balance_won >= 0', name=op.f('ck_accounts_floor')),
    sa.PrimaryKeyConstraint('account_id', name=op.f('pk_accounts'))
    )
    with op.batch_alter_table('accounts', schema=None) as batch_op:
        batch_op.create_index('ix_accounts_owner', ['owner_id'], unique=False)

    op.create_table('api_keys',
    sa.Column('key_id', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('role', sa.String(length=32), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('created_at_us', sa.BigInteger(), nullable=False),
    sa.Column('expires_at_us', sa.BigInteger(), nullable=True),
    sa.Column('revoked_at_us', sa.BigInteger(), nullable=True),
    sa.PrimaryKeyConstraint('key_id', name=op.f('pk_api_keys')),
    sa.UniqueConstraint('key_hash', name=op.f('uq_api_keys_key_hash'))
    )
    op.create_table('audit_log',
    sa.Column('entry_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('at_us', sa.BigInteger(), nullable=False),
    sa.Column('actor', sa.String(length=200), nullable=False),
    sa.Column('action', sa.String(length=64), nullable=False),
    sa.Column('object_type', sa.String(length=32), nullable=False),
    sa.Column('object_id', sa.String(length=200), nullable=False),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.Column('prev_hash', sa.String(length=64), nullable=False),
    sa.Column('entry_hash', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('entry_id', name=op.f('pk_audit_log'))
    )
    op.create_table('budgets',
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('period', sa.String(length=7), nullable=False),
    sa.Column('limit_won', sa.BigInteger(), nullable=True),
    sa.Column('committed_won', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('updated_at_us', sa.BigInteger(), nullable=False),
    sa.CheckConstraint('committed_won >= 0', name=op.f('ck_budgets_committed')),
    sa.CheckConstraint('limit_won IS NULL OR committed_won <= limit_won', name=op.f('ck_budgets_within_limit')),
    sa.PrimaryKeyConstraint('source', 'period', name=op.f('pk_budgets'))
    )
    op.create_table('grant_disbursements',
    sa.Column('disbursement_id', sa.String(length=64), nullable=False),
    sa.Column('request_hash', sa.String(length=64), nullable=False),
    sa.Column('program_id', sa.String(length=64), nullable=False),
    sa.Column('member_id', sa.String(length=64), nullable=False),
    sa.Column('amount_won', sa.BigInteger(), nullable=False),
    sa.Column('response', sa.Text(), nullable=False),
    sa.Column('recorded_at_us', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('disbursement_id', name=op.f('pk_grant_disbursements'))
    )
    with op.batch_alter_table('grant_disbursements', schema=None) as batch_op:
        batch_op.create_index('ix_grant_disbursements_program', ['program_id'], unique=False)

    op.create_table('grant_programs',
    sa.Column('program_id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('document', sa.Text(), nullable=False),
    sa.Column('valid_from_us', sa.BigInteger(), nullable=False),
    sa.Column('valid_until_us', sa.BigInteger(), nullable=False),
    sa.Column('status', sa.String(length=16), server_default='open', nullable=False),
    sa.Column('created_by', sa.String(length=64), nullable=False),
    sa.Column('created_at_us', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('program_id', name=op.f('pk_grant_programs'))
    )
    op.create_table('ledger_txns',
    sa.Column('txn_id', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('ref', sa.String(length=64), nullable=False),
    sa.Column('member_id', sa.String(length=64), nullable=True),
    sa.Column('merchant_id', sa.String(length=64), nullable=True),
    sa.Column('occurred_at_us', sa.BigInteger(), nullable=False),
    sa.Column('business_date', sa.String(length=10), nullable=False),
    sa.Column('recorded_at_us', sa.BigInteger(), nullable=False),
    sa.Column('leg_count', sa.SmallInteger(), nullable=False),
    sa.Column('memo', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('txn_id', name=op.f('pk_ledger_txns'))
    )
    with op.batch_alter_table('ledger_txns', schema=None) as batch_op:
        batch_op.create_index('ix_ledger_txns_date', ['business_date'], unique=False)
        batch_op.create_index('ix_ledger_txns_member', ['member_id', 'txn_id'], unique=False)

    op.create_table('member_months',
    sa.Column('member_id', sa.String(length=64), nullable=False),
    sa.Column('month', sa.String(length=7), nullable=False),
    sa.Column('eligible_spend_won', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('cashback_won', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('topped_up_won', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('component_cashback', sa.Text(), server_default='{}', nullable=False),
    sa.CheckConstraint('eligible_spend_won >= 0 AND cashback_won >= 0 AND topped_up_won >= 0', name=op.f('ck_member_months_nonneg')),
    sa.PrimaryKeyConstraint('member_id', 'month', name=op.f('pk_member_months'))
    )
    op.create_table('members',
    sa.Column('member_id', sa.String(length=64), nullable=False),
    sa.Column('district', sa.String(length=16), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('created_at_us', sa.BigInteger(), nullable=False),
    sa.Column('updated_at_us', sa.BigInteger(), nullable=False),
    sa.CheckConstraint("status IN ('active', 'suspended')", name=op.f('ck_members_status')),
    sa.PrimaryKeyConstraint('member_id', name=op.f('pk_members'))
    )
    op.create_table('merchants',
    sa.Column('merchant_id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('district', sa.String(length=16), nullable=False),
    sa.Column('category', sa.String(length=64), nullable=False),
    sa.Column('annual_sales_won', sa.BigInteger(), nullable=False),
    sa.Column('registered_from', sa.String(length=10), nullable=False),
    sa.Column('flags', sa.String(length=400), server_default='', nullable=False),
    sa.Column('merchant_share_bp', sa.Integer(), server_default='0', nullable=False),
    sa.Column('updated_at_us', sa.BigInteger(), nullable=False),
    sa.CheckConstraint('annual_sales_won >= 0', name=op.f('ck_merchants_sales')),
    sa.CheckConstraint('merchant_share_bp BETWEEN 0 AND 10000', name=op.f('ck_merchants_share')),
    sa.PrimaryKeyConstraint('merchant_id', name=op.f('pk_merchants'))
    )
    op.create_table('payments',
    sa.Column('payment_id', sa.String(length=64), nullable=False),
    sa.Column('request_hash', sa.String(length=64), nullable=False),
    sa.Column('member_id', sa.String(length=64), nullable=False),
    sa.Column('merchant_id', sa.String(length=64), nullable=False),
    sa.Column('amount_won', sa.BigInteger(), nullable=False),
    sa.Column('occurred_at_us', sa.BigInteger(), nullable=False),
    sa.Column('month', sa.String(length=7), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('decline_code', sa.String(length=64), nullable=True),
    sa.Column('policy_id', sa.String(length=64), nullable=True),
    sa.Column('base_won', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('counts_toward_month', sa.Boolean(), server_default='0', nullable=False),
    sa.Column('cashback_won', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.Column('refunded_won', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('refund_state', sa.Text(), server_default='{}', nullable=False),
    sa.Column('response', sa.Text(), nullable=False),
    sa.Column('recorded_at_us', sa.BigInteger(), nullable=False),
    sa.CheckConstraint('refunded_won >= 0 AND refunded_won <= amount_won', name=op.f('ck_payments_refunded')),
    sa.PrimaryKeyConstraint('payment_id', name=op.f('pk_payments'))
    )
    with op.batch_alter_table('payments', schema=None) as batch_op:
        batch_op.create_index('ix_payments_member', ['member_id'], unique=False)

    op.create_table('policies',
    sa.Column('policy_id', sa.String(length=64), nullable=False),
    sa.Column('document', sa.Text(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('origin', sa.String(length=16), nullable=False),
    sa.Column('author', sa.String(length=200), nullable=False),
    sa.Column('approver', sa.String(length=200), nullable=True),
    sa.Column('effective_from_us', sa.BigInteger(), nullable=True),
    sa.Column('supersedes', sa.String(length=64), nullable=True),
    sa.Column('created_at_us', sa.BigInteger(), nullable=False),
    sa.Column('updated_at_us', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('policy_id', name=op.f('pk_policies'))
    )
    op.create_table('refunds',
    sa.Column('refund_id', sa.String(length=64), nullable=False),
    sa.Column('request_hash', sa.String(length=64), nullable=False),
    sa.Column('payment_id', sa.String(length=64), nullable=False),
    sa.Column('amount_won', sa.BigInteger(), nullable=False),
    sa.Column('occurred_at_us', sa.BigInteger(), nullable=False),
    sa.Column('clawback_won', sa.BigInteger(), nullable=False),
    sa.Column('response', sa.Text(), nullable=False),
    sa.Column('recorded_at_us', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('refund_id', name=op.f('pk_refunds'))
    )
    with op.batch_alter_table('refunds', schema=None) as batch_op:
        batch_op.create_index('ix_refunds_payment', ['payment_id'], unique=False)

    op.create_table('topups',
    sa.Column('topup_id', sa.String(length=64), nullable=False),
    sa.Column('request_hash', sa.String(length=64), nullable=False),
    sa.Column('member_id', sa.String(length=64), nullable=False),
    sa.Column('amount_won', sa.BigInteger(), nullable=False),
    sa.Column('occurred_at_us', sa.BigInteger(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('decline_code', sa.String(length=64), nullable=True),
    sa.Column('response', sa.Text(), nullable=False),
    sa.Column('recorded_at_us', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('topup_id', name=op.f('pk_topups'))
    )
    op.create_table('ledger_legs',
    sa.Column('txn_id', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('leg_no', sa.SmallInteger(), autoincrement=False, nullable=False),
    sa.Column('account_id', sa.String(length=200), nullable=False),
    sa.Column('amount_won', sa.BigInteger(), nullable=False),
    sa.CheckConstraint('amount_won <> 0', name=op.f('ck_ledger_legs_nonzero')),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.account_id'], name=op.f('fk_ledger_legs_account_id_accounts'), initially='DEFERRED', deferrable=True),
    sa.ForeignKeyConstraint(['txn_id'], ['ledger_txns.txn_id'], name=op.f('fk_ledger_legs_txn_id_ledger_txns'), initially='DEFERRED', deferrable=True),
    sa.PrimaryKeyConstraint('txn_id', 'leg_no', name=op.f('pk_ledger_legs'))
    )
    create_guards(op.get_bind())


def downgrade() -> None:
    drop_guards(op.get_bind())
    op.drop_table('ledger_legs')
    op.drop_table('topups')
    with op.batch_alter_table('refunds', schema=None) as batch_op:
        batch_op.drop_index('ix_refunds_payment')

    op.drop_table('refunds')
    op.drop_table('policies')
    with op.batch_alter_table('payments', schema=None) as batch_op:
        batch_op.drop_index('ix_payments_member')

    op.drop_table('payments')
    op.drop_table('merchants')
    op.drop_table('members')
    op.drop_table('member_months')
    with op.batch_alter_table('ledger_txns', schema=None) as batch_op:
        batch_op.drop_index('ix_ledger_txns_member')
        batch_op.drop_index('ix_ledger_txns_date')

    op.drop_table('ledger_txns')
    op.drop_table('grant_programs')
    with op.batch_alter_table('grant_disbursements', schema=None) as batch_op:
        batch_op.drop_index('ix_grant_disbursements_program')

    op.drop_table('grant_disbursements')
    op.drop_table('budgets')
    op.drop_table('audit_log')
    op.drop_table('api_keys')
    with op.batch_alter_table('accounts', schema=None) as batch_op:
        batch_op.drop_index('ix_accounts_owner')

    op.drop_table('accounts')
