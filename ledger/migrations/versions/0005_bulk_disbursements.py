"""bulk disbursements: a disbursement row names the ledger transaction that carries it

The bulk grant writer (`ledger/bulk.py`) posts one ledger transaction per batch of
recipients: one credit leg per recipient's grant lot and one debit leg per funder. Such
a transaction has no single member, so each recipient's `grant_disbursements` row
records its `txn_id`, and a member's history finds it through the new index on
`member_id`. Rows written one at a time by the book keep `txn_id` NULL (their own
transaction carries the member). No guard changes: the batch transaction is sealed,
balanced and append-only like every other.

Revision ID: 0005
Revises: 0004
"""
from alembic import op
import sqlalchemy as sa

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('grant_disbursements', schema=None) as batch_op:
        batch_op.add_column(sa.Column('txn_id', sa.BigInteger(), nullable=True))
        batch_op.create_index('ix_grant_disbursements_member', ['member_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('grant_disbursements', schema=None) as batch_op:
        batch_op.drop_index('ix_grant_disbursements_member')
        batch_op.drop_column('txn_id')
