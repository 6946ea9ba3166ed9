"""sealed-leg guard: planned for the ledger as it is at each call, not as it was

Migration 0004 made the statement-level guard `ledger_legs_sealed` ask
`ledger_txns.txn_id = ANY (ARRAY(SELECT DISTINCT txn_id FROM new_legs))` and plan with
`enable_seqscan = off`. Migration 0006 then gave `ledger_txns` an index on
`(business_date, txn_id)`, which holds `txn_id`: a scan of that whole index with
`txn_id` as a key on its second column is no sequential scan, and while the ledger is
tiny it costs the planner no more than a probe of the primary key. A plpgsql statement
without parameters is planned once per connection and kept until the table's
statistics change: planned while the ledger was tiny (a new book, analysed while
empty), the guard read the whole date index on every later batch of legs until the
next autoanalyze, a cost that grows with the book (161 blocks a batch at 20,000
transactions; tests/test_performance_paths.py).

Forcing key look-ups by the query's shape does not hold: with the ids as a LATERAL
probe, or the rows locked FOR KEY SHARE, or a loop of single-id probes, the cached plan
still read the date index in that case. So the ids go in as a parameter and the
function plans with `plan_cache_mode = force_custom_plan`: each call is planned for the
ledger's size at that moment (the primary key as soon as it holds more than a few
rows), for ~20-40 µs of planning per batch of legs. The check, its trigger, timing and
error are unchanged; PostgreSQL only.

Revision ID: 0007
Revises: 0006
"""
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

PLANNED_PER_CALL = """CREATE OR REPLACE FUNCTION ledger_legs_sealed_check() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
      ids bigint[];
    BEGIN
      -- The ids as a parameter, so that the probe is planned anew at every call
      -- (the function's plan_cache_mode): for the ledger's size now.
      ids := ARRAY(SELECT DISTINCT n.txn_id FROM new_legs n);
      IF EXISTS (SELECT 1 FROM ledger_txns t WHERE t.txn_id = ANY (ids)) THEN
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


FUNCTION = "ledger_legs_sealed_check()"


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        # CREATE OR REPLACE keeps no setting the new text does not name: 0004's again.
        bind.exec_driver_sql(PLANNED_PER_CALL)
        bind.exec_driver_sql(f"ALTER FUNCTION {FUNCTION} SET enable_seqscan = off")
        bind.exec_driver_sql(f"ALTER FUNCTION {FUNCTION} SET plan_cache_mode = force_custom_plan")


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        bind.exec_driver_sql(BY_ARRAY)
        bind.exec_driver_sql(f"ALTER FUNCTION {FUNCTION} RESET plan_cache_mode")
        bind.exec_driver_sql(f"ALTER FUNCTION {FUNCTION} SET enable_seqscan = off")
