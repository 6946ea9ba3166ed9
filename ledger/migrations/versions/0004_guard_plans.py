"""guard plans: the sealed-leg guard looks transactions up by key, not by a scan

The statement-level guard `ledger_legs_sealed` (migration 0001) asked
`EXISTS (SELECT 1 FROM new_legs n JOIN ledger_txns t ON t.txn_id = n.txn_id)`; the
planner, knowing nothing of the transition table's size, hashed it against a
sequential scan of `ledger_txns`, so every batch of legs read the whole ledger
(30 ms per batch at 200,000 transactions, 150 ms at 800,000, growing without bound).
A plpgsql function's plans are also cached for the life of a connection, so a plan made
while the ledger was empty (a sequential scan is the cheapest way to read nothing) stays
in use after it holds millions of rows.

Now the check probes the primary key with the batch's transaction ids, and both guard
functions plan with `enable_seqscan = off` (function-level setting), so their cost is
the batch's whatever the size of the book and whenever the plan was made. The triggers,
their names, timing, checks and errors are unchanged; PostgreSQL only.

Revision ID: 0004
Revises: 0003
"""
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

BY_KEY = """CREATE OR REPLACE FUNCTION ledger_legs_sealed_check() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      -- Probe the primary key with the batch's ids: never a scan of the whole ledger.
      IF EXISTS (SELECT 1 FROM ledger_txns t
                  WHERE t.txn_id = ANY (ARRAY(SELECT DISTINCT n.txn_id FROM new_legs n))) THEN
        RAISE EXCEPTION 'ledger: transaction already sealed' USING ERRCODE = 'check_violation';
      END IF;
      RETURN NULL;
    END $$"""

ORIGINAL = """CREATE OR REPLACE FUNCTION ledger_legs_sealed_check() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF EXISTS (SELECT 1 FROM new_legs n JOIN ledger_txns t ON t.txn_id = n.txn_id) THEN
        RAISE EXCEPTION 'ledger: transaction already sealed' USING ERRCODE = 'check_violation';
      END IF;
      RETURN NULL;
    END $$"""


GUARD_FUNCTIONS = ("ledger_legs_sealed_check()", "ledger_seal_check()")


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        bind.exec_driver_sql(BY_KEY)
        for function in GUARD_FUNCTIONS:
            bind.exec_driver_sql(f"ALTER FUNCTION {function} SET enable_seqscan = off")


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        for function in GUARD_FUNCTIONS:
            bind.exec_driver_sql(f"ALTER FUNCTION {function} RESET enable_seqscan")
        bind.exec_driver_sql(ORIGINAL)
