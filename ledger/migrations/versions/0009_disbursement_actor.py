"""grant_disbursements.actor: who disbursed the money

Policy changes, budget limits and program approvals each leave an audit entry with the
actor; a disbursement left none, so money given to a member could not be traced to the
key that gave it. Each disbursement row now names its actor (the key's holder, or the
operator of `eum grants disburse`). Nullable: rows from before it have none.

Revision ID: 0009
Revises: 0008
"""
import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN (no batch mode): on SQLite, batch mode may rebuild the table.
    op.add_column('grant_disbursements', sa.Column('actor', sa.String(64), nullable=True))


def downgrade() -> None:
    op.drop_column('grant_disbursements', 'actor')  # SQLite 3.35+ drops a column in place
