"""ledger_txns: index (business_date, txn_id) in place of (business_date)

A settlement run starts by finding the smallest and largest covered `txn_id`
(`settlement/ledger_read.py`, `covered_span`). With an index on `business_date` alone,
PostgreSQL answered `min(txn_id)` by walking the primary key from the book's first
transaction, filtering each: 1.4 s on a 6M-transaction book, growing with the book's
age (minutes on a year of Incheon). With `txn_id` in the date index, the day's first
and last transaction are two index probes whatever the book's size. The new index
serves every query the old one did (its leading column is the same), so it replaces it:
the write path keeps one index entry per transaction.

Revision ID: 0006
Revises: 0005
"""
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain index DDL (no batch mode): on SQLite, batch mode may rebuild the table and
    # with it the book's guard triggers.
    op.create_index('ix_ledger_txns_date_txn', 'ledger_txns', ['business_date', 'txn_id'])
    op.drop_index('ix_ledger_txns_date', table_name='ledger_txns')


def downgrade() -> None:
    op.create_index('ix_ledger_txns_date', 'ledger_txns', ['business_date'])
    op.drop_index('ix_ledger_txns_date_txn', table_name='ledger_txns')
