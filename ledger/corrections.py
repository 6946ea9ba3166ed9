"""Corrections of past cashback (the 2023 pharmacy case): propose from a wrong and a
right policy over a range, approve by a second person, post through the book.

The plan (per member-month, by funder and component, and each line per payment) comes
from the vectorised re-evaluation in settlement.simulate; posting is one `Correct`
command per line, each line its own idempotency record, so an interrupted posting
resumes without doubling. Posting a line also re-bases each of its payments' cashback
(`ledger.book.correct_payment`), so that a later refund claws back what the payment
holds after the correction, not its original cashback, and its base (whether it counts
toward the month, and how much), moving the month's eligible spend with it."""

from __future__ import annotations

import contextlib
import fcntl
import threading
import time
from typing import Iterator

import orjson
from sqlalchemy import Engine, func, select, text, update

from ledger import audit
from ledger import schema as s
from ledger.book import Book
from ledger.commands import Correct, request_hash
from ledger.db import dialect_insert, sqlite_file
from ledger.errors import Conflict, EumError, NotFound, SelfApproval
from ledger.keys import Principal
from ledger.keys import refuse_if_author_revoked
from ledger.policies import PolicyNotFound, PolicyStateConflict, _same_person
from ledger.queries import correction_lines_sha256, correction_not_as_audited
from rules.compiled import PolicyTimeline, compile_policy
from rules.document import PolicyDocument
from rules.timeutil import from_us, rfc3339

POST_BATCH_MAX = 1_000
# Failed lines the `correction.post` summary lists (with `failed_count`); each batch's
# `correction.post_lines` entry lists all of its own.
FAILED_LISTED_MAX = 100
INSERT_ROWS_MAX = 10_000
# PostgreSQL advisory lock: one correction approved and posted at a time, of any worker
# (ledger.audit's is 7_301_001, settlement's 7_301_002, migrations' 7_301_004).
POSTING_LOCK_KEY = 7_301_005
# How long a proposal waits for the writes in flight when it takes its time (`_plan_time`).
PLAN_WAIT_S = 30.0
_posting_locks: dict[str, threading.Lock] = {}  # SQLite: per database file, within this process
_posting_locks_guard = threading.Lock()


class CorrectionNotFound(NotFound):
    code, title = "correction_not_found", "Correction not found"


class CorrectionState(Conflict):
    code, title = "correction_state_conflict", "The correction is not in a state that allows this"


class WrongPolicyNotInForce(Conflict):
    code, title = "wrong_policy_not_in_force", "The wrong policy was not in force over the range"


class CorrectionLayersDiffer(EumError):
    status, code, title = 422, "correction_layers_differ", "A correction's two policies must be of one layer"


class CorrectionSelfApproval(SelfApproval):
    """The author of a correction cannot approve it."""


def _now_us() -> int:
    return time.time_ns() // 1000


def _plan_time(engine: Engine) -> int:
    """The time a plan is made at, taken once no write that may have stamped an earlier
    time is still in flight: a batch takes its `recorded_at` with its members locked and
    commits after its writes, which may wait on a budget row another batch holds (a
    correction's posting holds its funders' year rows for up to 1,000 lines). A payment
    stamped before the plan's time but committed after the plan read the book was in
    neither the plan nor `payments_recorded_since_planned` (the race audit: the month
    ended at 24,000 under a 20,000 cap, a final correction leaving it there). On
    PostgreSQL: waits until every client transaction that has written and began before the time
    (a second's margin for the two clocks) has ended; on SQLite, takes the one write lock
    (`BEGIN IMMEDIATE`), which waits for the writer in flight. A proposal that cannot
    have its time within PLAN_WAIT_S is refused, 503: propose it again."""
    from ledger.errors import Unavailable

    if engine.dialect.name != "postgresql":
        with engine.begin():
            return _now_us()
    now = _now_us()
    deadline = time.monotonic() + PLAN_WAIT_S
    in_flight = text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                     "AND pid <> pg_backend_pid() AND backend_type = 'client backend' AND backend_xid IS NOT NULL "
                     "AND xact_start < to_timestamp(:at) + interval '1 second'")
    with engine.connect() as conn:
        while True:
            waiting = conn.execute(in_flight, {"at": now / 1e6}).scalar_one()
            conn.rollback()  # the next look reads pg_stat_activity afresh
            if not waiting:
                return now
            if time.monotonic() > deadline:
                raise Unavailable(f"{waiting} write(s) begun before the correction's plan time are still running "
                                  f"after {PLAN_WAIT_S:.0f} s; nothing was proposed, propose it again")
            time.sleep(0.02)


@contextlib.contextmanager
def _posting_lock(engine: Engine):
    """One correction approved and posted at a time: the approval's check that no other
    correction took effect over its months since its plan (`_refuse_if_superseded`)
    holds until its lines have posted. (Two approvals at once both passed the check, and
    one made while another was still posting its lines passed it too, the other's
    unposted lines read as refused by its plan: two corrections of one month on
    different payments both posted, and a final correction left 14,250 where its policy
    gives 12,000; the race audit.) Another approval meanwhile is refused, 409
    `correction_state_conflict`: approve it again when the other is done."""
    busy = CorrectionState("another correction is being approved and posted; approve this one again when it is "
                           "done (it is then refused if that one changed its months)")
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            got = conn.execute(text(f"SELECT pg_try_advisory_lock({POSTING_LOCK_KEY})")).scalar_one()
            conn.commit()  # a session lock: held by the connection, not a transaction left open
            if not got:
                raise busy
            try:
                yield
            finally:
                with contextlib.suppress(Exception):  # a broken connection has released it already
                    conn.execute(text(f"SELECT pg_advisory_unlock({POSTING_LOCK_KEY})"))
                    conn.commit()
        return
    path = sqlite_file(engine.url) or ""  # the book's file, a `file:` URI's path included
    with _posting_locks_guard:
        lock = _posting_locks.setdefault(path, threading.Lock())
    if not lock.acquire(blocking=False):
        raise busy
    try:
        if path:  # and other processes on the same file
            with open(f"{path}.corrections-lock", "a+") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise busy from None
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
        else:
            yield
    finally:
        lock.release()


def _document(engine: Engine, policy_id: str) -> PolicyDocument:
    with engine.connect() as conn:
        text = conn.execute(select(s.policies.c.document).where(s.policies.c.policy_id == policy_id)).scalar_one_or_none()
    if text is None:
        raise PolicyNotFound(f"no policy {policy_id!r}")
    return PolicyDocument.model_validate_json(text)


def _refuse_if_not_as_proposed(conn, row) -> None:
    """What approval posts is the lines as proposed: the proposal's audit entry recorded
    their digest, and lines edited since (an UPDATE of a line's amounts, or of the
    correction's status to `approved` without an approval entry) are refused, 409,
    nothing posted (the security audit: a correction marked approved by an UPDATE was
    posted as "the rest"). Proposals from before the digest are taken as they are."""
    a = s.audit_log
    entries = conn.execute(select(a.c.action, a.c.actor, a.c.detail)
                           .where((a.c.object_type == "correction") & (a.c.object_id == row.correction_id)
                                  & a.c.action.in_(("correction.propose", "correction.approve")))).all()
    proposal = next((orjson.loads(e.detail) for e in entries if e.action == "correction.propose"), None)
    found = correction_not_as_audited(conn, row.correction_id, row.status, row.approver, proposal,
                                      {e.actor for e in entries if e.action == "correction.approve"}, posted=False)
    if "no propose entry" in found:
        raise CorrectionState(f"correction {row.correction_id!r} has no proposal on the audit log; it is not posted")
    if "lines" in found:
        raise CorrectionState(f"correction {row.correction_id!r}: its lines are not as proposed (the proposal's "
                              "audit entry recorded others); nothing posted")
    if "approval" in found:
        raise CorrectionState(f"correction {row.correction_id!r} is marked approved by {row.approver!r} with no "
                              "such approval on the audit log; nothing posted")


def _right_policy_usable(conn, right_policy_id: str, approver: Principal | None = None) -> None:
    """The right policy's rules may be paid: not withdrawn (its rules were set aside:
    409, at the proposal and again at the approval; once a correction to it is
    approved, it can no longer be withdrawn); and, at the approval, while it is
    a draft no second person has approved, the correction's approver is not the one
    who drafted it. The correction's approval is then the only second look its rules
    get (Kim drafted 30% at pharmacies, Lee proposed a correction to it, and Kim
    approved that: posted, rules no one else had read; the security audit)."""
    query = select(s.policies.c.status, s.policies.c.author).where(s.policies.c.policy_id == right_policy_id)
    # At the approval, held until it commits: a withdrawal waits for it, then finds the
    # correction approved and is refused (`ledger.policies.withdraw`).
    row = conn.execute(query if approver is None else query.with_for_update(read=True)).first()
    if row is None:
        raise PolicyNotFound(f"no policy {right_policy_id!r}")
    if row.status == "withdrawn":
        raise PolicyStateConflict(f"the right policy {right_policy_id!r} was withdrawn: its rules were set aside, "
                                  "so no correction pays them")
    if approver is not None and row.status == "draft" and _same_person(row.author, approver):
        raise CorrectionSelfApproval(f"the right policy {right_policy_id!r} is a draft its author "
                                     f"({row.author}) has not had approved: a second person approves the "
                                     "correction that pays it, or approves the draft first")
    if row.status == "draft":
        # Its rules are paid on the correction's approval alone: a draft made with a key
        # revoked since is not, as it would not be approved itself (the review: a revoked
        # editor's 20% draft, refused approval, was paid as a correction's right policy).
        refuse_if_author_revoked(conn, row.author, f"the right policy {right_policy_id!r}, a draft,")


def _timelines(engine: Engine, timeline: PolicyTimeline, right_policy_id: str, from_us_: int, to_us_: int):
    """The plan's timelines (`settlement.simulate.PriorTimelines`): for a member-month
    whose corrections are `history`, the timeline as they left it (each one's right
    policy drafted over its range, in the order they took effect), and the right policy
    drafted over this correction's range on top of it."""
    from settlement.simulate import with_draft

    documents: dict[str, PolicyDocument] = {}

    def drafted(base: PolicyTimeline, policy_id: str, start: int, end: int) -> PolicyTimeline:
        if policy_id not in documents:
            documents[policy_id] = _document(engine, policy_id)
        return with_draft(base, compile_policy(documents[policy_id], from_us(start)), start, end)

    def timelines(history):
        corrected = timeline
        for prior in history:
            corrected = drafted(corrected, prior.right_policy_id, prior.from_us, prior.to_us)
        return corrected, drafted(corrected, right_policy_id, from_us_, to_us_)

    return timelines


def _in_force(timeline: PolicyTimeline, layer: str, from_us_: int, to_us_: int) -> set[str]:
    """The ids of the layer's policies in force at some time in [from, to)."""
    own = sorted((p for p in timeline if p.layer == layer), key=lambda p: p.effective_from_us)
    return {policy.policy_id for policy, following in zip(own, [*own[1:], None])
            if policy.effective_from_us < to_us_
            and (following is None or following.effective_from_us > from_us_)}


def _check_policies(engine: Engine, timeline: PolicyTimeline, timelines, wrong_policy_id: str,
                    right_policy_id: str, from_us_: int, to_us_: int) -> None:
    """Both policies are of one layer (the right one replaces that layer's policy over
    the range), and the wrong one was in force on it during the range, as activated or
    as the corrections approved before left it: the plan compares the right policy with
    what was in force as corrected, which the wrong policy names (a policy never in
    force there is a slip of the proposer's)."""
    from settlement.simulate import approved_corrections

    wrong_doc, right_doc = _document(engine, wrong_policy_id), _document(engine, right_policy_id)
    if wrong_doc.layer != right_doc.layer:
        raise CorrectionLayersDiffer(f"the wrong policy {wrong_policy_id!r} is of layer {wrong_doc.layer!r} and the "
                                     f"right policy {right_policy_id!r} of layer {right_doc.layer!r}: a correction "
                                     "replaces one layer's policy over its range")
    with engine.connect() as conn:
        approved = approved_corrections(conn, from_us_, to_us_)
    corrected = timelines(tuple(a.prior for a in approved))[0]
    in_force = _in_force(timeline, wrong_doc.layer, from_us_, to_us_) | _in_force(corrected, wrong_doc.layer,
                                                                                  from_us_, to_us_)
    if wrong_policy_id not in in_force:
        raise WrongPolicyNotInForce(
            f"{wrong_policy_id!r} was not in force on layer {wrong_doc.layer!r} from {rfc3339(from_us_)} to "
            f"{rfc3339(to_us_)}, as activated or as corrected; in force then: {sorted(in_force) or 'no policy'}")


def propose(engine: Engine, timeline: PolicyTimeline, *, correction_id: str, wrong_policy_id: str,
            right_policy_id: str, from_us_: int, to_us_: int, author: Principal,
            payments_max: int | None = None) -> dict:
    """`payments_max`: at most this many payments read (the range and the rest of its
    last month, from its first month's start: what the plan holds in memory at once),
    counted before anything is read; more is 422 `range_too_large`, nothing proposed.
    None: the simulator's own bound alone, found while reading."""
    from ledger.errors import OccurredInFuture
    from settlement.simulate import PAYMENTS_MAX, correction_plan, months_spanned, refuse_range_over

    if from_us_ > _now_us():  # a correction corrects what was paid; a change ahead is a policy's activation
        raise OccurredInFuture(f"the correction's range starts at {rfc3339(from_us_)}, ahead of the book's clock "
                               "(a correction corrects cashback already paid; a change from a future time is a "
                               "policy activated then); nothing was proposed")
    with engine.connect() as conn:
        if conn.execute(select(s.corrections.c.correction_id)
                        .where(s.corrections.c.correction_id == correction_id)).first() is not None:
            raise Conflict(f"correction {correction_id!r} exists")
        _right_policy_usable(conn, right_policy_id)
    timelines = _timelines(engine, timeline, right_policy_id, from_us_, to_us_)
    _check_policies(engine, timeline, timelines, wrong_policy_id, right_policy_id, from_us_, to_us_)
    wrong, right = timelines(())
    if payments_max is not None:
        with engine.connect() as conn:
            refuse_range_over(conn, *months_spanned(from_us_, to_us_), payments_max, job="correction proposal",
                              advice="a correction reads its range and the rest of its months from their first "
                                     "day; propose one over fewer months")
    now = _plan_time(engine)  # before the plan reads the book: posting checks for payments recorded since
    with engine.connect() as conn:  # and by id, which a clock stepped back cannot make older
        planned_txn_id = int(conn.execute(select(func.coalesce(func.max(s.ledger_txns.c.txn_id), 0))).scalar_one())
    plan = correction_plan(engine, wrong, right, from_us_, to_us_, rest_of_month=True, timelines=timelines,
                           payments_max=PAYMENTS_MAX if payments_max is None else payments_max)
    lines = [line for line in plan.lines if line.by_funder or line.payments]
    summary = {"payments": plan.payments, "wrong_won": plan.wrong_won, "right_won": plan.right_won,
               "recorded_won": plan.recorded_won, "held_won": plan.held_won,
               "recorded_mismatch_payments": plan.recorded_mismatch_payments,
               "members": len({line.member_id for line in lines}), "lines": len(lines),
               "payments_changed": sum(len(line.payments) for line in lines),
               "payments_already_corrected": plan.payments_already_corrected,
               "extra_won": sum(l.delta_won for l in lines if l.delta_won > 0),
               "clawback_won": -sum(l.delta_won for l in lines if l.delta_won < 0)}
    rows = []
    for line in lines:
        line_id = f"{correction_id}/{line.member_id}/{line.month}"
        by_funder = dict(sorted(line.by_funder.items()))
        by_component = dict(sorted(line.by_component.items()))
        rows.append({"line_id": line_id, "correction_id": correction_id,
                     "member_id": line.member_id, "month": line.month, "delta_won": line.delta_won,
                     "by_funder": orjson.dumps(by_funder).decode(), "by_component": orjson.dumps(by_component).decode(),
                     "request_hash": request_hash("correction", {"f": by_funder, "c": by_component}),
                     "response": None, "posted_at_us": None})
    with engine.begin() as conn:
        created = conn.execute(dialect_insert(conn)(s.corrections).values(
            correction_id=correction_id, wrong_policy_id=wrong_policy_id, right_policy_id=right_policy_id,
            from_us=from_us_, to_us=to_us_, status="proposed", author=author.actor, approver=None,
            summary=orjson.dumps(summary).decode(), created_at_us=now, updated_at_us=now,
            planned_txn_id=planned_txn_id,
        ).on_conflict_do_nothing().returning(s.corrections.c.correction_id)).first()
        if created is None:  # proposed by a request racing this one (checked above, before the plan)
            raise Conflict(f"correction {correction_id!r} exists")
        if rows:
            conn.execute(s.correction_lines.insert(), rows)
        for payment_rows in _payment_rows(correction_id, lines):
            conn.execute(s.correction_payments.insert(), payment_rows)
        audit.append(conn, at_us=now, actor=author.actor, action="correction.propose", object_type="correction",
                     object_id=correction_id, detail={"wrong": wrong_policy_id, "right": right_policy_id,
                                                      "from": rfc3339(from_us_), "to": rfc3339(to_us_), **summary,
                                                      "lines_sha256": correction_lines_sha256(conn, correction_id)})
    return get(engine, correction_id)


def _payment_rows(correction_id: str, lines: list) -> Iterator[list[dict]]:
    """The lines' `correction_payments` rows, INSERT_ROWS_MAX at a time: made as they
    are written, so a plan of millions of payments changed is not held twice, as its
    lines and as rows (`settlement.simulate.PLAN_PAYMENTS_CHANGED_MAX`)."""
    rows = []
    for line in lines:
        line_id = f"{correction_id}/{line.member_id}/{line.month}"
        for payment_id, refunded, parts, seen, base in line.payments:
            rows.append({"line_id": line_id, "payment_id": payment_id, "refunded_won": refunded,
                         "deltas": orjson.dumps([list(part) for part in parts]).decode(), "corrections_seen": seen,
                         "base": orjson.dumps({"counts_toward_month": base[0], "cashback_on": base[1]}).decode()})
            if len(rows) == INSERT_ROWS_MAX:
                yield rows
                rows = []
    if rows:
        yield rows


def approve_and_post(engine: Engine, book: Book, correction_id: str, approver: Principal) -> dict:
    """Approve a proposed correction (a second person: never its author, on any key) and
    post its lines; on an approved one whose lines did not all post (a line refused, say
    `budget_exceeded`), post the rest. That may be any policy-approver, the author's own
    approver key included: the approval already covered every line, whose amounts are
    fixed at the proposal, so posting the rest decides nothing new (docs/design.md,
    "Second person everywhere money policy changes"). Each posting's audit entry names
    who asked for it and who approved."""
    with _posting_lock(engine):
        return _approve_and_post(engine, book, correction_id, approver)


def _approve_and_post(engine: Engine, book: Book, correction_id: str, approver: Principal) -> dict:
    t = s.corrections
    with engine.begin() as conn:
        row = conn.execute(select(t).where(t.c.correction_id == correction_id)).first()
        if row is None:
            raise CorrectionNotFound(f"no correction {correction_id!r}")
        if row.status in ("proposed", "approved"):
            _refuse_if_superseded(conn, row)
            _refuse_if_not_as_proposed(conn, row)
        if row.status == "proposed":
            _right_policy_usable(conn, row.right_policy_id, approver)
            if _same_person(row.author, approver):
                raise CorrectionSelfApproval("a second person must approve a correction")
            refuse_if_author_revoked(conn, row.author, f"correction {correction_id!r}")
            if _proposed_without_payments(conn, correction_id):
                raise CorrectionState(f"correction {correction_id!r} was proposed before corrections recorded "
                                      "their payments (migration 0014): posted, its payments' refunds would claw "
                                      "back their original cashback; propose it again under a new id")
            if _proposed_without_base(conn, correction_id):
                raise CorrectionState(f"correction {correction_id!r} was proposed before corrections recorded "
                                      "the right policy's base of their payments (migration 0017): posted, its "
                                      "member-months' eligible spend would stay as the wrong policy counted it; "
                                      "propose it again under a new id")
            done = conn.execute(update(t).where((t.c.correction_id == correction_id) & (t.c.status == "proposed"))
                                .values(status="approved", approver=approver.actor, updated_at_us=_now_us()))
            if done.rowcount != 1:
                raise CorrectionState("the correction changed while approving")
            audit.append(conn, at_us=_now_us(), actor=approver.actor, action="correction.approve",
                         object_type="correction", object_id=correction_id, detail={"author": row.author})
            approved_by = approver.actor
        elif row.status != "approved":
            raise CorrectionState(f"correction {correction_id!r} is {row.status}")
        else:
            approved_by = row.approver
    _post(engine, book, correction_id, actor=approver.actor, approved_by=approved_by, author=row.author)
    return get(engine, correction_id)


def _refuse_if_superseded(conn, row) -> None:
    """A correction is planned against its months as the corrections before it left them
    (`settlement.simulate.approved_corrections`); one that took effect over the same
    months since (approved, or its lines posted, after this one's proposal) changed that,
    so this plan would post against a month that no longer is (two proposals pending at
    once on different payments of a month, each posting its own: under a 20,000 cap a
    third correction then paid the month to 24,500). Refused, nothing posted: propose it
    again. Called under `_posting_lock`, so no other correction is approved or posting
    meanwhile (a line whose payments another re-based is refused in the book as well,
    `payment_corrected_since_planned`)."""
    from settlement.simulate import months_spanned

    t = s.corrections
    start, end = months_spanned(row.from_us, row.to_us)
    since = conn.execute(select(t.c.correction_id).where(
        t.c.correction_id != row.correction_id, t.c.status.in_(("approved", "posted")), t.c.from_us < end,
        t.c.to_us > start, t.c.updated_at_us > row.created_at_us).order_by(t.c.correction_id).limit(5)).scalars().all()
    if since:
        raise CorrectionState(f"correction {row.correction_id!r} was planned before correction(s) "
                              f"{', '.join(map(repr, since))} took effect over its months: posted, it would move "
                              "their payments from figures they no longer hold; nothing was posted, propose it again")


def _proposed_without_payments(conn, correction_id: str) -> bool:
    """Lines and no per-payment rows: proposed before migration 0014."""
    cl, cp = s.correction_lines, s.correction_payments
    line = conn.execute(select(cl.c.line_id).where(cl.c.correction_id == correction_id).limit(1)).first()
    if line is None:
        return False
    lines = select(cl.c.line_id).where(cl.c.correction_id == correction_id)
    return conn.execute(select(cp.c.line_id).where(cp.c.line_id.in_(lines)).limit(1)).first() is None


def _proposed_without_base(conn, correction_id: str) -> bool:
    """A per-payment row without the right policy's base: proposed before migration 0017."""
    cl, cp = s.correction_lines, s.correction_payments
    lines = select(cl.c.line_id).where(cl.c.correction_id == correction_id)
    return conn.execute(select(cp.c.line_id).where(cp.c.line_id.in_(lines), cp.c.base.is_(None))
                        .limit(1)).first() is not None


def _line_payments(conn, line_ids: list[str]) -> dict[str, tuple]:
    """Each line's `Correct.payments`, from its per-payment rows (none before 0014; no
    `corrections_seen` before 0015: posted unchecked, as before; no base before 0017:
    the payments' base left as it was)."""
    cp = s.correction_payments
    out: dict[str, list] = {}
    for line_id, payment_id, refunded, deltas, seen, base in conn.execute(
            select(cp.c.line_id, cp.c.payment_id, cp.c.refunded_won, cp.c.deltas, cp.c.corrections_seen, cp.c.base)
            .where(cp.c.line_id.in_(line_ids)).order_by(cp.c.line_id, cp.c.payment_id)):
        if base is not None:
            base = orjson.loads(base)
            base = (base["counts_toward_month"], tuple(base["cashback_on"]))
        out.setdefault(line_id, []).append((payment_id, refunded, tuple(tuple(p) for p in orjson.loads(deltas)),
                                            seen, base))
    return {line_id: tuple(payments) for line_id, payments in out.items()}


def _post(engine: Engine, book: Book, correction_id: str, *, actor: str, approved_by: str, author: str) -> None:
    """Post every line not yet posted (resumable: a posted line replays); `actor` asked
    for it (the audit entry's actor), `approved_by` approved the correction."""
    cl = s.correction_lines
    with engine.connect() as conn:
        lines = conn.execute(select(cl).where(cl.c.correction_id == correction_id).where(cl.c.response.is_(None))
                             .order_by(cl.c.line_id)).all()
        # The proposal's time, taken before its plan read the book, once the writes in
        # flight had ended (`_plan_time`): a payment recorded after it was not in the plan.
        # And the highest transaction id it saw (NULL: proposed before migration 0019).
        planned_at, planned_txn_id = conn.execute(
            select(s.corrections.c.created_at_us, s.corrections.c.planned_txn_id)
            .where(s.corrections.c.correction_id == correction_id)).one()
    now = _now_us()
    failures = []
    posted = replayed = 0
    who = {"approved_by": approved_by, "author": author}
    with engine.connect() as conn:
        audit.check_appendable(conn)  # the chunks' entries are written with them: one that cannot sign posts nothing

    def chunk_entry(commands, outcomes) -> dict:
        """What one batch of lines did, written in its transaction: a posting cut short
        (the database gone mid-way) leaves every line it moved money for in an entry."""
        done = [o.body for o in outcomes if o.error is None and not o.replayed]
        return {"actor": actor, "action": "correction.post_lines", "object_type": "correction",
                "object_id": correction_id,
                "detail": {"lines": len(commands), "posted": len(done), "amount_won": sum(b["amount"] for b in done),
                           "replayed": sum(1 for o in outcomes if o.error is None and o.replayed),
                           "failed": [{"line_id": c.line_id, "error": o.error.code, "detail": o.error.detail}
                                      for c, o in zip(commands, outcomes) if o.error is not None], **who}}

    for i in range(0, len(lines), POST_BATCH_MAX):
        chunk = lines[i:i + POST_BATCH_MAX]
        with engine.connect() as conn:
            payments = _line_payments(conn, [l.line_id for l in chunk])
        commands = [Correct(l.line_id, l.member_id, l.month, tuple(orjson.loads(l.by_funder).items()),
                            tuple(orjson.loads(l.by_component).items()), now, l.request_hash,
                            payments.get(l.line_id, ()), planned_at, planned_txn_id)
                    for l in chunk]
        for command, outcome in zip(commands, book.execute(commands, audit_entry=chunk_entry)):
            if outcome.error is not None:
                failures.append({"line_id": command.line_id, "error": outcome.error.code, "detail": outcome.error.detail})
            elif outcome.replayed:
                replayed += 1
            else:
                posted += 1
    with engine.begin() as conn:
        # Posted whole, or lines took effect: a correction planned before them no longer
        # holds (`_refuse_if_superseded`).
        if posted or not failures:
            conn.execute(update(s.corrections).where(s.corrections.c.correction_id == correction_id)
                         .values(updated_at_us=_now_us(), **({} if failures else {"status": "posted"})))
        # The call's summary; each batch's `correction.post_lines` entry lists its lines' failures whole.
        audit.append(conn, at_us=_now_us(), actor=actor, action="correction.post",
                     object_type="correction", object_id=correction_id,
                     detail={"lines": len(lines), "posted": posted, "replayed": replayed,
                             "failed_count": len(failures), "failed": failures[:FAILED_LISTED_MAX], **who})


def get(engine: Engine, correction_id: str) -> dict:
    t, cl = s.corrections, s.correction_lines
    with engine.connect() as conn:
        row = conn.execute(select(t).where(t.c.correction_id == correction_id)).first()
        if row is None:
            raise CorrectionNotFound(f"no correction {correction_id!r}")
        lines = conn.execute(select(cl).where(cl.c.correction_id == correction_id).order_by(cl.c.line_id)
                             .limit(1000)).all()
    return {"correction_id": correction_id, "status": row.status, "wrong_policy_id": row.wrong_policy_id,
            "right_policy_id": row.right_policy_id, "from": rfc3339(row.from_us), "to": rfc3339(row.to_us),
            "author": row.author, "approver": row.approver, "summary": orjson.loads(row.summary),
            "lines": [_line(l) for l in lines]}


def _line(l) -> dict:
    """A line as planned (`delta`, `by_funder`) and, once posted, what posted
    (`posted_delta`, `posted_by_funder`, `clawback_detail`, `owed_settled`: what the
    line gave that settled what the member owed): refunds since the plan and
    what a payment holds can make them differ (docs/design.md, "Corrections")."""
    line = {"member_id": l.member_id, "month": l.month, "delta": l.delta_won, "by_funder": orjson.loads(l.by_funder),
            "posted": l.response is not None}
    if l.response is not None:
        posted = orjson.loads(l.response)
        line.update(posted_delta=posted.get("amount"), posted_by_funder=posted.get("by_funder"),
                    clawback_detail=posted.get("clawback_detail"),
                    owed_settled=posted.get("owed_settled", 0))  # (lines posted before it existed: 0)
    return line
