"""legs' guard: the sealed probe only where a leg 0 came earlier, and no plan made per call

Migration 0008's statement-level guard on `ledger_legs` ran with `plan_cache_mode =
force_custom_plan`, so that its sealed probe (`ledger_txns.txn_id = ANY (ids)`) was
planned for the ledger as it is at each call (migration 0007). The setting applies to
every statement and expression of the function, not the probe alone: each batch of legs
planned all of them anew. Measured with EXPLAIN ANALYZE on a book of 20,000 payments
(a batch of 5 payments: 29 legs in 10 transactions, 400 calls), the trigger took ~250 µs
a call, of which ~110 µs was that planning; the accounts' look-up through
`ledger_accounts_missing` ~80 µs (docs/performance.md, "What limits the next step").

The same three checks, the same errors, cheaper:

1. Already sealed. A sealed transaction has its leg 0 in the table: the seal counts its
   legs (two or more), and since migration 0008 no leg enters without its transaction's
   leg 0 in the same statement or before it; the upgrade verifies it for the legs
   written before (below). So when every transaction given legs by a statement has its
   leg 0 in that statement (what the book always writes), a sealed one among them
   would be a second leg 0, which the primary key refuses: the probe is not needed.
   Only otherwise (legs after their leg 0, in a later statement of the same database
   transaction) does the guard probe `ledger_txns`, through `ledger_txns_any_sealed`,
   the one function still planned per call.
2. Leg 0 first: the same check, on the same path, now made before the sealed probe.
   Each read of the guard has a snapshot of its own (READ COMMITTED), and another
   session's leg 0 is visible only once committed, with its seal (its deferred key needs
   the seal by that COMMIT): counted first, a leg 0 seen means a seal the probe sees.
   Migration 0008 probed first, and a seal committed between its two reads was missed
   while its leg 0 was found: a leg was added to a sealed transaction, which then no
   longer balanced (found by a review of this change; tests/test_leg_guard_races.py).
3. Every leg names an account: one anti-join of the statement's distinct accounts
   against the accounts' primary key, planned once, with nested loops only and no
   sequential scan, so that the plan kept probes the key whatever the tables' size when
   it was made. Only when it finds one missing does `ledger_accounts_missing` name
   them, as before.

The upgrade refuses a book in which a transaction has no leg 0 (which the book's writers
never made): it compares the number of transactions with the number of legs 0 (each leg
0 names its transaction by the deferred key, and there is one per transaction by the
primary key), one read of `ledger_txns` and of the legs' primary key.

Revision ID: 0024
Revises: 0023
"""
from alembic import op

revision = '0024'
down_revision = '0023'
branch_labels = None
depends_on = None

ACCOUNT_KEY = "ledger_legs_account_exists"

ANY_SEALED = """CREATE FUNCTION ledger_txns_any_sealed(ids bigint[]) RETURNS boolean LANGUAGE plpgsql
    SET enable_seqscan = off SET plan_cache_mode = force_custom_plan AS $$
    BEGIN
      -- Planned at each call, for the ledger as it is (migration 0007).
      RETURN EXISTS (SELECT 1 FROM ledger_txns t WHERE t.txn_id = ANY (ids));
    END $$"""

LEGS_CHECK = """CREATE OR REPLACE FUNCTION ledger_legs_check() RETURNS trigger LANGUAGE plpgsql
    SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off AS $$
    DECLARE
      ids bigint[];
      txns bigint;
      firsts bigint;
      missing text[];
    BEGIN
      SELECT count(DISTINCT n.txn_id), count(*) FILTER (WHERE n.leg_no = 0) INTO txns, firsts FROM new_legs n;
      -- Every transaction here has its leg 0 here: none is sealed (a sealed one's leg 0
      -- is in the table, and the primary key refuses a second). Else look.
      IF firsts <> txns THEN
        ids := ARRAY(SELECT DISTINCT n.txn_id FROM new_legs n);
        -- Leg 0 before the seal: each read here has a snapshot of its own, and another
        -- session's leg 0 is seen only once committed, with its seal (its deferred key),
        -- which the later probe then sees. The other way round, a seal committed between
        -- the two reads was missed and its leg 0 found.
        IF (SELECT count(*) FROM ledger_legs l WHERE l.txn_id = ANY (ids) AND l.leg_no = 0) <> cardinality(ids) THEN
          RAISE EXCEPTION 'ledger: a transaction''s legs start with leg 0' USING ERRCODE = 'check_violation';
        END IF;
        IF ledger_txns_any_sealed(ids) THEN
          RAISE EXCEPTION 'ledger: transaction already sealed' USING ERRCODE = 'check_violation';
        END IF;
      END IF;
      -- Each account once (a batch's legs name the funders' and the operator's many times).
      IF EXISTS (SELECT 1 FROM (SELECT DISTINCT account_id FROM new_legs) n
                  WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.account_id = n.account_id)) THEN
        missing := ledger_accounts_missing(ARRAY(SELECT DISTINCT n.account_id FROM new_legs n));
        RAISE EXCEPTION 'ledger: a leg names no account (%): %', '""" + ACCOUNT_KEY + """',
                        array_to_string(missing[1:5], ', ')
          USING ERRCODE = 'foreign_key_violation', CONSTRAINT = '""" + ACCOUNT_KEY + """';
      END IF;
      RETURN NULL;
    END $$"""

# Migration 0008's guard and its settings, for the downgrade (frozen text: a copy).
LEGS_CHECK_0008 = """CREATE OR REPLACE FUNCTION ledger_legs_check() RETURNS trigger LANGUAGE plpgsql
    SET enable_seqscan = off SET plan_cache_mode = force_custom_plan AS $$
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

EVERY_TXN_HAS_LEG_0 = """DO $$
    DECLARE
      txns bigint := (SELECT count(*) FROM ledger_txns);
      firsts bigint := (SELECT count(*) FROM ledger_legs WHERE leg_no = 0);
    BEGIN
      IF txns <> firsts THEN
        RAISE EXCEPTION 'ledger: % transactions but % legs 0: a transaction without a leg 0 '
                        '(migration 0024 relies on each having one; find it with SELECT txn_id FROM '
                        'ledger_txns t WHERE NOT EXISTS (SELECT 1 FROM ledger_legs l WHERE '
                        'l.txn_id = t.txn_id AND l.leg_no = 0))', txns, firsts
          USING ERRCODE = 'check_violation';
      END IF;
    END $$"""

UPGRADE = [EVERY_TXN_HAS_LEG_0, ANY_SEALED, LEGS_CHECK]

DOWNGRADE = [LEGS_CHECK_0008, "DROP FUNCTION ledger_txns_any_sealed(bigint[])"]


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
