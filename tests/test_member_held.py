"""A member row another transaction holds (another worker's batch, a staff job's chunk,
a session left open, a stuck backend) on PostgreSQL.

The service's batches wait for no held member (`Book.execute(skip_held_members=True)`,
`pgstore.read_batch`'s SKIP LOCKED): that member's commands come back unrun and wait in
the batcher, while every other command of the batch is written and answered. Before, the
batch's member lock waited the lock timeout (5 s, as long as a request waits) and was
run again three times, so every command of each batch naming the member, and every
batch queued behind it, was a 503 (a card-app audit: one member row held 8 s, 99 of 116
other members' payments 503). Bulk writers (replays, grant files, corrections) still
wait for their members."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import text

from tests.book_helpers import assert_book_ok, pay, put_member, put_merchant, topup, txn_count
from tests.conftest import at, make_api

pytestmark = pytest.mark.postgres


class Holder:
    """Another transaction holding one member's row (`SELECT ... FOR UPDATE`) until `release`."""

    def __init__(self, pg_url: str, member_id: str):
        from ledger.db import make_engine

        self.engine = make_engine(pg_url)
        self.conn = self.engine.connect()
        self.conn.execute(text("SELECT 1 FROM members WHERE member_id = :m FOR UPDATE"), {"m": member_id})
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.conn.rollback()
            self.conn.close()
            self.engine.dispose()


def _world(api) -> None:
    put_merchant(api, "h-shop")
    for member_id in ("h-busy", "h-free"):
        put_member(api, member_id)
        topup(api, f"h-t-{member_id}", member_id, 100_000, at("2025-09-01"))
    assert pay(api, "h-p0", "h-busy", "h-shop", 10_000, at("2025-09-10"))["status"] == "approved"


def _commands():
    from api.cardapp import _fingerprint, payment_command, topup_command
    from api.schemas import PaymentIn, RefundIn, TopupIn
    from ledger.commands import Refund
    from rules.timeutil import to_us

    def payment(payment_id: str, member_id: str):
        return payment_command(PaymentIn(payment_id=payment_id, member_id=member_id, merchant_id="h-shop",
                                         amount=10_000, occurred_at=at("2025-09-15")))

    refund_in = RefundIn(refund_id="h-r1", amount=1_000, occurred_at=at("2025-09-16"))  # as the route builds it
    return [payment("h-p1", "h-busy"), payment("h-p2", "h-free"),
            Refund("h-r1", "h-p0", 1_000, to_us(refund_in.occurred_at),
                   _fingerprint("refund", refund_in, payment_id="h-p0")),
            topup_command(TopupIn(topup_id="h-t2", member_id="h-free", amount=10_000, occurred_at=at("2025-09-15")))]


def test_the_services_batch_leaves_a_held_members_commands_unrun_and_writes_the_rest(pg_url):
    """The held member's payment and its payment's refund come back `MemberHeld`
    (nothing of them recorded), at once, not after the lock timeout: the other member's
    payment and top-up are written. Once free, the same commands are first runs."""
    from ledger.errors import MemberHeld

    api = make_api(pg_url)
    with api.client:
        _world(api)
        book = api.services.book
        holder = Holder(pg_url, "h-busy")
        # Had the batch waited for the member, it would have waited until this release
        # and then written everything: the outcomes below tell the two apart.
        safety = threading.Timer(30, holder.release)
        safety.start()
        try:
            outcomes = book.execute(_commands(), skip_held_members=True)
            still_held = not holder.released
        finally:
            holder.release()
            safety.cancel()
        assert still_held
        for held in (outcomes[0], outcomes[2]):
            assert isinstance(held.error, MemberHeld) and held.error.status == 503, held
            assert "same id" in str(held.error)
        assert outcomes[1].body["status"] == "approved" and outcomes[3].body["status"] == "approved"
        assert txn_count(api, "h-p1") == 0 and txn_count(api, "h-r1") == 0
        assert txn_count(api, "h-p2") == 2 and txn_count(api, "h-t2") == 1

        again = book.execute(_commands(), skip_held_members=True)
        assert again[0].error is None and not again[0].replayed and again[0].body["status"] == "approved"
        assert again[2].error is None and not again[2].replayed
        assert again[1].replayed and again[3].replayed
        assert_book_ok(api)


def test_a_bulk_writers_batch_still_waits_for_its_held_member(pg_url):
    """Without `skip_held_members` (replays, grant files, corrections) the batch waits
    for the member and writes every command once it is free."""
    api = make_api(pg_url)
    with api.client:
        _world(api)
        book = api.services.book
        holder = Holder(pg_url, "h-busy")
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(book.execute, _commands())
            with pytest.raises(TimeoutError):
                running.result(timeout=0.5)  # waiting for the member
            holder.release()
            outcomes = running.result(timeout=30)
        assert all(o.error is None and not o.replayed for o in outcomes), outcomes
        assert txn_count(api, "h-p1") == 2 and txn_count(api, "h-r1") >= 1
        assert_book_ok(api)


def test_a_held_member_holds_up_only_its_own_requests(pg_url):
    """Through the service: while one member's row is held, another member's payment is
    answered (201), the held member's payment waits; once the member is free it is
    written and answered 201 as a first run. One writer, the service's default: before,
    it sat in the held member's lock and every command queued behind it waited too."""
    api = make_api(pg_url, request_timeout_ms=20_000, batch_writers=1)
    with api.client:
        _world(api)
        holder = Holder(pg_url, "h-busy")
        try:
            with ThreadPoolExecutor(2) as pool:
                busy = pool.submit(api.post, "/v1/payments", {
                    "payment_id": "h-p1", "member_id": "h-busy", "merchant_id": "h-shop", "amount": 10_000,
                    "occurred_at": at("2025-09-15")})
                with pytest.raises(TimeoutError):
                    busy.result(timeout=0.3)  # the writer has it; before, it sat in the lock
                free = pool.submit(api.post, "/v1/payments", {
                    "payment_id": "h-p2", "member_id": "h-free", "merchant_id": "h-shop", "amount": 10_000,
                    "occurred_at": at("2025-09-15")}).result(timeout=30)
                assert free.status_code == 201 and free.json()["status"] == "approved", free.text
                assert not busy.done() and not holder.released
                holder.release()
                answered = busy.result(timeout=30)
        finally:
            holder.release()
        assert answered.status_code == 201 and answered.json()["status"] == "approved", answered.text
        assert txn_count(api, "h-p1") == 2
        assert_book_ok(api)


def test_a_member_held_past_the_request_timeout_is_a_503_with_nothing_recorded(pg_url):
    """The held member's request gives up at its timeout: 503 with Retry-After. Its
    command, waiting in the batcher, is dropped there and never run. Only one a writer
    had just taken into a batch when its caller gave up may still run, and commit if the
    member is let go before that batch locks it (as any command taken before its request
    gave up, docs/design.md): its resend is then its replay. Exactly once either way;
    the resend of a dropped one is a first run. (This test asserted "never recorded", and
    a loaded CI run once caught that window.)"""
    api = make_api(pg_url, request_timeout_ms=500)
    with api.client:
        _world(api)
        holder = Holder(pg_url, "h-busy")
        body = {"payment_id": "h-p1", "member_id": "h-busy", "merchant_id": "h-shop", "amount": 10_000,
                "occurred_at": at("2025-09-15")}
        try:
            gave_up = api.post("/v1/payments", body)
        finally:
            holder.release()
        assert gave_up.status_code == 503 and gave_up.headers["retry-after"], gave_up.text
        assert gave_up.json()["code"] == "service_unavailable"
        assert api.post("/v1/payments", {**body, "payment_id": "h-p9", "member_id": "h-free"}).status_code == 201
        recorded = txn_count(api, "h-p1")
        assert recorded in (0, 2), recorded  # nothing of it, or all of it (its payment and its cashback)
        again = api.post("/v1/payments", body)
        if recorded:
            assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true", again.text
        else:
            assert again.status_code == 201, again.text
        assert again.json()["status"] == "approved", again.text
        assert txn_count(api, "h-p1") == 2
        assert_book_ok(api)


def test_a_services_batch_with_a_withdrawal_waits_for_no_held_member_either(pg_url):
    """A withdrawal's batch is read statement by statement (`Book._read`, not the
    pipelined read), and its member lock waited for every member of the batch: one
    member held by a staff job's chunk held up the withdrawal and every payment beside
    it (the lock timeout, then 503s). It now leaves the held member's commands unrun
    (`MemberHeld`) and writes the rest, as the pipelined batches do."""
    from api.cardapp import _fingerprint
    from api.schemas import WithdrawalIn
    from ledger.commands import Withdraw
    from ledger.errors import MemberHeld
    from rules.timeutil import to_us

    api = make_api(pg_url)
    with api.client:
        _world(api)
        book = api.services.book
        body = WithdrawalIn(withdrawal_id="h-w1", occurred_at=at("2025-09-15"))
        withdraw = Withdraw("h-w1", "h-free", None, to_us(body.occurred_at),
                            _fingerprint("withdrawal", body, member_id="h-free"))
        commands = [_commands()[0], withdraw, _commands()[1]]  # h-busy's payment, h-free's withdrawal and payment
        holder = Holder(pg_url, "h-busy")
        safety = threading.Timer(30, holder.release)  # had the batch waited, it would have waited until this
        safety.start()
        try:
            outcomes = book.execute(commands, skip_held_members=True)
            still_held = not holder.released
        finally:
            holder.release()
            safety.cancel()
        assert still_held
        assert isinstance(outcomes[0].error, MemberHeld) and outcomes[0].error.status == 503, outcomes[0]
        assert outcomes[1].error is None and not outcomes[1].replayed, outcomes[1]
        assert outcomes[2].error is None and outcomes[2].body["status"] == "approved", outcomes[2]
        assert txn_count(api, "h-p1") == 0 and txn_count(api, "h-p2") == 2

        again = book.execute(commands, skip_held_members=True)
        assert again[0].error is None and not again[0].replayed and again[0].body["status"] == "approved"
        assert again[1].replayed and again[2].replayed
        assert_book_ok(api)


def test_a_resend_of_a_recorded_id_is_answered_while_its_member_is_held(pg_url):
    """A resend of a payment already recorded (the client missed the first answer) needs
    nothing of the member: its stored answer (or the conflict, for another request under
    the id) is read with the batch and is what it will be once the member is free. It
    came back `MemberHeld` and waited in the batcher for as long as a staff job's chunk
    held the member, then 503; it is answered at once."""
    from dataclasses import replace

    from ledger.errors import IdempotencyConflict

    api = make_api(pg_url)
    with api.client:
        _world(api)
        book = api.services.book
        paid = _commands()[0]
        first = book.execute([paid])[0]
        assert first.error is None and first.body["status"] == "approved"
        holder = Holder(pg_url, "h-busy")
        safety = threading.Timer(30, holder.release)
        safety.start()
        try:
            outcomes = book.execute([paid, replace(paid, request_hash="another request")], skip_held_members=True)
            still_held = not holder.released
        finally:
            holder.release()
            safety.cancel()
        assert still_held
        assert outcomes[0].error is None and outcomes[0].replayed and outcomes[0].body == first.body, outcomes[0]
        assert isinstance(outcomes[1].error, IdempotencyConflict), outcomes[1]
        assert txn_count(api, "h-p1") == 2
        assert_book_ok(api)
