"""legs checked by the statement, not leg by leg

Until now each leg carried two deferred foreign keys, to its account and to its sealing
`ledger_txns` row: at COMMIT PostgreSQL ran two key look-ups per leg (each a query with
a `FOR KEY SHARE` row lock), ~14 per payment and its cashback, about a quarter of the
server's CPU per payment (docs/performance.md, item 23). The same guarantees, checked
per statement and per transaction instead (PostgreSQL only; SQLite keeps its row
triggers and keys):

1. Every leg names an existing account: the legs' statement-level guard looks the
   statement's distinct accounts up at once (foreign_key_violation, constraint
   `ledger_legs_account_exists`, naming the missing accounts), in a function of its own
   (`ledger_accounts_missing`) whose plan is kept: planned anew per call as the sealed
   check is, it cost as much as the keys it replaces at a few payments a batch. So an
   account is inserted before the legs that name it, in the same transaction or
   earlier. Accounts are never deleted and never renamed: a guard refuses DELETE,
   TRUNCATE and a change of `account_id` (a foreign key would have refused it only while
   a leg named the account; nothing in the book deletes accounts).
2. Every leg is sealed by COMMIT: a generated column `seal_txn_id` (leg 0's `txn_id`,
   NULL on the other legs) keeps a deferred foreign key to `ledger_txns`, one look-up
   per transaction instead of one per leg; and the guard refuses legs of a transaction
   whose leg 0 is neither in the statement nor already in the table (inserted earlier
   by the same database transaction: another's is not visible, and a committed leg 0
   is sealed). So every leg has a leg 0 beside it, leg 0 cannot be removed
   (append-only), and it needs its seal by COMMIT; the seal counts and sums the legs
   (`ledger_seal_check`, unchanged) and no leg can follow it.
3. No leg is added to a sealed transaction: unchanged from migration 0007 (the ids as a
   parameter, planned per call).

Adding a stored generated column rewrites `ledger_legs` once: on a large book, run the
upgrade in a maintenance window. The existing legs were checked by the keys this drops,
so the new key validates at once.

Revision ID: 0008
Revises: 0007
"""
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

ACCOUNT_KEY = "ledger_legs_account_exists"

ACCOUNTS_MISSING = """CREATE FUNCTION ledger_accounts_missing(named text[]) RETURNS text[] LANGUAGE plpgsql AS $$
    BEGIN
      -- NULL when every named account exists; else the missing ones, sorted.
      IF (SELECT count(*) FROM accounts a WHERE a.account_id = ANY (named)) = cardinality(named) THEN
        RETURN NULL;
      END IF;
      RETURN ARRAY(SELECT x FROM unnest(named) x
                    WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.account_id = x) ORDER BY x);
    END $$"""

LEGS_CHECK = """CREATE FUNCTION ledger_legs_check() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
      ids bigint[];
      firsts bigint;
      missing text[];
    BEGIN
      -- The ids as a parameter, so that the probe is planned anew at every call (the
      -- function's plan_cache_mode): for the book's size now (migration 0007).
      ids := ARRAY(SELECT DISTINCT n.txn_id FROM new_legs n);
      IF EXISTS (SELECT 1 FROM ledger_txns t WHERE t.txn_id = ANY (ids)) THEN
        RAISE EXCEPTION 'ledger: transaction already sealed' USING ERRCODE = 'check_violation';
      END IF;
      -- Leg 0 carries the deferred key to the seal: every transaction given legs here
      -- has it, in this statement (the usual case: counted in the statement's rows, a
      -- query with no parameter, planned once) or in an earlier one of the same
      -- database transaction (looked up only then).
      firsts := (SELECT count(*) FROM new_legs n WHERE n.leg_no = 0);
      IF firsts <> cardinality(ids) THEN
        IF (SELECT count(*) FROM ledger_legs l WHERE l.txn_id = ANY (ids) AND l.leg_no = 0) <> cardinality(ids) THEN
          RAISE EXCEPTION 'ledger: a transaction''s legs start with leg 0' USING ERRCODE = 'check_violation';
        END IF;
      END IF;
      -- The accounts in a function of their own, whose plan may be kept: its only index
      -- on account_id is the primary key, and planning it anew per call cost as much as
      -- the per-leg keys it replaces at a few payments a batch.
      missing := ledger_accounts_missing(ARRAY(SELECT DISTINCT n.account_id FROM new_legs n));
      IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'ledger: a leg names no account (%): %', '""" + ACCOUNT_KEY + """',
                        array_to_string(missing[1:5], ', ')
          USING ERRCODE = 'foreign_key_violation', CONSTRAINT = '""" + ACCOUNT_KEY + """';
      END IF;
      RETURN NULL;
    END $$"""

ACCOUNTS_KEPT = """CREATE FUNCTION accounts_kept() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      RAISE EXCEPTION 'accounts: never deleted nor renamed (legs name them)' USING ERRCODE = 'insufficient_privilege';
    END $$"""

# Migration 0007's guard, for the downgrade (migrations are frozen text: a copy, not an import).
SEALED_0007 = """CREATE OR REPLACE FUNCTION ledger_legs_sealed_check() RETURNS trigger LANGUAGE plpgsql AS $$
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

UPGRADE = [
    "ALTER TABLE ledger_legs ADD COLUMN seal_txn_id bigint "
    "GENERATED ALWAYS AS (CASE WHEN leg_no = 0 THEN txn_id END) STORED",
    "ALTER TABLE ledger_legs ADD CONSTRAINT fk_ledger_legs_seal_txn_id_ledger_txns FOREIGN KEY (seal_txn_id) "
    "REFERENCES ledger_txns (txn_id) DEFERRABLE INITIALLY DEFERRED",
    "ALTER TABLE ledger_legs DROP CONSTRAINT fk_ledger_legs_txn_id_ledger_txns",
    "ALTER TABLE ledger_legs DROP CONSTRAINT fk_ledger_legs_account_id_accounts",
    ACCOUNTS_MISSING,
    "ALTER FUNCTION ledger_accounts_missing(text[]) SET enable_seqscan = off",
    LEGS_CHECK,
    "ALTER FUNCTION ledger_legs_check() SET enable_seqscan = off",
    "ALTER FUNCTION ledger_legs_check() SET plan_cache_mode = force_custom_plan",
    "DROP TRIGGER ledger_legs_sealed ON ledger_legs",
    "DROP FUNCTION ledger_legs_sealed_check()",
    "CREATE TRIGGER ledger_legs_checked AFTER INSERT ON ledger_legs "
    "REFERENCING NEW TABLE AS new_legs FOR EACH STATEMENT EXECUTE FUNCTION ledger_legs_check()",
    ACCOUNTS_KEPT,
    "CREATE TRIGGER accounts_never_deleted BEFORE DELETE OR TRUNCATE ON accounts "
    "FOR EACH STATEMENT EXECUTE FUNCTION accounts_kept()",
    "CREATE TRIGGER accounts_never_renamed BEFORE UPDATE OF account_id ON accounts "
    "FOR EACH ROW WHEN (OLD.account_id IS DISTINCT FROM NEW.account_id) EXECUTE FUNCTION accounts_kept()",
]

DOWNGRADE = [
    "DROP TRIGGER accounts_never_renamed ON accounts",
    "DROP TRIGGER accounts_never_deleted ON accounts",
    "DROP FUNCTION accounts_kept()",
    "DROP TRIGGER ledger_legs_checked ON ledger_legs",
    "DROP FUNCTION ledger_legs_check()",
    "DROP FUNCTION ledger_accounts_missing(text[])",
    SEALED_0007,
    "ALTER FUNCTION ledger_legs_sealed_check() SET enable_seqscan = off",
    "ALTER FUNCTION ledger_legs_sealed_check() SET plan_cache_mode = force_custom_plan",
    "CREATE TRIGGER ledger_legs_sealed AFTER INSERT ON ledger_legs "
    "REFERENCING NEW TABLE AS new_legs FOR EACH STATEMENT EXECUTE FUNCTION ledger_legs_sealed_check()",
    "ALTER TABLE ledger_legs ADD CONSTRAINT fk_ledger_legs_account_id_accounts FOREIGN KEY (account_id) "
    "REFERENCES accounts (account_id) DEFERRABLE INITIALLY DEFERRED",
    "ALTER TABLE ledger_legs ADD CONSTRAINT fk_ledger_legs_txn_id_ledger_txns FOREIGN KEY (txn_id) "
    "REFERENCES ledger_txns (txn_id) DEFERRABLE INITIALLY DEFERRED",
    "ALTER TABLE ledger_legs DROP CONSTRAINT fk_ledger_legs_seal_txn_id_ledger_txns",
    "ALTER TABLE ledger_legs DROP COLUMN seal_txn_id",
]


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        for statement in UPGRADE:
            bind.exec_driver_sql(statement.replace("%", "%%"))  # psycopg reads % as a placeholder


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        for statement in DOWNGRADE:
            bind.exec_driver_sql(statement.replace("%", "%%"))
