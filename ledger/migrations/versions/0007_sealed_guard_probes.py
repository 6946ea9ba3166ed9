"""sealed-leg guard: one primary-key probe per transaction id, whatever the plan's age

Migration 0004 made the statement-level guard `ledger_legs_sealed` ask
`ledger_txns.txn_id = ANY (ARRAY(SELECT DISTINCT txn_id FROM new_legs))` and plan with
`enable_seqscan = off`. Migration 0006 then gave `ledger_txns` an index on
`(business_date, txn_id)`, which holds `txn_id`: a whole-index scan of it, filtering each
entry against the array, is no sequential scan, and while the ledger is small it costs
less than probing the primary key with an array of unknown length. A plpgsql plan is
made once per connection, at the guard's first call, and kept: a connection whose first
batch met a small ledger (every benchmark, every service started on a new book) read
the whole date index on every later batch of legs. At 50,000 transactions that was two
thirds of PostgreSQL's CPU per payment (perf, `bulk_replay.py` with batches of 4), and
it grows with the book.

Now each distinct id is probed through a LATERAL subquery with LIMIT 1: the planner
cannot flatten it, so the only plans are a nested loop over the batch's ids with, inside,
an equality on `txn_id`; the primary key answers that with one descent, and any other
index would be read whole once per id, which no table size makes cheaper. The check,
its trigger, timing and error are unchanged; PostgreSQL only.

Revision ID: 0007
Revises: 0006
"""
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

PROBES = """CREATE OR REPLACE FUNCTION ledger_legs_sealed_check() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      -- One primary-key probe per distinct id of the batch: never a scan of an index.
      IF EXISTS (SELECT 1 FROM (SELECT DISTINCT n.txn_id FROM new_legs n) d
                   CROSS JOIN LATERAL (SELECT 1 FROM ledger_txns t WHERE t.txn_id = d.txn_id LIMIT 1) s) THEN
        RAISE EXCEPTION 'ledger: transaction already sealed' USING ERRCODE = 'check_violation';
      END IF;
      RETURN NULL;
    END $$"""

BY_ARRAY = """CREATE OR REPLACE FUNCTION ledger_legs_sealed_check() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      -- Probe the primary key with the batch's ids: never a scan of the whole ledger.
      IF EXISTS (SELECT 1 FROM ledger_txns t
                  WHERE t.txn_id = ANY (ARRAY(SELECT DISTINCT n.txn_id FROM new_legs n))) THEN
        RAISE EXCEPTION 'ledger: transaction already sealed' USING ERRCODE = 'check_violation';
      END IF;
      RETURN NULL;
    END $$"""


def _replace(body: str) -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        bind.exec_driver_sql(body)
        # CREATE OR REPLACE drops settings the new definition does not name: keep 0004's.
        bind.exec_driver_sql("ALTER FUNCTION ledger_legs_sealed_check() SET enable_seqscan = off")


def upgrade() -> None:
    _replace(PROBES)


def downgrade() -> None:
    _replace(BY_ARRAY)
