"""A budget limit with a second person: one person asks (`request`), a different person
approves (`approve`), which sets the limit as `PUT /v1/budgets/...` does
(`registry.put_budget`), or the request is withdrawn. With
EUM_BUDGET_APPROVAL=second_person this is the only way to set a limit; by default the
contract's one-person `PUT` works beside it.

- One person is one key or one name (`ledger.keys.same_person`), as for policies.
- A request names the limit it replaces (`limit_before`): one approved after that limit
  changed (another request, a `PUT`) is refused, 409 `budget_changed_since_request`,
  since its approver read a change that is no longer the one it would make.
- At most one request per budget is pending (409 `budget_request_pending`, and a
  partial unique index in the database).
- Every step is an audit entry: `budget.request`, then `budget.put` (its actor the
  approver, its detail naming the request and who asked) or `budget.request_withdrawn`.

Every function takes a connection inside a transaction that its caller commits."""

from __future__ import annotations

import time
import uuid
from typing import Callable

from sqlalchemy import Connection, select, tuple_, update

from ledger import audit, registry
from ledger import schema as s
from ledger.errors import (BudgetChangedSinceRequest, BudgetRequestDecided, BudgetRequestNotFound,
                           BudgetRequestPending, SelfApproval)
from ledger.keys import refuse_if_author_revoked, same_person
from rules.timeutil import rfc3339


def _now_us() -> int:
    return time.time_ns() // 1000


def body(row) -> dict:
    """A request as the API answers it."""
    return {"request_id": row.request_id, "source": row.source, "period": row.period, "amount": row.amount_won,
            "limit_before": row.limit_before_won, "reason": row.reason, "status": row.status,
            "requested_by": row.requested_by, "requested_at": rfc3339(row.requested_at_us),
            "decided_by": row.decided_by,
            "decided_at": None if row.decided_at_us is None else rfc3339(row.decided_at_us)}


def request(conn: Connection, *, source: str, period: str, amount_won: int, actor: str,
            reason: str | None = None) -> dict:
    """Ask for a budget's limit to become `amount_won`. Refused at once what an approval
    would refuse whoever approved it: a limit below what is committed (409
    `budget_below_committed`)."""
    now = _now_us()
    budget = registry.locked_budget(conn, source, period, now)
    r = s.budget_requests
    pending = conn.execute(select(r.c.request_id, r.c.requested_by).where(
        r.c.source == source, r.c.period == period, r.c.status == "pending")).first()
    if pending is not None:
        raise BudgetRequestPending(f"{source} {period} already has request {pending.request_id!r} by "
                                   f"{pending.requested_by!r} waiting for its second person: approve or withdraw "
                                   "that one first", request_id=pending.request_id)
    registry.refuse_below_committed(budget, amount_won)
    request_id = f"budget-{uuid.uuid4().hex[:16]}"
    conn.execute(r.insert().values(request_id=request_id, source=source, period=period, amount_won=amount_won,
                                   limit_before_won=budget.limit_won, reason=reason, requested_by=actor,
                                   requested_at_us=now, status="pending"))
    audit.append(conn, at_us=now, actor=actor, action="budget.request", object_type="budget",
                 object_id=f"{source}/{period}",
                 detail={"request_id": request_id, "limit": amount_won, "before": budget.limit_won,
                         **registry.reason_detail(reason)})
    return {**body(_row(conn, request_id)), "committed": budget.committed_won}


def _row(conn: Connection, request_id: str, *, lock: bool = False):
    r = s.budget_requests
    query = select(r).where(r.c.request_id == request_id)
    row = conn.execute(query.with_for_update() if lock else query).first()
    if row is None:
        raise BudgetRequestNotFound(f"no budget request {request_id!r}")
    return row


def _pending(conn: Connection, request_id: str):
    row = _row(conn, request_id, lock=True)
    if row.status != "pending":
        raise BudgetRequestDecided(f"budget request {request_id!r} was already {row.status} by {row.decided_by!r}")
    return row


def _decide(conn: Connection, row, status: str, actor: str, now: int) -> None:
    r = s.budget_requests
    done = conn.execute(update(r).where(r.c.request_id == row.request_id, r.c.status == "pending")
                        .values(status=status, decided_by=actor, decided_at_us=now)).rowcount
    if done != 1:  # SQLite: another writer decided it between the read and this statement
        raise BudgetRequestDecided(f"budget request {row.request_id!r} was decided meanwhile")


def approve(conn: Connection, request_id: str, *, actor: str,
            on_budget_event: Callable[[str, str], None] | None = None) -> dict:
    """Set the limit a pending request asks for, as a different person than the one who
    asked (403 `self_approval`), while the key it was asked with is live (409
    `author_key_revoked`) and the budget's limit is still the one it replaces (409
    `budget_changed_since_request`). The request's budget row is locked before the
    request (the order `request` takes them in)."""
    r = s.budget_requests
    peek = conn.execute(select(r.c.source, r.c.period).where(r.c.request_id == request_id)).first()
    if peek is None:
        raise BudgetRequestNotFound(f"no budget request {request_id!r}")
    now = _now_us()
    budget = registry.locked_budget(conn, peek.source, peek.period, now)
    row = _pending(conn, request_id)
    if same_person(row.requested_by, actor):  # another key of the same name is the same person
        raise SelfApproval(f"{row.requested_by!r} asked for this budget limit; {actor!r} is the same person: "
                           "another must approve it")
    refuse_if_author_revoked(conn, row.requested_by, f"budget request {request_id!r}")
    if budget.limit_won != row.limit_before_won:
        raise BudgetChangedSinceRequest(
            f"{row.source} {row.period}: the request replaces the limit {row.limit_before_won}, and the limit is "
            f"{budget.limit_won} now; withdraw it and ask again from the limit as it is",
            limit_before=row.limit_before_won, limit=budget.limit_won)
    budget_now = registry.put_budget(conn, source=row.source, period=row.period, limit_won=row.amount_won,
                                     actor=actor, reason=row.reason, on_budget_event=on_budget_event,
                                     detail={"request_id": request_id, "requested_by": row.requested_by})
    _decide(conn, row, "approved", actor, now)
    return {**body(_row(conn, request_id)), "budget": budget_now}


def withdraw(conn: Connection, request_id: str, *, actor: str, reason: str | None = None) -> dict:
    """Take back a pending request; anyone who may ask for one may (nothing is set)."""
    row = _pending(conn, request_id)
    now = _now_us()
    _decide(conn, row, "withdrawn", actor, now)
    audit.append(conn, at_us=now, actor=actor, action="budget.request_withdrawn", object_type="budget",
                 object_id=f"{row.source}/{row.period}",
                 detail={"request_id": request_id, "requested_by": row.requested_by,
                         **registry.reason_detail(reason)})
    return body(_row(conn, request_id))


def listed(conn: Connection, *, status: str | None, limit: int, after: str | None = None) -> list[dict]:
    """Requests, newest first, at most `limit`; of one status if given; after the
    request `after` in that order (a page's last; an unknown one is 404)."""
    r = s.budget_requests
    query = select(r).order_by(r.c.requested_at_us.desc(), r.c.request_id.desc()).limit(limit)
    if status is not None:
        query = query.where(r.c.status == status)
    if after is not None:
        last = _row(conn, after)
        query = query.where(tuple_(r.c.requested_at_us, r.c.request_id) < (last.requested_at_us, last.request_id))
    return [body(row) for row in conn.execute(query)]
