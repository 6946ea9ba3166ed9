"""Demo data: members in all ten districts, merchants of every tier, topped-up balances,
and the shipped relief-grant programs (policies/grants/), each created by one demo actor
and approved by another through the same maker-checker path as the API's, in the audit log.

Deterministic (seeded) so the README's curl examples give the answers they show."""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

from sqlalchemy import Engine, func, literal, select

from ledger import registry
from ledger import schema as s
import ledger.book
from ledger.book import Book
from ledger.commands import TopUp, request_hash
from ledger.keys import Principal
from rules.document import DISTRICTS
from rules.grants import GrantProgramDocument
from rules.loader import load_grant_program_dir
from rules.timeutil import to_us

SEOUL = dt.timezone(dt.timedelta(hours=9))
CATEGORIES = ("restaurant", "cafe", "grocery", "pharmacy", "bakery", "hair_salon", "clothing", "academy")
ACTOR = "demo-loader"
# Two people for the grant programs' maker-checker (in-process actors, not API keys).
GRANT_AUTHOR = Principal(key_id="demo-editor", name="demo policy editor", role="policy-editor")
GRANT_APPROVER = Principal(key_id="demo-approver", name="demo policy approver", role="policy-approver")


# What makes a book one the demo must not load into: anything in the registry or the
# ledger, or a policy made through the API. Not the policy files a start records, nor API
# keys: a first `eum serve` or `eum keys create` leaves those in a book still empty.
HELD = ((s.members, "member"), (s.merchants, "merchant"), (s.grant_programs, "grant program"),
        (s.ledger_txns, "ledger transaction"))
HELD_COUNTED = 10_000


def held_data(engine: Engine) -> str | None:
    """What the book holds that the demo would mix with ("200 members, 101 merchants"),
    or None for a book the demo may load into. It had counted members alone, so a book
    with merchants and no member yet took the demo's members, merchants and top-ups."""
    held = []

    def counted(stmt) -> str:
        """The rows of `stmt` counted up to HELD_COUNTED ("10,000+" past it): `serve
        --demo` asks at every start (scripts/serve.sh), and a whole count of a real book's
        ledger was a scan of millions of rows."""
        n = conn.execute(select(func.count()).select_from(stmt.limit(HELD_COUNTED + 1).subquery())).scalar_one()
        return "" if not n else f"{min(n, HELD_COUNTED):,}{'+' if n > HELD_COUNTED else ''}"

    with engine.connect() as conn:
        for table, noun in HELD:
            if count := counted(select(literal(1)).select_from(table)):
                held.append(f"{count} {noun}{'' if count == '1' else 's'}")
        if count := counted(select(literal(1)).select_from(s.policies).where(s.policies.c.origin != "file")):
            held.append(f"{count} polic{'y' if count == '1' else 'ies'} made through the API")
    return ", ".join(held) or None


def load_grant_programs(engine: Engine, programs: list[GrantProgramDocument], *, author: Principal = GRANT_AUTHOR,
                        approver: Principal = GRANT_APPROVER) -> list[str]:
    """Each program created as a draft by `author`, then approved by `approver` (refused,
    and nothing written, if they are one person), each step in the audit log."""
    with engine.begin() as conn:
        for program in programs:
            _, created = registry.create_grant_program(conn, program, author.actor)
            if created:
                registry.approve_grant_program(conn, program.program_id, approver)
    return [program.program_id for program in programs]


class DemoRefused(Exception):
    """The book refused some of the demo's top-ups."""


def load(engine: Engine, book: Book, *, members_per_district: int = 20, merchants_per_district: int = 10,
         seed: int = 7, today: dt.date | None = None, grants_dir: Path | None = None) -> dict:
    # Every program file is checked (PolicyInvalid names the line) before anything is written.
    programs = load_grant_program_dir(grants_dir) if grants_dir is not None else []
    rng = random.Random(seed)
    today = today or dt.datetime.now(SEOUL).date()
    with engine.begin() as conn:
        for district in DISTRICTS:
            for n in range(1, members_per_district + 1):
                registry.put_member(conn, member_id=f"m-{district}-{n:03d}", district=district, status="active",
                                    actor=ACTOR)
            for n in range(1, merchants_per_district + 1):
                # Mostly small shops; every tenth between 3억 and 30억; one per district above 30억.
                sales = rng.randint(30_000_000, 290_000_000)
                if n % 10 == 0:
                    sales = rng.randint(300_000_000, 2_900_000_000)
                if n == merchants_per_district:
                    sales = 4_000_000_000
                registry.put_merchant(conn, merchant_id=f"shop-{district}-{n:03d}", name=f"{district} shop {n}",
                                      district=district, category=CATEGORIES[n % len(CATEGORIES)],
                                      annual_sales_won=sales, registered_from=dt.date(2019, 1, 1),
                                      flags=["good_price"] if n == 3 else ["winwin"] if n == 2 else [],
                                      merchant_share_bp=500 if n == 2 else 0, actor=ACTOR)
        registry.put_merchant(conn, merchant_id="mart-namdong-001", name="Big mart", district="namdong",
                              category="large_mart", annual_sales_won=90_000_000_000,
                              registered_from=dt.date(2019, 1, 1), flags=[], merchant_share_bp=0, actor=ACTOR)
    # 09:00 on the month's first day, or earlier that day when the book's clock is not yet
    # there: top-ups dated ahead of it were all refused (occurred_at_in_future), loading
    # members with nothing on the 1st before 09:00 (new-user audit).
    first = dt.datetime.combine(today.replace(day=1), dt.time(0, 0), SEOUL)
    now = dt.datetime.fromtimestamp(ledger.book.now_us() / 1e6, SEOUL)
    start = min(first.replace(hour=9), max(first, now - dt.timedelta(minutes=1)))
    commands = []
    for district in DISTRICTS:
        for n in range(1, members_per_district + 1):
            member_id = f"m-{district}-{n:03d}"
            amount = rng.choice((100_000, 200_000, 300_000, 500_000))
            body = {"topup_id": f"demo-topup-{member_id}", "member_id": member_id, "amount": amount}
            commands.append(TopUp(body["topup_id"], member_id, amount, to_us(start), request_hash("topup", body)))
    for i in range(0, len(commands), 200):
        if refused := [o.error for o in book.execute(commands[i:i + 200]) if o.error is not None]:
            raise DemoRefused(f"the demo's top-ups were refused ({refused[0].code}: {refused[0]}); the members "
                              "and merchants are loaded, nothing more")
    load_grant_programs(engine, programs)
    return {"members": members_per_district * len(DISTRICTS), "merchants": merchants_per_district * len(DISTRICTS) + 1,
            "topups": len(commands), "grant_programs": len(programs)}
