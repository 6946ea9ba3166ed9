"""budget_requests: a budget limit asked for by one person, set when another approves

A budget limit was one person's `PUT /v1/budgets/{source}/{period}` (API.md's form).
A request (`POST /v1/budget-requests`) waits for a different person's approval, which
sets the limit as the `PUT` does (`ledger.budget_requests`); with
EUM_BUDGET_APPROVAL=second_person it is the only way, and the `PUT` is refused. At most
one request per budget is pending (a partial unique index).

Revision ID: 0023
Revises: 0022
"""
import sqlalchemy as sa
from alembic import op

revision = '0023'
down_revision = '0022'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('budget_requests',
    sa.Column('request_id', sa.String(length=64), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('period', sa.String(length=7), nullable=False),
    sa.Column('amount_won', sa.BigInteger(), nullable=False),
    sa.Column('limit_before_won', sa.BigInteger(), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('requested_by', sa.String(length=200), nullable=False),
    sa.Column('requested_at_us', sa.BigInteger(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('decided_by', sa.String(length=200), nullable=True),
    sa.Column('decided_at_us', sa.BigInteger(), nullable=True),
    sa.CheckConstraint("status <> 'approved' OR decided_by <> requested_by",
                       name=op.f('ck_budget_requests_second_person')),
    sa.CheckConstraint("status IN ('pending', 'approved', 'withdrawn')", name=op.f('ck_budget_requests_status')),
    sa.PrimaryKeyConstraint('request_id', name=op.f('pk_budget_requests'))
    )
    op.create_index('ix_budget_requests_requested_at_us', 'budget_requests', ['requested_at_us'], unique=False)
    op.create_index('uq_budget_requests_pending', 'budget_requests', ['source', 'period'], unique=True,
                    postgresql_where=sa.text("status = 'pending'"), sqlite_where=sa.text("status = 'pending'"))


def downgrade() -> None:
    op.drop_index('uq_budget_requests_pending', table_name='budget_requests')
    op.drop_index('ix_budget_requests_requested_at_us', table_name='budget_requests')
    op.drop_table('budget_requests')
