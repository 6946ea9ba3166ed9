"""Database-side guarantees of the book of record, for migration 0001.

The same three rules on SQLite and PostgreSQL, so that no code path (a bug, a manual
session, a future module) can break them:
1. A transaction is sealed by inserting its `ledger_txns` row after its legs; the seal
   is refused unless the legs sum to zero, number `leg_count` and are at least two.
2. No leg can be added to a sealed transaction. (Legs with no seal at all fail at commit
   through the deferred foreign key to `ledger_txns`.)
3. Ledger rows are never updated or deleted; corrections are new transactions.

Frozen with migration 0001: a later change belongs in a new migration.
"""

from __future__ import annotations

SQLITE = [
    """CREATE TRIGGER ledger_txns_balanced BEFORE INSERT ON ledger_txns
    WHEN NEW.leg_count < 2
      OR (SELECT count(*) FROM ledger_legs WHERE txn_id = NEW.txn_id) <> NEW.leg_count
      OR (SELECT coalesce(sum(amount_won), 0) FROM ledger_legs WHERE txn_id = NEW.txn_id) <> 0
    BEGIN SELECT RAISE(ABORT, 'ledger: unbalanced transaction'); END""",
    """CREATE TRIGGER ledger_legs_sealed BEFORE INSERT ON ledger_legs
    WHEN EXISTS (SELECT 1 FROM ledger_txns WHERE txn_id = NEW.txn_id)
    BEGIN SELECT RAISE(ABORT, 'ledger: transaction already sealed'); END""",
    """CREATE TRIGGER ledger_txns_no_update BEFORE UPDATE ON ledger_txns
    BEGIN SELECT RAISE(ABORT, 'ledger: append-only'); END""",
    """CREATE TRIGGER ledger_txns_no_delete BEFORE DELETE ON ledger_txns
    BEGIN SELECT RAISE(ABORT, 'ledger: append-only'); END""",
    """CREATE TRIGGER ledger_legs_no_update BEFORE UPDATE ON ledger_legs
    BEGIN SELECT RAISE(ABORT, 'ledger: append-only'); END""",
    """CREATE TRIGGER ledger_legs_no_delete BEFORE DELETE ON ledger_legs
    BEGIN SELECT RAISE(ABORT, 'ledger: append-only'); END""",
    """CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
    BEGIN SELECT RAISE(ABORT, 'audit log: append-only'); END""",
    """CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
    BEGIN SELECT RAISE(ABORT, 'audit log: append-only'); END""",
]

POSTGRESQL = [
    "CREATE SEQUENCE ledger_txn_id_seq",
    """CREATE FUNCTION ledger_seal_check() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
      bad record;
    BEGIN
      -- One statement may seal many transactions (batched inserts): check them together.
      SELECT n.txn_id INTO bad
        FROM new_txns n
        LEFT JOIN LATERAL (
          SELECT count(*) AS legs, coalesce(sum(l.amount_won), 0) AS total
            FROM ledger_legs l WHERE l.txn_id = n.txn_id
        ) s ON true
       WHERE n.leg_count < 2 OR s.legs <> n.leg_count OR s.total <> 0
       LIMIT 1;
      IF FOUND THEN
        RAISE EXCEPTION 'ledger: unbalanced transaction %', bad.txn_id USING ERRCODE = 'check_violation';
      END IF;
      RETURN NULL;
    END $$""",
    """CREATE TRIGGER ledger_txns_balanced AFTER INSERT ON ledger_txns
    REFERENCING NEW TABLE AS new_txns FOR EACH STATEMENT EXECUTE FUNCTION ledger_seal_check()""",
    """CREATE FUNCTION ledger_legs_sealed_check() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF EXISTS (SELECT 1 FROM new_legs n JOIN ledger_txns t ON t.txn_id = n.txn_id) THEN
        RAISE EXCEPTION 'ledger: transaction already sealed' USING ERRCODE = 'check_violation';
      END IF;
      RETURN NULL;
    END $$""",
    """CREATE TRIGGER ledger_legs_sealed AFTER INSERT ON ledger_legs
    REFERENCING NEW TABLE AS new_legs FOR EACH STATEMENT EXECUTE FUNCTION ledger_legs_sealed_check()""",
    """CREATE FUNCTION append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      RAISE EXCEPTION '%: append-only', TG_TABLE_NAME USING ERRCODE = 'insufficient_privilege';
    END $$""",
    """CREATE TRIGGER ledger_txns_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON ledger_txns
    FOR EACH STATEMENT EXECUTE FUNCTION append_only()""",
    """CREATE TRIGGER ledger_legs_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON ledger_legs
    FOR EACH STATEMENT EXECUTE FUNCTION append_only()""",
    """CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION append_only()""",
]

SQLITE_DROP = [
    "DROP TRIGGER IF EXISTS " + name for name in (
        "ledger_txns_balanced", "ledger_legs_sealed", "ledger_txns_no_update", "ledger_txns_no_delete",
        "ledger_legs_no_update", "ledger_legs_no_delete", "audit_log_no_update", "audit_log_no_delete",
    )
]

POSTGRESQL_DROP = [
    "DROP TRIGGER IF EXISTS ledger_txns_balanced ON ledger_txns",
    "DROP TRIGGER IF EXISTS ledger_legs_sealed ON ledger_legs",
    "DROP TRIGGER IF EXISTS ledger_txns_append_only ON ledger_txns",
    "DROP TRIGGER IF EXISTS ledger_legs_append_only ON ledger_legs",
    "DROP TRIGGER IF EXISTS audit_log_append_only ON audit_log",
    "DROP FUNCTION IF EXISTS ledger_seal_check()",
    "DROP FUNCTION IF EXISTS ledger_legs_sealed_check()",
    "DROP FUNCTION IF EXISTS append_only()",
    "DROP SEQUENCE IF EXISTS ledger_txn_id_seq",
]


def create_guards(bind) -> None:
    if bind.dialect.name == "postgresql":
        for statement in POSTGRESQL:
            # psycopg reads % as a placeholder even with no parameters.
            bind.exec_driver_sql(statement.replace("%", "%%"))
    else:
        for statement in SQLITE:
            bind.exec_driver_sql(statement)


def drop_guards(bind) -> None:
    for statement in POSTGRESQL_DROP if bind.dialect.name == "postgresql" else SQLITE_DROP:
        bind.exec_driver_sql(statement)
