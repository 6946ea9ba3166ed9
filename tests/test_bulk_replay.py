"""The bulk payment replay (ledger/replay.py) on both backends: the same payments recorded
by the bulk writer and one by one through `Book.execute` (the online path) leave the same
book — balances, cashback, budgets, month counters, payment rows and their stored answers,
legs by transaction and account — including a budget that binds mid-run; a second replay
changes nothing; a refund through the normal path after a bulk replay works; a payment id
already recorded online with another body is a conflict, with the same body a replay."""

from __future__ import annotations

import datetime as dt
import shutil

import pytest
from sqlalchemy import select

from api.cardapp import _fingerprint
from api.schemas import PaymentIn
from ledger import replay as bulk_replay
from ledger import schema as s
from ledger.commands import Pay
from rules.timeutil import to_us
from tests.book_helpers import assert_book_ok, refund, snapshot, topup
from tests.conftest import create_pg_database, drop_pg_database, make_api

MEMBERS = {f"rm{i}": ("ganghwa" if i % 4 == 0 else "seo" if i % 4 == 1 else "namdong") for i in range(12)}
MERCHANTS = [("shop-small", "seo", 100_000_000), ("shop-mid", "namdong", 2_000_000_000),
             ("shop-ganghwa", "ganghwa", 300_000_000), ("shop-big", "seo", 5_000_000_000)]


@pytest.fixture
def two_apps(db_url, tmp_path, request):
    """Two empty books of the same backend: one for the online path, one for the bulk replay."""
    if db_url.startswith("sqlite"):
        other_url, drop = f"sqlite:///{tmp_path / 'other.db'}", None
        shutil.copyfile(request.getfixturevalue("_migrated_sqlite_file"), tmp_path / "other.db")
    else:
        drop, other_url = create_pg_database(template=request.getfixturevalue("_migrated_pg_template"))
    try:
        online, bulk = make_api(db_url), make_api(other_url)
        with online.client, bulk.client:
            yield online, bulk
    finally:
        if drop:
            drop_pg_database(drop)


def _setup(api, city_limit: int | None) -> None:
    for member, district in MEMBERS.items():
        assert api.put(f"/v1/members/{member}", {"district": district}).status_code == 201
    for merchant, district, sales in MERCHANTS:
        r = api.put(f"/v1/merchants/{merchant}", {"name": merchant, "district": district, "category": "grocery",
                                                  "annual_sales": sales, "registered_from": "2019-01-01"})
        assert r.status_code in (200, 201), r.text
    for i, member in enumerate(MEMBERS):
        topup(api, f"t-{member}", member, 400_000 + 50_000 * (i % 5), "2025-10-01T08:00:00+09:00")
    if city_limit is not None:
        r = api.put("/v1/budgets/city/2025-10", {"amount": city_limit}, role="finance")
        assert r.status_code in (200, 201), r.text


def _payments(count: int, seed: int = 7) -> list[Pay]:
    """Payments over October 2025 in time order: members cross the 50만 band, some run out
    of charged money (declined), merchants of every tier."""
    import random

    rng = random.Random(seed)
    start = dt.datetime(2025, 10, 2, 9, 0, tzinfo=dt.timezone(dt.timedelta(hours=9)))
    out = []
    for i in range(count):
        body = PaymentIn(payment_id=f"rp-{i}", member_id=rng.choice(list(MEMBERS)),
                         merchant_id=rng.choice(MERCHANTS)[0], amount=rng.choice([9_900, 17_000, 45_000, 120_000]),
                         occurred_at=(start + dt.timedelta(minutes=37 * i)).isoformat())
        out.append(Pay(body.payment_id, body.member_id, body.merchant_id, body.amount, to_us(body.occurred_at),
                       _fingerprint("payment", body)))
    return out


def _book_rows(api) -> dict:
    """What both paths must agree on, without the recording times and txn ids."""
    out = snapshot(api)
    with api.services.reader.connect() as conn:
        p = s.payments
        out["payment_rows"] = {row[0]: tuple(row[1:]) for row in conn.execute(select(
            p.c.payment_id, p.c.status, p.c.decline_code, p.c.policy_id, p.c.base_won, p.c.counts_toward_month,
            p.c.cashback_won, p.c.detail, p.c.response, p.c.refunded_won, p.c.refund_state))}
        legs, txns = s.ledger_legs, s.ledger_txns
        by_txn: dict[tuple, dict] = {}
        for kind, ref, member, merchant, account, amount in conn.execute(
                select(txns.c.kind, txns.c.ref, txns.c.member_id, txns.c.merchant_id, legs.c.account_id,
                       legs.c.amount_won).join(legs, legs.c.txn_id == txns.c.txn_id)):
            by_txn.setdefault((kind, ref, member, merchant), {})[account] = amount
        out["legs"] = by_txn
    return out


def _online(api, commands) -> None:
    for c in commands:  # one at a time, as HTTP requests arrive
        outcome = api.services.book.execute([c])[0]
        assert outcome.ok, outcome.error


def _replay(api, commands, chunk: int, threads: int = 1):
    book = bulk_replay.replay_book(api.services.book.engine, api.services.book.timeline)
    report, outcomes = bulk_replay.replay_payments(book, commands, chunk=chunk, threads=threads)
    if book.engine.dialect.name == "postgresql" and report.recorded:  # the COPY path was the one taken
        assert isinstance(book, bulk_replay.ReplayBook) and book.step_seconds.get("copy", 0) > 0
    return report, outcomes


@pytest.mark.parametrize("city_limit", [None, 60_000])
def test_bulk_replay_equals_online_path(two_apps, city_limit):
    online, bulk = two_apps
    _setup(online, city_limit)
    _setup(bulk, city_limit)
    commands = _payments(160)
    _online(online, commands)
    report, outcomes = _replay(bulk, commands, chunk=23)
    assert report.recorded == len(commands) and not report.errors and report.replayed == 0
    assert report.chunks == 7
    assert all(o.ok and not o.replayed for o in outcomes)
    assert 0 < report.approved < len(commands)  # some members ran out of money: declined

    a, b = _book_rows(online), _book_rows(bulk)
    assert a["payment_rows"] == b["payment_rows"]
    assert a["legs"] == b["legs"]
    assert a == b
    for code in ("beyond_last_band", "not_eligible", "not_earning_money"):  # `cashback.why`, the same on both
        assert any(f'"code":"{code}"' in row[7] for row in a["payment_rows"].values()), code
    if city_limit is not None:  # the budget bound: partial/skip lines, never over the limit
        assert a["budgets"][("city", "2025-10")][1] <= city_limit
        assert a["budgets"][("city", "2025-10")][1] == city_limit
        assert any('"budget_' in row[7] for row in a["payment_rows"].values())  # a line's reason in the answer
    assert_book_ok(bulk)

    # A second replay of the same file changes nothing: every payment is a replay.
    before = _book_rows(bulk)
    again, outcomes = _replay(bulk, commands, chunk=50)
    assert again.replayed == len(commands) and again.recorded == 0 and not again.errors
    assert [o.raw for o in outcomes] == [row[7].encode() for row in (before["payment_rows"][c.payment_id]
                                                                       for c in commands)]
    assert _book_rows(bulk) == before


def test_refund_and_http_replay_after_bulk_replay(two_apps):
    online, bulk = two_apps
    for api in two_apps:
        _setup(api, None)
    commands = _payments(60, seed=11)
    _online(online, commands)
    _replay(bulk, commands, chunk=16)
    approved = [c for c in commands if bulk.services.book.execute([c])[0].body["status"] == "approved"]
    target = approved[3]

    # The same payment through HTTP after the bulk replay: a replay with the stored answer.
    r = bulk.post("/v1/payments", {"payment_id": target.payment_id, "member_id": target.member_id,
                                   "merchant_id": target.merchant_id, "amount": target.amount_won,
                                   "occurred_at": dt.datetime.fromtimestamp(
                                       target.occurred_at_us / 1e6, dt.timezone(dt.timedelta(hours=9))).isoformat()})
    assert r.status_code == 200 and r.headers.get("Idempotent-Replayed") == "true", r.text
    # Another body under a replayed id: a conflict, nothing changes.
    r = bulk.post("/v1/payments", {"payment_id": target.payment_id, "member_id": target.member_id,
                                   "merchant_id": target.merchant_id, "amount": target.amount_won + 1,
                                   "occurred_at": "2025-10-20T12:00:00+09:00"})
    assert r.status_code == 409 and r.json()["code"] == "idempotency_conflict"

    # Refunds through the normal path, on both books: the same answers and the same book.
    for api in (online, bulk):
        part = refund(api, target.payment_id, "rf-1", target.amount_won // 3, "2025-10-28T10:00:00+09:00")
        rest = refund(api, target.payment_id, "rf-2", target.amount_won - target.amount_won // 3,
                      "2025-10-29T10:00:00+09:00")
        assert rest["payment_refunded_total"] == target.amount_won
        api.last_refunds = (part, rest)
    assert online.last_refunds == bulk.last_refunds
    assert _book_rows(online) == _book_rows(bulk)
    assert_book_ok(bulk)

    # The member's history shows the replayed payment, its cashback and the refunds.
    # (Same order, same effects; transaction ids and recording times are each book's own.)
    histories = []
    for api in (online, bulk):
        r = api.get(f"/v1/members/{target.member_id}/transactions", role="admin")
        assert r.status_code == 200, r.text
        histories.append([{k: v for k, v in item.items() if k not in ("transaction_id", "recorded_at")}
                          for item in r.json()["items"]])
    assert histories[0] == histories[1]
    kinds = [(item["kind"], item["ref"]) for item in histories[1]]
    assert ("payment", target.payment_id) in kinds and ("refund", "rf-1") in kinds and ("refund", "rf-2") in kinds


@pytest.mark.postgres
def test_member_streams_on_two_threads_keep_each_members_order(pg_url, tmp_path, _migrated_pg_template):
    """Two threads (member streams): with no budget binding the book equals the online path."""
    name, other_url = create_pg_database(template=_migrated_pg_template)
    try:
        online, bulk = make_api(pg_url), make_api(other_url)
        with online.client, bulk.client:
            for api in (online, bulk):
                _setup(api, None)
            commands = _payments(200, seed=3)
            _online(online, commands)
            report, _ = _replay(bulk, commands, chunk=17, threads=2)
            assert report.recorded == len(commands) and not report.errors
            assert _book_rows(online) == _book_rows(bulk)
            assert_book_ok(bulk)
    finally:
        drop_pg_database(name)


def test_ids_repeated_in_the_file_land_once(db_url):
    """A payment id twice in one file: the second is a replay (same body) or a conflict
    (another body), in the same chunk or the next; the book holds it once."""
    api = make_api(db_url)
    with api.client:
        _setup(api, None)
        commands = _payments(30, seed=5)
        same = commands[4]
        other = Pay(same.payment_id, same.member_id, same.merchant_id, same.amount_won + 100, same.occurred_at_us,
                    "0" * 64)
        report, outcomes = _replay(api, [*commands[:10], same, other, *commands[10:], same], chunk=8)
        assert report.recorded == 30 and report.replayed == 2 and report.errors == {"idempotency_conflict": 1}
        assert outcomes[10].replayed and outcomes[-1].replayed and outcomes[11].error.code == "idempotency_conflict"
        assert outcomes[10].body == outcomes[4].body
        rows = _book_rows(api)
        assert rows["payments"] == 30 and len(rows["payment_rows"]) == 30
        assert sum(1 for kind, ref, *_ in rows["legs"] if kind == "payment" and ref == same.payment_id) == 1
        assert_book_ok(api)


@pytest.mark.parametrize("threads, city_limit", [(1, 60_000), (2, None)])
def test_windows_leave_the_book_one_pass_leaves(two_apps, threads, city_limit):
    """`replay_windows` (a file too large for every answer in memory): the same payments in
    windows of 37 leave the same book as one `replay_payments` pass (on one stream with a
    budget that binds; on two streams with none, since a binding budget goes to whichever
    stream locks it first); the sink gets every payment and its outcome once, in the order
    given, each window after it committed; the list is consumed; the counts add up."""
    one, windowed = two_apps
    if threads == 2 and one.services.book.engine.dialect.name != "postgresql":
        pytest.skip("member streams on two threads need PostgreSQL")
    for api in two_apps:
        _setup(api, city_limit)
    commands = _payments(160, seed=13)
    whole, whole_outcomes = _replay(one, commands, chunk=11, threads=threads)

    book = bulk_replay.replay_book(windowed.services.book.engine, windowed.services.book.timeline)
    seen: list[tuple[str, bytes | None]] = []
    committed: list[int] = []

    def sink(part, outcomes):
        assert len(part) == len(outcomes) <= 37
        with windowed.services.reader.connect() as conn:  # the window is in the book already
            committed.append(len(conn.execute(select(s.payments.c.payment_id).where(
                s.payments.c.payment_id.in_([c.payment_id for c in part]))).all()))
        seen.extend((c.payment_id, o.raw) for c, o in zip(part, outcomes))

    listed = list(commands)
    report = bulk_replay.replay_windows(book, listed, chunk=11, threads=threads, window=37, sink=sink)
    assert listed == [None] * len(commands)
    assert committed == [37, 37, 37, 37, 12]
    assert [pid for pid, _ in seen] == [c.payment_id for c in commands]
    assert [raw for _, raw in seen] == [o.raw for o in whole_outcomes]
    assert (report.payments, report.recorded, report.approved, report.replayed, report.errors) == \
        (whole.payments, whole.recorded, whole.approved, whole.replayed, whole.errors)
    assert report.chunks >= 5 * threads
    rows = _book_rows(windowed)
    assert rows == _book_rows(one)
    if city_limit is not None:  # it bound, and was never passed
        assert rows["budgets"][("city", "2025-10")][1] == city_limit
    assert_book_ok(windowed)

    again = bulk_replay.replay_windows(book, list(commands), chunk=11, threads=threads, window=37)
    assert again.replayed == len(commands) and again.recorded == 0 and not again.errors
    with pytest.raises(AssertionError, match="each list once"):
        bulk_replay.replay_windows(book, listed, chunk=11, window=37)


@pytest.mark.postgres
@pytest.mark.parametrize("threads", [1, 2])
def test_a_payment_id_under_two_members_is_decided_in_the_order_given(pg_url, threads):
    """Member streams kept each member's order, but a payment id that is under two members
    couples them as much as a member does: with two streams the later line (another
    member, another body) was recorded if its stream reached it first, and the earlier
    one refused, charging the wrong member (bulk replay audit). Such members now share a
    stream."""
    import zlib

    first, second = "rm1", next(m for m in MEMBERS if zlib.crc32(m.encode()) % 2 != zlib.crc32(b"rm1") % 2)
    api = make_api(pg_url)
    with api.client:
        _setup(api, None)
        start = dt.datetime(2025, 10, 2, 9, 0, tzinfo=dt.timezone(dt.timedelta(hours=9)))

        def pay(payment_id: str, member: str, amount: int, minutes: int) -> Pay:
            body = PaymentIn(payment_id=payment_id, member_id=member, merchant_id="shop-small", amount=amount,
                             occurred_at=(start + dt.timedelta(minutes=minutes)).isoformat())
            return Pay(body.payment_id, member, body.merchant_id, body.amount, to_us(body.occurred_at),
                       _fingerprint("payment", body))

        commands = [pay(f"a-{i}", first, 1_000, i) for i in range(12)]  # the first member's stream is longer
        commands += [pay("dup", first, 1_000, 60), pay("dup", second, 2_000, 61)]
        report, outcomes = _replay(api, commands, chunk=1, threads=threads)
        assert outcomes[-2].ok and not outcomes[-2].replayed
        assert outcomes[-1].error is not None and outcomes[-1].error.code == "idempotency_conflict"
        with api.services.reader.connect() as conn:
            row = conn.execute(select(s.payments.c.member_id, s.payments.c.amount_won)
                               .where(s.payments.c.payment_id == "dup")).one()
        assert tuple(row) == (first, 1_000)
        assert_book_ok(api)
