"""The legs' guard against a seal committed while it checks (PostgreSQL).

Under READ COMMITTED each query of the guard (`ledger_legs_check`) reads a snapshot of
its own. A leg for a transaction whose leg 0 came before (not in the same statement)
is checked twice: is its transaction sealed, and is its leg 0 in the table. Another
session's leg 0 is visible only once committed, and then with its seal (the leg's
deferred key needs the seal by that COMMIT). So if the leg 0 is looked up before the
seal, a leg 0 seen means a seal seen; looked up the other way round, a seal committed
between the two reads is missed and its leg 0 is found: the leg is added to a sealed
transaction, which then no longer balances."""

from __future__ import annotations

import threading

import psycopg
import pytest

from tests.book_helpers import lock_waiters, wait_until

pytestmark = pytest.mark.postgres

TXN = ("INSERT INTO ledger_txns (txn_id, kind, ref, occurred_at_us, business_date, recorded_at_us, leg_count) "
       "VALUES (%s, 'topup', 't' || %s::text, 0, '2025-11-14', 0, %s)")

# A window between the guard's reads, held open by the test: the sealed probe answers
# as it did, then waits for an advisory lock the test holds (a busy server's scheduling
# can leave the same gap; with a large statement the probe itself takes that long).
SLOW_PROBE = """CREATE FUNCTION ledger_txns_any_sealed(ids bigint[]) RETURNS boolean LANGUAGE plpgsql AS $$
    DECLARE
      sealed boolean := ledger_txns_any_sealed_probe(ids);
    BEGIN
      PERFORM pg_advisory_xact_lock(4242);
      RETURN sealed;
    END $$"""


def test_a_leg_is_refused_when_its_transaction_is_sealed_while_the_guard_checks_it(pg_url):
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO accounts VALUES ('operator/cash', 'asset', NULL, 0, false), "
                     "('member/x/charged', 'liability', 'x', 0, false)")
        conn.execute("ALTER FUNCTION ledger_txns_any_sealed(bigint[]) RENAME TO ledger_txns_any_sealed_probe")
        conn.execute(SLOW_PROBE)
    outcome: list = []

    def late_leg() -> None:
        with psycopg.connect(pg_url, autocommit=False) as conn:
            try:
                conn.execute("INSERT INTO ledger_legs VALUES (1, 2, 'operator/cash', 7)")
                conn.commit()
                outcome.append("added")
            except psycopg.errors.CheckViolation as error:
                outcome.append(error)

    with psycopg.connect(pg_url, autocommit=True) as holder, psycopg.connect(pg_url) as sealer:
        holder.execute("SELECT pg_advisory_lock(4242)")
        sealer.execute("INSERT INTO ledger_legs VALUES (1, 0, 'operator/cash', 5), (1, 1, 'member/x/charged', -5)")
        sealer.execute(TXN, (1, 1, 2))  # sealed, not yet committed
        thread = threading.Thread(target=late_leg)
        thread.start()
        try:
            wait_until(lambda: outcome or lock_waiters(pg_url), "the late leg neither failed nor reached the probe")
            sealer.commit()  # the seal (and its leg 0) committed while the guard checks the late leg
        finally:
            holder.execute("SELECT pg_advisory_unlock(4242)")
            thread.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], psycopg.errors.CheckViolation), outcome
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*), sum(amount_won) FROM ledger_legs WHERE txn_id = 1").fetchone() == (2, 0)
