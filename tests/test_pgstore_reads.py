"""The batch's reads on PostgreSQL come back as one statement of JSON columns
(`ledger.pgstore.SQL_BATCH_READS`); each part must equal what its own SELECT returns,
value for value and type for type (text with quotes and Hangul, 64-bit amounts,
booleans, NULLs), and absent parts must come back empty."""

from __future__ import annotations

import pytest

from ledger import pgstore
from ledger.db import make_engine
from tests.book_helpers import pay, put_member, put_merchant, refund, topup
from tests.conftest import at, make_api

pytestmark = pytest.mark.postgres


def _alone(conn, sql: str, *params) -> list[tuple]:
    with pgstore.driver(conn).cursor() as cur:
        cur.execute(sql, params)
        return [tuple(row) for row in cur.fetchall()]


def test_each_part_of_the_one_read_equals_its_own_select(pg_url):
    api = make_api(pg_url)
    with api.client:
        put_member(api, "m1")
        put_member(api, "m2")
        put_merchant(api, "s1")
        topup(api, "t1", "m1", 500_000, at("2025-09-01"))
        topup(api, "t2", "m2", 50_000, at("2025-09-01"))
        pay(api, "p1", "m1", "s1", 12_345, at("2025-09-02"))
        refund(api, "p1", "r1", 2_345, at("2025-09-03"))
    engine = make_engine(pg_url)
    with engine.begin() as conn:  # values the API would not take, for the JSON round trip alone
        conn.exec_driver_sql("INSERT INTO budgets (source, period, limit_won, committed_won, updated_at_us) "
                             "VALUES ('district:seo', '2025', 9000000000, 0, 0)")  # beyond 32 bits
        conn.exec_driver_sql("UPDATE merchants SET category = %s WHERE merchant_id = 's1'",
                             ('한식 "고기" \\ 집',))  # quotes, a backslash, Hangul
    members = sorted(["m1", "m2", "m-absent"])
    text = pgstore._text_array
    try:
        with engine.begin() as conn:
            reads = pgstore.read_batch(
                conn, member_ids=members, keys_by_kind={"payment": ["p1", "p-absent"], "topup": ["t1", "t2"],
                                                        "refund": ["r1"]},
                refund_payment_ids=["p1"], months=["2025-09"], merchant_ids=["s1", "s-absent"],
                txn_ids_max=5, budget_periods=["2025-09", "2025"])
            assert sorted(map(tuple, reads.members)) == _alone(conn, pgstore.SQL_LOCK_MEMBERS, text(members))
            expected_existing = sorted((kind, row) for kind, ids in (("payment", ["p1", "p-absent"]),
                                                                      ("topup", ["t1", "t2"]), ("refund", ["r1"]))
                                       for row in _alone(conn, pgstore.SQL_EXISTING[kind], text(ids)))
            assert sorted((kind, tuple(row)) for kind, row in reads.existing) == expected_existing
            assert len(expected_existing) == 4
            for got, sql, params in (
                    (reads.balances, pgstore.SQL_BALANCES, (text(members),)),
                    (reads.payments, pgstore.SQL_PAYMENTS, (text(["p1"]),)),
                    (reads.months, pgstore.SQL_MONTHS, (text(members), text(["2025-09"]))),
                    (reads.merchants, pgstore.SQL_MERCHANTS, (text(["s1", "s-absent"]),)),
                    (reads.budgets, pgstore.SQL_BUDGETS_SNAPSHOT, (text(["2025-09", "2025"]),))):
                expected = sorted(_alone(conn, sql, *params), key=repr)
                assert expected, sql
                assert sorted(map(tuple, got), key=repr) == expected, sql
            assert 9_000_000_000 in {row[2] for row in reads.budgets}
            assert reads.merchants[0][2] == '한식 "고기" \\ 집'
            payment = dict(zip(pgstore.PAYMENT_COLUMNS, reads.payments[0]))
            assert payment["refunded_won"] == 2_345 and payment["counts_toward_month"] is True
            assert len(set(reads.txn_ids)) == 5 and all(isinstance(i, int) for i in reads.txn_ids)

            nothing = pgstore.read_batch(conn, member_ids=["m1"], keys_by_kind={}, refund_payment_ids=[], months=[],
                                         merchant_ids=[], txn_ids_max=0, budget_periods=[])
            assert [tuple(m) for m in nothing.members] == _alone(conn, pgstore.SQL_LOCK_MEMBERS, text(["m1"]))
            assert nothing.existing == nothing.payments == nothing.months == nothing.merchants == []
            assert nothing.txn_ids == [] and nothing.budgets == []
    finally:
        engine.dispose()
