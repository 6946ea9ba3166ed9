"""Running a Hypothesis state machine against the real book, a fresh database per
example: a copy of one migrated SQLite file, or a PostgreSQL database made from a
migrated template (CREATE DATABASE ... TEMPLATE copies it in tens of milliseconds).
Fresh ids in one shared database would not do: budgets are global per source and
period, so one example's changes would leak into the next. A machine is a
`ServiceMachine`: it opens the service on `new_database()` -> (url, cleanup), which the
runners set, at the start of each example, and closes both in `teardown`.

`CardAppMachine` is a ServiceMachine that sends the card app's requests and checks each
answer against a reference model (`self.model`); the models themselves stay in their
test files, written from the docs, with the few pieces they have in common here."""

from __future__ import annotations

import datetime as dt
import shutil
from contextlib import contextmanager
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, run_state_machine_as_test

from ledger.db import migrate
from tests.conftest import DB_PREFIX, create_migrated_pg_template, create_pg_database, drop_pg_database, make_api


SEOUL = dt.timezone(dt.timedelta(hours=9))


def local(when: str) -> dt.datetime:
    """An API time as Seoul's wall clock."""
    return dt.datetime.fromisoformat(when.replace("Z", "+00:00")).astimezone(SEOUL)


class ModelError(Exception):
    """What a model expects the service to refuse: the status and the problem's code."""

    def __init__(self, status: int, code: str):
        super().__init__(f"{status} {code}")
        self.status, self.code = status, code


@dataclass
class Month:
    """A member-month's counters: cashback-eligible spend, cashback, top-ups."""
    eligible: int = 0
    cashback: int = 0
    topped_up: int = 0


@dataclass(frozen=True)
class Merchant:
    merchant_id: str
    district: str
    category: str
    sales: int
    registered_from: dt.date = dt.date(2019, 1, 1)


def topup_decline(member: dict, month: Month, amount: int, minimum: int, maximum: int) -> str | None:
    """A top-up by API.md and the policy's limits: the decline code, or None after adding
    it to the member's charged money and the month's top-ups."""
    if member["status"] != "active":
        return "member_suspended"
    if amount < minimum:
        return "topup_below_minimum"
    if month.topped_up + amount > maximum:
        return "topup_monthly_limit_exceeded"
    member["charged"] += amount
    month.topped_up += amount
    return None


def settle_owed(member: dict, owed: int, points_left: int, charged_left: int) -> tuple[int, int]:
    """A refund's part in what the member owes (docs/design.md "Refunds"): `owed`, what
    its clawback took beyond all they held, is added; else what they owed before is
    settled from the points it restored, then the charged money it restored, that its
    clawback left (`points_left`, `charged_left`), never more than owed. Moves the
    member's `owed`, `points` and `charged`; returns (owed added, settled)."""
    due = 0 if owed else member.get("owed", 0)
    from_points = min(due, points_left)
    from_charged = min(due - from_points, charged_left)
    member["points"] -= from_points
    member["charged"] -= from_charged
    member["owed"] = member.get("owed", 0) + owed - from_points - from_charged
    return owed, from_points + from_charged


@dataclass
class ChargedWindow:
    """A member's charged money since their last approved withdrawal, as docs/design.md
    "Withdrawals" reads it: `put_in` (top-ups, and the charged money refunds restored of
    payments made before it), the payments made since (whose refunds give back money they
    used, not money put in), and `latest`, the latest time of the top-ups, payments and
    refunds that moved the charged money, or the withdrawal's own when none is later,
    which the next withdrawal may not be dated before."""

    put_in: int = 0
    payments: set[str] = field(default_factory=set)
    latest: dt.datetime | None = None

    def moved(self, at: dt.datetime) -> None:
        self.latest = at if self.latest is None else max(self.latest, at)

    def topup(self, amount: int, at: dt.datetime) -> None:
        self.put_in += amount
        self.moved(at)

    def payment(self, payment_id: str, charged: int, at: dt.datetime) -> None:
        """An approved payment: in the window only if it spent charged money."""
        if charged:
            self.payments.add(payment_id)
            self.moved(at)

    def refund(self, payment_id: str, restored: int, taken: int, at: dt.datetime) -> None:
        """A refund that restored `restored` charged money (before its clawback withheld
        any) and whose clawback or settling of what was owed took `taken` of it."""
        if restored and payment_id not in self.payments:
            self.put_in += restored
        if restored or taken:
            self.moved(at)


# The default withdrawal rule of every shipped policy (docs/design.md, "Withdrawals"):
# 60% of what was put in used, 80% where that was 1만 or less.
USED_MIN_BP, SMALL_USED_MIN_BP, SMALL_UP_TO = 6_000, 8_000, 10_000

# What the machines reached over a run (a machine that never reaches a state proves
# nothing about it): the tests that run them assert on these.
REACHED: dict[str, int] = {}


def reached(what: str) -> None:
    REACHED[what] = REACHED.get(what, 0) + 1


def withdraw(member: dict, amount: int | None, at: dt.datetime, policy_id: str, balances) -> dict:
    """A withdrawal by docs/design.md "Withdrawals": refused (409) when dated before the
    window's latest; else declined (suspended, nothing left, too little used, another
    amount) or approved for all the charged money left, what the member owes settled
    from it first and the rest paid out. Moves the member's `charged`, `owed` and window
    (a new one from the withdrawal's time); `balances()` is the member's answer then."""
    window: ChargedWindow = member["window"]
    if window.latest is not None and at < window.latest:
        raise ModelError(409, "withdrawal_before_activity")
    put_in, left = window.put_in, member["charged"]
    assert 0 <= left <= put_in, (left, put_in)
    used_bp = (put_in - left) * 10_000 // put_in if put_in else 0
    min_bp = SMALL_USED_MIN_BP if 0 < put_in <= SMALL_UP_TO else USED_MIN_BP
    code = None
    if member["status"] != "active":
        code = "member_suspended"
    elif left == 0:
        code = "nothing_to_withdraw"
    elif used_bp < min_bp:
        code = "withdrawal_below_used_share"
    elif amount is not None and amount != left:
        code = "withdrawal_amount_mismatch"
    taken = settled = 0
    if code is None:
        taken = left
        settled = min(member.get("owed", 0), taken)
        member["charged"] = 0
        member["owed"] = member.get("owed", 0) - settled
        member["window"] = ChargedWindow(latest=at)
    return {"status": "declined" if code else "approved", "decline_code": code, "amount": taken,
            "owed_settled": settled, "paid_out": taken - settled, "amount_requested": amount,
            "charged_in": put_in, "used": put_in - left, "used_share_bp": used_bp, "used_share_min_bp": min_bp,
            "policy_id": policy_id, "balances": balances()}


def refund_amount(data, left: int, share: str) -> int:
    """A refund of all that is `left`, 1 won, 1 won too many, or a drawn part."""
    amount = {"all": left, "one": 1, "over": left + 1}.get(share)
    if amount is None:
        amount = data.draw(st.integers(1, max(1, left)), label="amount")
    return max(1, amount)


class ServiceMachine(RuleBasedStateMachine):
    """A state machine whose example runs against the service (`self.api`, the tests'
    client) on a database of its own."""

    new_database = None

    def __init__(self) -> None:
        super().__init__()
        self.url, self._cleanup = type(self).new_database()
        self.api = make_api(self.url)
        self.api.client.__enter__()

    def teardown(self) -> None:
        try:
            self.api.client.__exit__(None, None, None)
        finally:
            self._cleanup()


@contextmanager
def on_sqlite(machine):
    """The machine's examples, within the block, each on a copy of one migrated SQLite file."""
    workdir = Path(tempfile.mkdtemp(prefix="eum-machine-"))
    template = workdir / "template.db"
    migrate(f"sqlite:///{template}")

    def new_database():
        path = workdir / f"{uuid.uuid4().hex}.db"
        shutil.copyfile(template, path)
        return f"sqlite:///{path}", lambda: [p.unlink(missing_ok=True) for p in workdir.glob(path.name + "*")]

    machine.new_database = staticmethod(new_database)
    try:
        yield
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_on_sqlite(machine, machine_settings: settings) -> None:
    with on_sqlite(machine):
        run_state_machine_as_test(machine, settings=machine_settings)


RUNS_TO_REACH = 3


def run_counted(run, machine, machine_settings, prefix: str = "withdrawal ") -> None:
    """`run(machine, machine_settings)`, and a check that the run reached a state named
    `prefix...` at all (that rule's answers were exercised, not merely drawn). Which
    states a random run reaches depends on the draw: a run of few short examples drew no
    withdrawal about once in twenty (a CI run failed so), so a run that reached none is
    run again, up to RUNS_TO_REACH times in all, each run another draw checked against
    the model as the first. A rule that can never be reached still fails."""
    for _ in range(RUNS_TO_REACH):
        before = dict(REACHED)
        run(machine, machine_settings)
        if any(REACHED[what] > before.get(what, 0) for what in REACHED if what.startswith(prefix)):
            return
    raise AssertionError(f"{RUNS_TO_REACH} runs reached no {prefix!r}: {REACHED}")


def walk(machine, steps, invariant) -> dict[str, int]:
    """One example written out, as Hypothesis would run it: the machine on SQLite, each
    step (a function of the machine) followed by `invariant` (of the machine). What it
    reached."""
    before = dict(REACHED)
    with on_sqlite(machine):
        state = machine()
        try:
            invariant(state)
            for step in steps:
                step(state)
                invariant(state)
        finally:
            state.teardown()
    return {what: n - before.get(what, 0) for what, n in REACHED.items() if n > before.get(what, 0)}


def run_on_postgres(machine, machine_settings: settings, prefix: str = DB_PREFIX) -> None:
    template = create_migrated_pg_template(prefix)
    try:

        def new_database():
            name, url = create_pg_database(template=template, prefix=prefix)
            return url, lambda: drop_pg_database(name)

        machine.new_database = staticmethod(new_database)
        run_state_machine_as_test(machine, settings=machine_settings)
    finally:
        drop_pg_database(template)



def grants_add_up(refund: dict) -> None:
    """A refund's `grants` (program by program) against its sums: `restored.grants` is
    what went back to the member's lots less what the clawback kept back of them
    (`clawback_detail.withheld_from_grants`), `returned_to_funders` what went to ended
    programs' funders."""
    grants = refund["grants"]
    assert len({g["program_id"] for g in grants}) == len(grants), grants
    to_member = [g for g in grants if g["to"] == "member"]
    assert sum(g["amount"] - g["withheld"] for g in to_member) == refund["restored"]["grants"], refund
    assert sum(g["withheld"] for g in to_member) == refund["clawback_detail"]["withheld_from_grants"], refund
    assert sum(g["amount"] for g in grants if g["to"] == "funders") == refund["returned_to_funders"], refund
    assert all(g["withheld"] == 0 for g in grants if g["to"] == "funders") and all(g["amount"] > 0 for g in grants)


class CardAppMachine(ServiceMachine):
    """The card app against a model: each request is sent, the model asked what it must
    answer (or which `ModelError`), the answer's fields compared, and the request kept
    for replays (`requests`: path, body, first answer)."""

    def __init__(self, model, merchants: list[Merchant], members: dict[str, tuple[str, str]]) -> None:
        super().__init__()
        self.model = model
        self.counter = 0
        self.requests: list[tuple[str, dict, dict]] = []
        for m in merchants:
            r = self.api.put(f"/v1/merchants/{m.merchant_id}", {
                "name": m.merchant_id, "district": m.district, "category": m.category, "annual_sales": m.sales,
                "registered_from": m.registered_from.isoformat()})
            assert r.status_code == 201, r.text
        for member_id, (district, status) in members.items():
            r = self.api.put(f"/v1/members/{member_id}", {"district": district, "status": status})
            assert r.status_code == 201, r.text

    def next_id(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}-{self.counter}"

    def expect_error(self, response, error: ModelError) -> None:
        assert response.status_code == error.status, (response.status_code, response.text, error.code)
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["code"] == error.code, response.text

    def payment_view(self, got: dict) -> dict:
        """The fields of a payment's answer the model gives."""
        components = [{"rate_bp": c["rate_bp"], "base": c["base"], "amount": c["amount"], "funded_by": c["funded_by"]}
                      for c in got["cashback"]["components"]]
        return {"status": got["status"], "decline_code": got.get("decline_code"), "spent": got["spent"],
                "cashback": got["cashback"]["amount"], "components": components, "balances": got["balances"]}

    def refund_view(self, got: dict) -> dict:
        """The fields of a refund's answer the model gives (its grants, program by
        program, checked to add up to its sums)."""
        grants_add_up(got)
        return {"restored": got["restored"], "cashback_clawback": got["cashback_clawback"],
                "owed": got["clawback_detail"]["owed"], "owed_settled": got["owed_settled"],
                "not_recovered": got["clawback_detail"]["not_recovered"], "balances": got["balances"]}

    def withdrawal_view(self, got: dict) -> dict:
        """The fields of a withdrawal's answer the model gives."""
        return {key: got.get(key) for key in ("status", "decline_code", "amount", "owed_settled", "paid_out",
                                              "amount_requested", "charged_in", "used", "used_share_bp",
                                              "used_share_min_bp", "policy_id", "balances")}

    def _checked(self, path: str, body: dict, expected, view) -> dict | None:
        """The answer, checked (None where the model expects a refusal)."""
        r = self.api.post(path, body)
        try:
            want = expected()
        except ModelError as error:
            self.expect_error(r, error)
            return None
        assert r.status_code == 201, r.text
        got = r.json()
        assert view(got) == want, (view(got), want)
        self.requests.append((path, body, got))
        return got

    def send_topup(self, member: str, amount: int, when: str) -> None:
        body = {"topup_id": self.next_id("t"), "member_id": member, "amount": amount, "occurred_at": when}
        self._checked("/v1/topups", body, lambda: self.model.topup(member, amount, when),
                      lambda got: {"status": got["status"], "decline_code": got.get("decline_code"),
                                   "balances": got["balances"]})

    def send_payment(self, member: str, merchant: str, amount: int, when: str) -> None:
        payment_id = self.next_id("p")
        body = {"payment_id": payment_id, "member_id": member, "merchant_id": merchant, "amount": amount,
                "occurred_at": when}
        self._checked("/v1/payments", body, lambda: self.model.pay(payment_id, member, merchant, amount, when),
                      self.payment_view)

    def send_refund(self, payment_id: str, amount: int, when: str) -> None:
        body = {"refund_id": self.next_id("r"), "amount": amount, "occurred_at": when}
        self._checked(f"/v1/payments/{payment_id}/refunds", body,
                      lambda: self.model.refund(payment_id, amount, when), self.refund_view)

    def send_withdrawal(self, member: str, amount: int | None, when: str) -> dict | None:
        """A withdrawal, `amount` as the card app showed it (None: not sent). Counts what it
        reached: approved, settling what was owed, each decline and refusal."""
        body = {"withdrawal_id": self.next_id("w"), "occurred_at": when}
        if amount is not None:
            body["amount"] = amount
        got = self._checked(f"/v1/members/{member}/withdrawals", body,
                            lambda: self.model.withdraw(body["withdrawal_id"], member, amount, when),
                            self.withdrawal_view)
        if got is None:
            reached("withdrawal refused" if member in self.model.members else "withdrawal of an unknown member")
        elif got["status"] == "declined":
            reached(f"withdrawal declined {got['decline_code']}")
        else:
            reached("withdrawal approved")
            if got["owed_settled"]:
                reached("withdrawal settled owed")
                if got["paid_out"] == 0:
                    reached("withdrawal all to owed")
        return got

    def replay_one(self, data) -> None:
        """A recorded request again, as sent: 200, marked replayed, the first answer."""
        path, body, first = data.draw(st.sampled_from(self.requests), label="request")
        r = self.api.post(path, body)
        assert r.status_code == 200, r.text
        assert r.headers.get("idempotent-replayed") == "true"
        assert r.json() == first
