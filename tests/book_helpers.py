"""Helpers shared by the book-of-record tests: read the ledger back through SQL, set up
reference data through the API, and check the money invariant."""

from __future__ import annotations

import contextlib
from unittest import mock

from sqlalchemy import func, select

from ledger import schema as s
from ledger.queries import check_book

PROBLEM_FIELDS = ("type", "title", "status", "detail", "code")


def assert_book_ok(api_or_engine) -> None:
    """Every row of `check_book` is ok: balanced transactions, balances = legs, no
    floor-zero account below zero, budgets within limits and equal to funder accounts."""
    with _reader(api_or_engine).connect() as conn:
        results = check_book(conn)
    bad = [r for r in results if not r.ok]
    assert not bad, bad
    assert len(results) >= 7, results


def assert_months_hold_their_payments(api_or_engine) -> None:
    """Each member-month's cashback counters equal what its approved payments hold, per
    component (`ledger.book.cashback_held`: their lines or corrected parts, less what
    refunds clawed back), and its eligible spend the base of those that count toward
    the month, less what their refunds gave back: corrections and refunds move the
    counters and the payments alike. (Not a book check: a correction posted before
    migration 0014 moved the cashback counters alone, and one posted before 0017 moved
    neither a payment's base nor its month's eligible spend.)"""
    import orjson

    from ledger.book import cashback_held

    p, m = s.payments, s.member_months
    want: dict[tuple[str, str], dict[str, int]] = {}
    eligible: dict[tuple[str, str], int] = {}
    with _reader(api_or_engine).connect() as conn:
        for member_id, month, detail, state, base, counts in conn.execute(
                select(p.c.member_id, p.c.month, p.c.detail, p.c.refund_state, p.c.base_won, p.c.counts_toward_month)
                .where(p.c.status == "approved")):
            state = orjson.loads(state)
            components = want.setdefault((member_id, month), {})
            for (component_id, _), won in cashback_held(orjson.loads(detail), state).items():
                components[component_id] = components.get(component_id, 0) + won
            if counts:
                eligible[(member_id, month)] = eligible.get((member_id, month), 0) + base - state.get("base", 0)
        got = {(member_id, month): (eligible_won, cashback, orjson.loads(components))
               for member_id, month, eligible_won, cashback, components in conn.execute(
                   select(m.c.member_id, m.c.month, m.c.eligible_spend_won, m.c.cashback_won, m.c.component_cashback))}
    for key in set(want) | set(got):
        components = {k: v for k, v in want.get(key, {}).items() if v}
        assert got.get(key, (0, 0, {})) == (eligible.get(key, 0), sum(components.values()), components), \
            (key, got.get(key), eligible.get(key, 0), components)


def _reader(api_or_engine):
    from ledger.db import reader

    services = getattr(api_or_engine, "services", None)
    if services is not None:
        return services.reader
    return reader(api_or_engine)


def account_balance(api, account_id: str) -> int:
    """An account's balance in its normal sign (0 if the account does not exist)."""
    with _reader(api).connect() as conn:
        value = conn.execute(select(s.accounts.c.balance_won)
                             .where(s.accounts.c.account_id == account_id)).scalar_one_or_none()
    return int(value or 0)


def legs_sum(api, account_id: str) -> int:
    """Σ of an account's legs (debit positive)."""
    with _reader(api).connect() as conn:
        value = conn.execute(select(func.coalesce(func.sum(s.ledger_legs.c.amount_won), 0))
                             .where(s.ledger_legs.c.account_id == account_id)).scalar_one()
    return int(value)


def txn_legs(api, kind: str, ref: str) -> dict[str, int]:
    """The legs of the transaction(s) of one kind and ref: account -> Σ amount (debit +)."""
    legs, txns = s.ledger_legs, s.ledger_txns
    with _reader(api).connect() as conn:
        rows = conn.execute(select(legs.c.account_id, legs.c.amount_won)
                            .join(txns, txns.c.txn_id == legs.c.txn_id)
                            .where((txns.c.kind == kind) & (txns.c.ref == ref))).all()
    out: dict[str, int] = {}
    for account_id, amount in rows:
        out[account_id] = out.get(account_id, 0) + int(amount)
    return out


def txn_count(api, ref: str | None = None) -> int:
    with _reader(api).connect() as conn:
        query = select(func.count()).select_from(s.ledger_txns)
        if ref is not None:
            query = query.where(s.ledger_txns.c.ref == ref)
        return int(conn.execute(query).scalar_one())


def snapshot(api) -> dict:
    """Row counts of every written table and every account balance and budget: two
    equal snapshots mean a request changed nothing."""
    out: dict = {}
    with _reader(api).connect() as conn:
        for table in (s.ledger_txns, s.ledger_legs, s.payments, s.topups, s.refunds, s.grant_disbursements,
                      s.member_months, s.members, s.merchants, s.grant_programs):
            out[table.name] = int(conn.execute(select(func.count()).select_from(table)).scalar_one())
        out["accounts"] = dict(conn.execute(select(s.accounts.c.account_id, s.accounts.c.balance_won)).all())
        # A budget row with no limit and nothing committed is the same as no row (the
        # book creates such rows to lock them), so it is left out.
        out["budgets"] = {(src, per): (limit, committed) for src, per, limit, committed in conn.execute(
            select(s.budgets.c.source, s.budgets.c.period, s.budgets.c.limit_won, s.budgets.c.committed_won))
            if limit is not None or committed}
        out["months"] = {(m, mo): (e, c, t) for m, mo, e, c, t in conn.execute(
            select(s.member_months.c.member_id, s.member_months.c.month, s.member_months.c.eligible_spend_won,
                   s.member_months.c.cashback_won, s.member_months.c.topped_up_won))}
    return out


def put_merchant(api, merchant_id: str, *, district: str = "seo", sales: int = 100_000_000,
                 category: str = "restaurant", registered_from: str = "2019-01-01", **extra) -> None:
    body = {"name": f"Shop {merchant_id}", "district": district, "category": category, "annual_sales": sales,
            "registered_from": registered_from, **extra}
    r = api.put(f"/v1/merchants/{merchant_id}", body)
    assert r.status_code in (200, 201), r.text


def approve_program(api, program_id: str, role: str = "policy-approver") -> dict:
    """A grant program is created as a draft; a second person opens it for disbursement."""
    r = api.post(f"/v1/grant-programs/{program_id}/approve", role=role)
    assert r.status_code == 200 and r.json()["status"] == "open", r.text
    return r.json()


def put_member(api, member_id: str, *, district: str = "seo", status: str = "active") -> None:
    r = api.put(f"/v1/members/{member_id}", {"district": district, "status": status})
    assert r.status_code in (200, 201), r.text


def topup(api, topup_id: str, member_id: str, amount: int, occurred_at: str) -> dict:
    r = api.post("/v1/topups", {"topup_id": topup_id, "member_id": member_id, "amount": amount,
                                "occurred_at": occurred_at})
    assert r.status_code == 201, r.text
    return r.json()


def pay(api, payment_id: str, member_id: str, merchant_id: str, amount: int, occurred_at: str) -> dict:
    r = api.post("/v1/payments", {"payment_id": payment_id, "member_id": member_id, "merchant_id": merchant_id,
                                  "amount": amount, "occurred_at": occurred_at})
    assert r.status_code == 201, r.text
    return r.json()


def refund(api, payment_id: str, refund_id: str, amount: int, occurred_at: str) -> dict:
    r = api.post(f"/v1/payments/{payment_id}/refunds", {"refund_id": refund_id, "amount": amount,
                                                        "occurred_at": occurred_at})
    assert r.status_code == 201, r.text
    return r.json()


def month_of_member(api, member_id: str, month: str) -> dict:
    r = api.get(f"/v1/members/{member_id}/balance", params={"month": month})
    assert r.status_code == 200, r.text
    return r.json()


def budget_rows(api) -> dict[tuple[str, str], dict]:
    r = api.get("/v1/budgets", role="policy-editor")
    assert r.status_code == 200, r.text
    return {(b["source"], b["period"]): b for b in r.json()["budgets"]}


def assert_problem(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body = response.json()
    for name in PROBLEM_FIELDS:
        assert name in body, (name, body)
    assert body["status"] == status
    if code is not None:
        assert body["code"] == code, body
    return body


def commit_late(monkeypatch, ref: str, seconds: float) -> None:
    """The batch writing a transaction of `ref` (a payment's or a disbursement's id)
    waits `seconds` before its write: its request gives up at the request timeout (503)
    while the batch goes on to commit, as behind another worker's long batch."""
    import time

    from ledger.book import Book

    write = Book._write

    def late(self, conn, state):
        if any(txn[2] == ref for txn in state.writes.txns):
            time.sleep(seconds)
        return write(self, conn, state)

    monkeypatch.setattr(Book, "_write", late)


def commit_then_break(monkeypatch) -> list:
    """The next COMMIT of a batch writer goes through and then its connection breaks
    (PostgreSQL): the writer cannot tell it from a COMMIT that failed, and runs the
    batch again on a new connection, where it finds its rows. (A batch whose write
    pipeline sent its COMMIT meets the break at SQLAlchemy's commit, which follows it.)
    Returns a list that holds True once the fault was injected."""
    import threading

    import psycopg

    injected: list = []
    commit = psycopg.Connection.commit

    def commit_and_break(self):
        commit(self)
        if not injected and threading.current_thread().name.startswith("eum-batch-writer"):
            injected.append(True)
            self.close()
            raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(psycopg.Connection, "commit", commit_and_break)
    return injected


def migrate_down_and_up(db_url: str, revision: str, table: str | None = None):
    """`command.downgrade` to `revision` and back to the head, with what `schema()` reads
    before, between and after: the database's tables, or `table`'s columns."""
    from alembic import command
    from sqlalchemy import inspect

    from ledger.db import alembic_config, make_engine, migrate

    def schema() -> set[str]:
        engine = make_engine(db_url)
        try:
            found = inspect(engine)
            return set(found.get_table_names()) if table is None else {c["name"] for c in found.get_columns(table)}
        finally:
            engine.dispose()

    before = schema()
    command.downgrade(alembic_config(db_url), revision)
    between = schema()
    migrate(db_url)
    return before, between, schema()



@contextlib.contextmanager
def proposed_by_an_earlier_release():
    """Corrections proposed meanwhile as a release before the lines digest proposed them:
    the `correction.propose` entry records no `lines_sha256`, so lines a test then edits
    to look older (no per-payment rows, no base) are taken as they are."""
    with mock.patch("ledger.corrections.correction_lines_sha256", lambda conn, correction_id: None):
        yield


def approved_by_an_earlier_release(api, correction_id: str, approver: str = "test approver") -> None:
    """A correction marked approved as an earlier release approved it: its status and
    approver, and the `correction.approve` entry that made it so (no lines posted)."""
    import time

    from ledger import audit

    with api.services.engine.begin() as conn:
        conn.execute(s.corrections.update().where(s.corrections.c.correction_id == correction_id)
                     .values(status="approved", approver=approver))
        audit.append(conn, at_us=time.time_ns() // 1000, actor=approver, action="correction.approve",
                     object_type="correction", object_id=correction_id, detail={"author": "an earlier release"})


def city_policy(policy_id: str, up_to_won: int, rate_bp: int) -> dict:
    """The generator's policy (`datagen.demo_policy_data`) under another id, its city
    component paying `rate_bp` on the first `up_to_won` of a month's spend."""
    from settlement import datagen

    doc = {**datagen.demo_policy_data(), "policy_id": policy_id}
    doc["components"] = [{**doc["components"][0], "variants": [
        {"id": "standard", "bands": [{"up_to_won": up_to_won, "rate_bp": rate_bp}]}]}, *doc["components"][1:]]
    return doc


def generated_book(url: str, *, corrected: bool = False, backdated: bool = False, moved: bool = False):
    """A generated book from 2026-03-02 (4 days), with points, grant money (of a program
    that earns cashback and one that does not) and partial and whole refunds; returns
    (engine, timeline, start). `corrected`: a correction of its first two days (rest of
    March with them) to the city component at 7% on the first 20만 (`city-7`, right
    policy `datagen-2026-city-7`) is posted between two halves of its refunds.
    `backdated`: a quarter of its first two days' payments are recorded after all the
    rest (some then find too little money, and their refunds are refused). `moved`:
    between its batches, the registry moves a third of the merchants and members to
    another district and changes the merchants' sales (each a new fact version,
    migration 0022), so the readers judge each payment by the facts it was recorded under."""
    import datetime as dt

    from ledger.book import Book
    from ledger.commands import Pay, Refund
    from ledger.db import make_engine
    from ledger.errors import PaymentNotRefundable
    from rules.timeutil import local_midnight_us
    from settlement import datagen

    start = dt.date(2026, 3, 2)
    plan = datagen.command_plan(5, start, 4, members=50, merchants=20, payments_per_day=250, grant_share=0.3)
    timeline = datagen.demo_timeline()
    plan.programs.append(datagen.demo_grant_program(start, start + dt.timedelta(days=60)).model_copy(
        update={"program_id": "relief-earns", "cashback_on_spend": True}))
    engine = make_engine(url)
    with engine.begin() as conn:
        datagen.register(conn, plan)
    book = Book(engine, timeline)
    refunds = [c for c in plan.commands if isinstance(c, Refund)]
    rest = [c for c in plan.commands if not isinstance(c, Refund)]
    if backdated:
        cut = local_midnight_us(start + dt.timedelta(days=2))
        late = {id(c) for c in [c for c in rest if isinstance(c, Pay) and c.occurred_at_us < cut][::4]}
        rest = [c for c in rest if id(c) not in late] + [c for c in rest if id(c) in late]
    # Half the grant recipients also get the earning program, spent before the other.
    grants = [c for c in rest if c.kind == "disbursement"]
    extra = [datagen.disburse(f"E-{c.disbursement_id}", "relief-earns", c.member_id, 7_000, c.occurred_at_us)
             for c in grants[::2]]
    for i in range(0, len(rest), 256):
        assert all(o.ok for o in book.execute(rest[i:i + 256] if i else extra + rest[:256]))
        if moved:
            _registry_moved(engine, plan, i // 256)

    def refund(commands) -> None:
        # Recorded later, some payments find less money: those declined are not refunded.
        assert all(o.ok or (backdated and isinstance(o.error, PaymentNotRefundable)) for o in book.execute(commands))

    if not corrected:
        refund(refunds)
        return engine, timeline, start
    refund(refunds[::2])
    _first_days_corrected(engine, book, timeline, local_midnight_us(start),
                          local_midnight_us(start + dt.timedelta(days=2)))
    refund(refunds[1::2])
    return engine, timeline, start


def _registry_moved(engine, plan, turn: int) -> None:
    """A third of the merchants and members (another third each turn) to the next
    district, and those merchants' sales up by a third (past a tier now and then)."""
    from ledger import registry
    from rules.document import DISTRICTS

    def next_district(district: str) -> str:
        return DISTRICTS[(DISTRICTS.index(district) + 1) % len(DISTRICTS)]

    with engine.begin() as conn:
        for row in plan.merchants[turn % 3::3]:
            row.update(district=next_district(row["district"]), annual_sales_won=row["annual_sales_won"] * 4 // 3)
            registry.put_merchant(conn, actor="test", **row)
        for row in plan.members[turn % 3::3]:
            row.update(district=next_district(row["district"]))
            registry.put_member(conn, actor="test", **row)


def _first_days_corrected(engine, book, timeline, from_us: int, to_us: int) -> None:
    from ledger import corrections
    from ledger.keys import Principal
    from ledger.policies import create_draft
    from rules.document import PolicyDocument
    from settlement import datagen

    wrong, right = datagen.demo_policy_data(), city_policy("datagen-2026-city-7", 200_000, 700)
    editor = Principal("k1", "editor", "policy-editor")
    with engine.begin() as conn:
        for doc in (wrong, right):
            create_draft(conn, PolicyDocument.model_validate(doc), editor)
    proposal = corrections.propose(engine, timeline, correction_id="city-7", wrong_policy_id=wrong["policy_id"],
                                   right_policy_id=right["policy_id"], from_us_=from_us, to_us_=to_us, author=editor)
    assert proposal["summary"]["payments_changed"] > 100, proposal["summary"]
    posted = corrections.approve_and_post(engine, book, "city-7", Principal("k2", "approver", "policy-approver"))
    assert posted["status"] == "posted", posted


def flat_grant_program(program_id: str, amount_won: int = 10_000) -> dict:
    """A grant program body paying every recipient `amount_won`, funded half and half by
    the national government and the city, a member as often as given."""
    return {"program_id": program_id, "name": program_id, "valid_from": "2025-07-01", "valid_until": "2025-11-30",
            "restrictions": {}, "funding": {"national": 5000, "city": 5000}, "remainder_to": "city",
            "cashback_on_spend": False, "once_per_member": False,
            "amount_rules": {"base": [{"id": "general", "amount_won": amount_won}]}}


def lock_waiters(pg_url: str) -> int:
    """How many sessions of the database wait for a lock now (PostgreSQL)."""
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                            "AND wait_event_type = 'Lock'").fetchone()[0]


def wait_until(predicate, what: str, seconds: float = 4.0) -> None:
    """Poll `predicate` every 20 ms; fail naming `what` after `seconds` (by default
    within the book's 5 s lock timeout, for a test that holds a row a batch waits for)."""
    import time

    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@contextlib.contextmanager
def rows_held(pg_url: str, sql: str):
    """Another session holding the rows `sql` locks (`SELECT ... FOR UPDATE`) until the
    block ends."""
    from sqlalchemy import text

    from ledger.db import make_engine

    engine = make_engine(pg_url)
    conn = engine.connect()
    try:
        conn.execute(text(sql))
        yield
    finally:
        conn.rollback()
        conn.close()
        engine.dispose()


def draft_with_variant(policy_id: str, when: dict, eligibility: dict | None = None) -> dict:
    """The shipped 2025-09 policy as a new draft `policy_id` (no date of its own), with a
    variant "special" (7% up to 300,000 won) first in its first component, applying
    `when`, and `eligibility` added to its cashback eligibility."""
    import yaml

    from tests.conftest import POLICIES

    doc = yaml.safe_load((POLICIES / "2025-09-all-under-30eok.yaml").read_text())
    doc["policy_id"] = policy_id
    doc.pop("effective_from")
    doc["components"][0]["variants"].insert(0, {"id": "special", "when": when,
                                                "bands": [{"up_to_won": 300_000, "rate_bp": 700}]})
    doc["cashback_eligibility"].update(eligibility or {})
    return doc
