"""reconciliations: each clearing file's reconciliation, stored

`POST /v1/reconciliations` and `eum reconcile` answered and kept nothing, so the finance
endpoints' HTML reports always said "No clearing file reconciled for this report" (only
`eum report --clearing FILE` showed a file's exceptions). From this revision each run is a
row: the business dates it compared (`reconciliation_dates`, one row a date, what the
reports look up), who ran it and when, the file's SHA-256 and size, its summary (facts,
counts and amounts per category) and its exception rows, gzip-compressed JSON of at most
`rows_stored` a category. The matched rows are not kept.

Revision ID: 0020
Revises: 0019
"""
import sqlalchemy as sa
from alembic import op

revision = '0020'
down_revision = '0019'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('reconciliations',
    sa.Column('reconciliation_id', sa.String(length=64), nullable=False),
    sa.Column('first_business_date', sa.String(length=10), nullable=False),
    sa.Column('last_business_date', sa.String(length=10), nullable=False),
    sa.Column('run_by', sa.String(length=200), nullable=False),
    sa.Column('created_at_us', sa.BigInteger(), nullable=False),
    sa.Column('file_sha256', sa.String(length=64), nullable=False),
    sa.Column('file_bytes', sa.BigInteger(), nullable=False),
    sa.Column('rows_max', sa.Integer(), nullable=False),
    sa.Column('rows_stored', sa.Integer(), nullable=False),
    sa.Column('exception_count', sa.BigInteger(), nullable=False),
    sa.Column('summary', sa.Text(), nullable=False),
    sa.Column('exceptions', sa.LargeBinary(), nullable=False),
    sa.PrimaryKeyConstraint('reconciliation_id', name=op.f('pk_reconciliations'))
    )
    op.create_index('ix_reconciliations_created', 'reconciliations', ['created_at_us', 'reconciliation_id'],
                    unique=False)
    op.create_table('reconciliation_dates',
    sa.Column('business_date', sa.String(length=10), nullable=False),
    sa.Column('reconciliation_id', sa.String(length=64), nullable=False),
    sa.Column('created_at_us', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('business_date', 'reconciliation_id', name=op.f('pk_reconciliation_dates'))
    )


def downgrade() -> None:
    # Only the runs' records go (their audit entries stay): nothing of the book's money is in them.
    op.drop_table('reconciliation_dates')
    op.drop_index('ix_reconciliations_created', table_name='reconciliations')
    op.drop_table('reconciliations')
