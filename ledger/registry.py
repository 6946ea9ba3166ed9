"""Members, merchants, grant programs and budget limits: the slow-moving reference data.

Every function takes a connection inside a transaction that its caller commits."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any, Callable

import orjson
import structlog
from sqlalchemy import Connection, func, literal, select, update

from ledger import accounts as acct
from ledger import audit
from ledger import schema as s
from ledger.db import dialect_insert
from ledger.errors import BudgetBelowCommitted, Conflict, WinwinWithoutShare
from rules.grants import GrantProgramDocument
from rules.timeutil import rfc3339


log = structlog.get_logger("ledger.registry")


def _now_us() -> int:
    return time.time_ns() // 1000


def reason_detail(reason: str | None) -> dict:
    """The audit detail's `reason`, when the change came with one."""
    return {} if reason is None else {"reason": reason}


def ensure_accounts(conn: Connection, account_ids: list[str], owner_id: str | None = None) -> None:
    rows = []
    for account_id in sorted(account_ids):
        kind, floor_zero = acct.account_type(account_id)
        rows.append({"account_id": account_id, "type": kind, "owner_id": owner_id, "balance_won": 0,
                     "floor_zero": floor_zero})
    conn.execute(dialect_insert(conn)(s.accounts).on_conflict_do_nothing(), rows)


def put_member(conn: Connection, *, member_id: str, district: str, status: str | None, actor: str,
               reason: str | None = None) -> tuple[dict, bool]:
    """Create or update a member. Returns (body, created). `status` None (left out of
    the PUT) keeps the member's status, `active` for a new member: a registry update
    that names only the district must not reactivate a suspended card. A change of the
    facts appends their version (`append_version`)."""
    now = _now_us()
    t = s.members
    # Insert-if-absent first: two requests creating one member at once both find no row,
    # and the second plain INSERT was a 500 (a unique violation). The loser updates.
    created = conn.execute(dialect_insert(conn)(t).values(member_id=member_id, district=district,
                                                   status=status or MEMBER_ACTIVE, created_at_us=now,
                                                   updated_at_us=now)
                           .on_conflict_do_nothing().returning(t.c.member_id)).first() is not None
    existing = None if created else conn.execute(select(t).where(t.c.member_id == member_id).with_for_update()).one()
    # Timed with the member locked, as a batch stamps its `recorded_at` (`ledger.book`):
    # a batch that read the member before this change was stamped before this time, one
    # after it waits for this commit and is stamped after.
    now = now if existing is None else _now_us()
    status = status or (MEMBER_ACTIVE if existing is None else existing.status)
    if existing is None:
        ensure_accounts(conn, [acct.member_charged(member_id), acct.member_points(member_id)], owner_id=member_id)
    elif (existing.district, existing.status) != (district, status):
        conn.execute(update(t).where(t.c.member_id == member_id)
                     .values(district=district, status=status, updated_at_us=now))
    if existing is None or (existing.district, existing.status) != (district, status):
        append_version(conn, s.member_facts, member_id, now, {"district": district, "status": status})
        audit.append(conn, at_us=now, actor=actor, action="member.put", object_type="member", object_id=member_id,
                     detail={"district": district, "status": status,
                             "before": None if existing is None else {"district": existing.district,
                                                                      "status": existing.status},
                             **reason_detail(reason)})
    return {"member_id": member_id, "district": district, "status": status}, existing is None


MEMBER_ACTIVE = "active"


def get_member(conn: Connection, member_id: str) -> dict:
    """A member's registry record: district, status, and when it was made and last changed."""
    from ledger.errors import MemberNotFound

    row = conn.execute(select(s.members).where(s.members.c.member_id == member_id)).first()
    if row is None:
        raise MemberNotFound(f"no member {member_id!r}")
    return {"member_id": member_id, "district": row.district, "status": row.status,
            "created_at": rfc3339(row.created_at_us), "updated_at": rfc3339(row.updated_at_us)}


_MERCHANT_VALUES = ("name", "district", "category", "annual_sales_won", "registered_from", "flags",
                    "merchant_share_bp")


def get_merchant(conn: Connection, merchant_id: str) -> dict:
    """A merchant's registry record as `PUT` took it, and when it last changed."""
    from ledger.errors import MerchantNotFound

    row = conn.execute(select(s.merchants).where(s.merchants.c.merchant_id == merchant_id)).first()
    if row is None:
        raise MerchantNotFound(f"no merchant {merchant_id!r}")
    return _merchant_record(row)


def _merchant_record(row) -> dict:
    body = merchant_body(row.merchant_id, {k: getattr(row, k) for k in _MERCHANT_VALUES})
    body["updated_at"] = rfc3339(row.updated_at_us)
    return body


def list_merchants(conn: Connection, *, limit: int, after: str | None = None, district: str | None = None,
                   flag: str | None = None) -> dict:
    """Merchants in id order, a page at a time (`after` = the page's `next_after`)."""
    t = s.merchants
    query = select(t).order_by(t.c.merchant_id).limit(limit + 1)
    if after is not None:
        query = query.where(t.c.merchant_id > after)
    if district is not None:
        query = query.where(t.c.district == district)
    if flag is not None:  # flags are stored as a sorted comma list
        query = query.where((literal(",") + t.c.flags + literal(",")).contains(f",{flag},", autoescape=True))
    rows = conn.execute(query).all()
    page, more = rows[:limit], len(rows) > limit
    return {"items": [_merchant_record(r) for r in page],
            "next_after": page[-1].merchant_id if more and page else None}


WINWIN = "winwin"


def merchant_flags(flags: list[str], merchant_share_bp: int, *, sent: bool = True) -> str:
    """The stored flags (a sorted comma list). A 상생 (win-win) merchant is one that
    shares: the `winwin` flag, which the win-win policy's components ask for, follows
    `merchant_share_bp` (API.md's "merchant-funded cashback share (상생)"), so a share
    given without the flag still pays, and a merchant that shares nothing earns no
    district top-up. `winwin` sent with no share is refused; kept from the stored flags
    when the share ends, it goes."""
    if sent and WINWIN in flags and merchant_share_bp == 0:
        raise WinwinWithoutShare("a 상생 (winwin) merchant shares 100..500 bp of its sales: give merchant_share_bp, "
                                 "or leave the flag out")
    chosen = set(flags) - {WINWIN}
    if merchant_share_bp > 0:
        chosen.add(WINWIN)
    return ",".join(sorted(chosen))


def put_merchant(conn: Connection, *, merchant_id: str, name: str, district: str, category: str,
                 annual_sales_won: int, registered_from: dt.date, flags: list[str] | None,
                 merchant_share_bp: int | None, actor: str, reason: str | None = None) -> tuple[dict, bool]:
    """Create or update a merchant. Returns (body, created). `flags` or
    `merchant_share_bp` None (left out of the PUT) keeps what is stored (none for a new
    merchant): a yearly sales update must not drop 착한가격업소 or the 상생 share."""
    now = _now_us()
    t = s.merchants

    def merged(existing) -> dict:
        """The row to store: what was sent, and for what was left out what is stored
        (none for a new merchant); the flags checked against the share it will have."""
        share = merchant_share_bp if merchant_share_bp is not None else (
            existing.merchant_share_bp if existing is not None else 0)
        kept = flags if flags is not None else (
            [f for f in existing.flags.split(",") if f] if existing is not None else [])
        return {"name": name, "district": district, "category": category, "annual_sales_won": annual_sales_won,
                "registered_from": registered_from.isoformat(),
                "flags": merchant_flags(kept, share, sent=flags is not None), "merchant_share_bp": share}

    locked = select(t).where(t.c.merchant_id == merchant_id).with_for_update()
    existing = conn.execute(locked).first()
    # Timed with the row locked (one registry write of a merchant at a time). Batches read
    # merchants unlocked (`ledger.book`): one that read the facts before this commits and
    # stamped its `recorded_at` after this time is re-evaluated on this version in
    # corrections, and counted as a mismatch there (docs/design.md, "Corrections").
    now = _now_us()
    if existing is None:
        values = merged(None)
        # Insert-if-absent: two requests creating one merchant at once both find no row,
        # and the second plain INSERT was a 500 (a unique violation). The loser updates.
        if conn.execute(dialect_insert(conn)(t).values(merchant_id=merchant_id, updated_at_us=now, **values)
                        .on_conflict_do_nothing().returning(t.c.merchant_id)).first() is None:
            existing = conn.execute(locked).one()
    if existing is not None:
        values = merged(existing)
    before = None if existing is None else {k: getattr(existing, k) for k in values}
    if existing is None:
        ensure_accounts(conn, [acct.merchant_payable(merchant_id)])
    elif before != values:
        conn.execute(update(t).where(t.c.merchant_id == merchant_id).values(updated_at_us=now, **values))
    facts = {k: v for k, v in values.items() if k != "name"}  # what rules read: all but the name
    if existing is None or {k: before[k] for k in facts} != facts:
        append_version(conn, s.merchant_facts, merchant_id, now, facts)
    if before != values:  # the fee tier, the cashback tier and the 상생 share follow these: what they were
        changed = {k: v for k, v in (before or {}).items() if v != values[k]}
        audit.append(conn, at_us=now, actor=actor, action="merchant.put", object_type="merchant",
                     object_id=merchant_id, detail={**values, **({"before": changed} if before else {}),
                                                    **reason_detail(reason)})
    return merchant_body(merchant_id, values), existing is None


def append_version(conn: Connection, table, entity_id: str, at_us: int, facts: dict[str, Any]) -> int:
    """Append a merchant's or member's facts (`merchant_facts`, `member_facts`: its
    first primary key column names it) as valid from `at_us`, or from just after its
    latest version if that is not earlier (two writes within one microsecond, or a clock
    stepped back): versions stay strictly in order. Returns the time they are valid from."""
    key = table.c[table.primary_key.columns.keys()[0]]
    latest = conn.execute(select(func.max(table.c.valid_from_us)).where(key == entity_id)).scalar_one()
    valid_from = at_us if latest is None or latest < at_us else latest + 1
    conn.execute(table.insert().values({key.name: entity_id, "valid_from_us": valid_from, **facts}))
    return valid_from


def merchant_body(merchant_id: str, values: dict[str, Any]) -> dict:
    return {"merchant_id": merchant_id, "name": values["name"], "district": values["district"],
            "category": values["category"], "annual_sales": values["annual_sales_won"],
            "registered_from": values["registered_from"],
            "flags": [f for f in values["flags"].split(",") if f], "merchant_share_bp": values["merchant_share_bp"]}


def create_grant_program(conn: Connection, document: GrantProgramDocument, actor: str, *,
                         approved_by: str | None = None) -> tuple[dict, bool]:
    """Create a program as a `draft`: no money moves until a second person approves it
    (`approve_grant_program`). The same document again is a replay, a different one a
    conflict. `approved_by` is for operators' own loaders in-process (shipped files, demo,
    load tests, generated data), which are trusted like the policy files: the program is
    recorded approved by that name, in the audit log as a second entry."""
    text = document.model_dump_json()
    t = s.grant_programs

    def existing():
        row = conn.execute(select(t.c.document, t.c.status).where(t.c.program_id == document.program_id)).first()
        if row is not None and GrantProgramDocument.model_validate_json(row.document) != document:
            raise Conflict(f"grant program {document.program_id!r} exists with other terms; create a new program")
        return row

    if (row := existing()) is not None:
        return program_body(document, row.status), False
    now = _now_us()
    status = PROGRAM_DRAFT if approved_by is None else PROGRAM_OPEN
    done = conn.execute(dialect_insert(conn)(t).values(
        program_id=document.program_id, name=document.name, document=text, valid_from_us=document.valid_from_us,
        valid_until_us=document.valid_until_us, status=status, created_by=actor, created_at_us=now,
    ).on_conflict_do_nothing().returning(t.c.program_id)).first()
    if done is None:  # created by a request racing this one (a retry racing its first try): as a replay
        return program_body(document, existing().status), False
    audit.append(conn, at_us=now, actor=actor, action="grant_program.create", object_type="grant_program",
                 object_id=document.program_id, detail=orjson.loads(text))
    if approved_by is not None:
        audit.append(conn, at_us=now, actor=approved_by, action="grant_program.approve",
                     object_type="grant_program", object_id=document.program_id,
                     detail={"author": actor, "loaded_in_process": True})
    return program_body(document, status), True


def approve_grant_program(conn: Connection, program_id: str, approver) -> dict:
    """A second person (not the creator: another key *and* another name) approves a draft
    program; only then can it disburse. A conditional UPDATE claims the draft."""
    from ledger.errors import ProgramNotFound
    from ledger.keys import refuse_if_author_revoked
    from ledger.policies import _same_person
    from ledger.programs import ProgramSelfApproval, ProgramStateConflict

    t = s.grant_programs
    row = conn.execute(select(t.c.status, t.c.created_by, t.c.document).where(t.c.program_id == program_id)).first()
    if row is None:
        raise ProgramNotFound(f"no grant program {program_id!r}")
    if row.status != PROGRAM_DRAFT:
        raise ProgramStateConflict(f"grant program {program_id!r} is {row.status}; only drafts are approved")
    if _same_person(row.created_by, approver):
        raise ProgramSelfApproval("a second person must approve a grant program: the approver's key and name "
                                  "differ from the creator's")
    refuse_if_author_revoked(conn, row.created_by, f"grant program {program_id!r}")
    now = _now_us()
    done = conn.execute(update(t).where((t.c.program_id == program_id) & (t.c.status == PROGRAM_DRAFT))
                        .values(status=PROGRAM_OPEN))
    if done.rowcount != 1:
        raise ProgramStateConflict(f"grant program {program_id!r} changed while approving")
    audit.append(conn, at_us=now, actor=approver.actor, action="grant_program.approve", object_type="grant_program",
                 object_id=program_id, detail={"author": row.created_by})
    return program_body(GrantProgramDocument.model_validate_json(row.document), PROGRAM_OPEN)


PROGRAM_DRAFT, PROGRAM_OPEN = "draft", "open"


def program_body(document: GrantProgramDocument, status: str) -> dict:
    body = document.model_dump(mode="json", exclude_none=True)
    body["valid_from"] = rfc3339(document.valid_from_us)
    body["valid_until"] = rfc3339(document.valid_until_us)
    body["status"] = status
    return body


def marks_reached(committed: int, limit_before: int | None, limit: int) -> list[int]:
    """The warning marks (`BUDGET_THRESHOLDS_BP`) that `committed` is at or past under
    `limit` and was not under `limit_before` (None: no limit, past no mark). A limit of 0
    is wholly used (`used_bp` 10,000), past every mark."""
    from ledger.book import BUDGET_THRESHOLDS_BP

    def past(limit: int | None, bp: int) -> bool:
        return limit is not None and committed * 10_000 >= limit * bp

    return [bp for bp in BUDGET_THRESHOLDS_BP if past(limit, bp) and not past(limit_before, bp)]


def locked_budget(conn: Connection, source: str, period: str, now_us: int):
    """A budget's row, made with no limit if it has none, and locked (`FOR UPDATE`):
    whatever sets or asks for its limit takes turns on it."""
    t = s.budgets
    conn.execute(dialect_insert(conn)(t).on_conflict_do_nothing(),
                 [{"source": source, "period": period, "limit_won": None, "committed_won": 0, "updated_at_us": now_us}])
    return conn.execute(select(t).where((t.c.source == source) & (t.c.period == period)).with_for_update()).one()


def refuse_below_committed(row, limit_won: int) -> None:
    """409 `budget_below_committed` for a limit below what the budget `row` has committed."""
    if limit_won < row.committed_won:
        raise BudgetBelowCommitted(f"{row.source} {row.period}: {row.committed_won} won is already committed",
                                   committed=row.committed_won)


def put_budget(conn: Connection, *, source: str, period: str, limit_won: int, actor: str,
               reason: str | None = None, on_budget_event: Callable[[str, str], None] | None = None,
               detail: dict | None = None) -> dict:
    """Set a budget's limit. A limit that puts what is committed at or past 80% or 95%
    of it, where the limit before did not (none set counts as not), warns as a payment
    batch crossing the mark does: a `budget.threshold` log line and `on_budget_event`
    (the metric), once per mark. `detail`: more for the audit entry (the request an
    approval sets it from, `ledger.budget_requests`)."""
    now = _now_us()
    t = s.budgets
    row = locked_budget(conn, source, period, now)
    refuse_below_committed(row, limit_won)
    conn.execute(update(t).where((t.c.source == source) & (t.c.period == period))
                 .values(limit_won=limit_won, updated_at_us=now))
    audit.append(conn, at_us=now, actor=actor, action="budget.put", object_type="budget",
                 object_id=f"{source}/{period}", detail={"limit": limit_won, "before": row.limit_won,
                                                         **reason_detail(reason), **(detail or {})})
    for threshold_bp in marks_reached(row.committed_won, row.limit_won, limit_won):
        log.warning("budget.threshold", source=source, period=period, threshold_bp=threshold_bp,
                    committed=row.committed_won, limit=limit_won, limit_before=row.limit_won, by="budget.put")
        if on_budget_event is not None:
            on_budget_event(source, f"threshold_{threshold_bp // 100}")
    return {"source": source, "period": period, "limit": limit_won, "committed": row.committed_won,
            "remaining": limit_won - row.committed_won}
