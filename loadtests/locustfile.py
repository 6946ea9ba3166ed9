"""Locust scenarios on the HTTP contract (../shared/API.md beside the repository), for `loadtests/run.py`.

Each user class is one scenario; pick it by name on the locust command line:
- LunchPeak: payments at sales-weighted merchants around 12:30 on a Friday, with the
  card app checking the member's balance now and then;
- TopupStorm: the first of the month, members topping up: every member topped up
  1,400,000 won the month before (the runner seeds it), so a top-up above 100,000 is
  approved only because the monthly limit resets; some members top up again and again
  until they reach the new month's limit and are declined;
- RefundWave: refunds (whole and partial) of the day's earlier payments, with new
  payments going on;
- GrantDay: a relief grant disbursed to many members, who then spend it, while the
  other members pay as on any day.

Configuration comes from the runner through the environment: EUM_LT_DATA (a JSON file
of ids, keys and dates), EUM_LT_ACK_DIR (where each process writes the ids the service
acknowledged with a 2xx, one JSON line each, for the book checks afterwards), and,
only when the runner kills the service during the run (`run.py --kill`),
EUM_LT_SENT_DIR: where each process writes every write it sends (kind, id, path, key
role, body) before sending it, and then what it was told (the HTTP status, or 0 and
the error for a broken or refused connection), so that the runner can resend the
unacknowledged ones with their ids afterwards. Every user is paced with
`constant_throughput`, so the offered rate is users × rate."""

from __future__ import annotations

import json
import math
import os
import random
import threading
import time
import uuid
from pathlib import Path

from locust import FastHttpUser, between, constant_throughput, task

DATA = json.loads(Path(os.environ["EUM_LT_DATA"]).read_text()) if os.environ.get("EUM_LT_DATA") else {}
ACK_DIR = Path(os.environ.get("EUM_LT_ACK_DIR", "reports/acks"))
SENT_DIR = Path(os.environ["EUM_LT_SENT_DIR"]) if os.environ.get("EUM_LT_SENT_DIR") else None
RATE_PER_USER = float(os.environ.get("EUM_LT_RATE_PER_USER", "5"))
_lock = threading.Lock()
_files: dict[str, object] = {}


def _write_line(directory: Path, name: str, row: dict) -> None:
    """One JSON line to this process's file `name-<pid>-<random>.jsonl` (line-buffered)."""
    line = json.dumps(row) + "\n"
    with _lock:
        f = _files.get(name)
        if f is None:
            directory.mkdir(parents=True, exist_ok=True)
            f = _files[name] = open(directory / f"{name}-{os.getpid()}-{uuid.uuid4().hex[:6]}.jsonl", "a",
                                    buffering=1)
        f.write(line)


def acknowledge(kind: str, id_: str, status: str = "") -> None:
    _write_line(ACK_DIR, "acks", {"kind": kind, "id": id_, "status": status})


def amount_won(rng: random.Random) -> int:
    """Lognormal around 17,000 won on average (median 12,300), rounded to 100 won."""
    raw = math.exp(math.log(12_300) + 0.8 * rng.gauss(0, 1))
    return min(max(int(raw // 100) * 100, 1_000), 2_000_000)


class CardApp(FastHttpUser):
    abstract = True
    wait_time = constant_throughput(RATE_PER_USER)

    def on_start(self):
        self.rng = random.Random()
        self.tag = uuid.uuid4().hex[:8]
        self.serial = 0
        self.auth = {"Authorization": f"Bearer {DATA['keys']['card-app']}"}

    def next_id(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}-{self.tag}-{self.serial}"

    def member(self) -> str:
        return self.rng.choice(DATA["members"])

    def merchant(self) -> str:
        return self.rng.choice(DATA["merchants"])

    def at(self, day_key: str, minute_mean: float, minute_sd: float, minute_min: float = 0) -> str:
        minute = min(max(self.rng.gauss(minute_mean, minute_sd), minute_min), 24 * 60 - 1)
        return f"{DATA[day_key]}T{int(minute // 60):02d}:{int(minute % 60):02d}:{self.rng.randrange(60):02d}+09:00"

    def write(self, kind: str, id_field: str, path: str, name: str, body: dict, role: str = "card-app") -> str | None:
        """POST one write; acknowledged (2xx) ids go to the ack file, and with
        EUM_LT_SENT_DIR every send and what it was told go to the sent file. The
        answer's status ("approved", "declined", ...; "" when it has none) when
        acknowledged, else None."""
        id_ = body[id_field]
        if SENT_DIR is not None:
            _write_line(SENT_DIR, "sent", {"kind": kind, "id": id_, "path": path, "role": role, "body": body,
                                            "sent_at": round(time.time(), 3)})
        headers = self.officer if role == "policy-editor" else self.auth
        with self.client.post(path, json=body, headers=headers, name=name, catch_response=True) as r:
            acked = r.status_code in (200, 201)
            status = r.json().get("status", "") if acked else ""
            if SENT_DIR is not None:
                told = {"id": id_, "told": r.status_code or 0, "status": status, "at": round(time.time(), 3)}
                if not acked:
                    told["error"] = (repr(r.error) if r.error else (r.text or "")[:200])[:200]
                _write_line(SENT_DIR, "sent", told)
            if acked:
                acknowledge(kind, id_, status)
                r.success()
            else:
                r.failure(f"{r.status_code} {(r.text or '')[:200]}")
        return status if acked else None

    def pay(self, day_key: str = "peak_day", minute_mean: float = 12.5 * 60, minute_sd: float = 40,
            member: str | None = None, minute_min: float = 0) -> None:
        body = {"payment_id": self.next_id("P"), "member_id": member or self.member(), "merchant_id": self.merchant(),
                "amount": amount_won(self.rng), "occurred_at": self.at(day_key, minute_mean, minute_sd, minute_min)}
        self.write("payment", "payment_id", "/v1/payments", "POST /v1/payments", body)

    def balance(self) -> None:
        self.client.get(f"/v1/members/{self.member()}/balance", headers=self.auth,
                        name="GET /v1/members/{id}/balance")


class LunchPeak(CardApp):
    @task(10)
    def payment(self):
        self.pay()

    @task(2)
    def check_balance(self):
        self.balance()


_shared_draws: dict[str, object] = {}


def _draw(name: str, seed: int) -> str | None:
    """The next member of a shuffled list of them shared by the process's users (each
    member drawn once per list); None when the list is used up."""
    if name not in _shared_draws:
        members = list(DATA["members"])
        random.Random(seed).shuffle(members)
        _shared_draws[name] = iter(members)
    return next(_shared_draws[name], None)


class TopupStorm(CardApp):
    """The first of the month. Every member topped up 1,400,000 won the month before
    (`run.py` seeds it, 100,000 short of the 2023-09 policy's 1,500,000 a month), so an
    approved top-up above 100,000 here shows the limit counting the new month alone.
    Most top-ups are members' one top-up of the month; one in four (`REGULAR_SHARE`) is
    this user's regular, a member who tops up 500,000 again and again: three are
    approved, the fourth reaches past the new month's limit and is declined
    (`topup_monthly_limit_exceeded`), and the user moves on to a new regular."""

    REGULAR_SHARE = 0.25
    REGULAR_AMOUNT_WON = 500_000

    def on_start(self):
        super().on_start()
        self.regular = _draw("regulars", 11)

    @task(8)
    def topup(self):
        regular = self.regular is not None and self.rng.random() < self.REGULAR_SHARE
        body = {"topup_id": self.next_id("T"), "member_id": self.regular if regular else self.member(),
                "amount": self.REGULAR_AMOUNT_WON if regular else
                self.rng.choice((50_000, 100_000, 200_000, 300_000, 500_000)),
                "occurred_at": self.at("next_month_day", 9 * 60, 120)}
        status = self.write("topup", "topup_id", "/v1/topups", "POST /v1/topups", body)
        if regular and status == "declined":
            self.regular = _draw("regulars", 11)

    @task(2)
    def check_balance(self):
        self.balance()


class RefundWave(CardApp):
    """Refunds of the payments the runner seeded (each refunded at most once here:
    the seeded list is shared out by position, so two users never pick the same one)."""

    _next = 0
    _lock = threading.Lock()

    @task(6)
    def refund(self):
        with RefundWave._lock:
            index = RefundWave._next
            RefundWave._next += 1
        payments = DATA["refundable"]
        if index >= len(payments):
            return self.pay(day_key="peak_day", minute_mean=18 * 60)
        payment_id, amount = payments[index]
        part = amount if self.rng.random() < 0.7 else max(100, (amount // 2) // 100 * 100)
        body = {"refund_id": self.next_id("R"), "amount": part, "occurred_at": self.at("peak_day", 18 * 60, 30)}
        self.write("refund", "refund_id", f"/v1/payments/{payment_id}/refunds", "POST /v1/payments/{id}/refunds",
                   body)

    @task(4)
    def payment(self):
        self.pay(day_key="peak_day", minute_mean=18 * 60)


class GrantDay(CardApp):
    """Disbursements of the relief grant at 09:00 (policy-editor key), and payments
    through the day: half of them (`RECIPIENT_SHARE`) by members this user has been
    told were disbursed to, after 09:00, so that they spend the grant (at merchants
    with annual sales up to 30억, the program's restriction; elsewhere their charged
    money); the other half by any member, most of whom hold no grant yet."""

    RECIPIENT_SHARE = 0.5
    GRANTED_AT_MINUTE = 9 * 60

    def on_start(self):
        super().on_start()
        self.officer = {"Authorization": f"Bearer {DATA['keys']['policy-editor']}"}
        self.recipients: list[str] = []

    @task(3)
    def disburse(self):
        # A program gives each member once (once_per_member): recipients are drawn without
        # replacement, from one shuffled list shared by the process's users.
        member = _draw("recipients", 7)
        if member is None:
            return
        # The amount is the program's own: coupon-2025-r2 pays a flat 100,000 won to
        # each recipient (policies/grants/2025-09-livelihood-coupon-round2.yaml); its
        # rules read no attribute, so none is sent (one they do not read is refused, 422).
        body = {"disbursement_id": self.next_id("D"), "member_id": member,
                "occurred_at": f"{DATA['grant_day']}T{self.GRANTED_AT_MINUTE // 60:02d}:00:00+09:00"}
        status = self.write("disbursement", "disbursement_id",
                            f"/v1/grant-programs/{DATA['grant_program']}/disbursements",
                            "POST /v1/grant-programs/{id}/disbursements", body, role="policy-editor")
        if status is not None:
            self.recipients.append(member)

    @task(7)
    def payment(self):
        if self.recipients and self.rng.random() < self.RECIPIENT_SHARE:
            return self.pay(day_key="grant_day", minute_mean=13 * 60, minute_sd=120,
                            member=self.rng.choice(self.recipients), minute_min=self.GRANTED_AT_MINUTE + 1)
        self.pay(day_key="grant_day", minute_mean=13 * 60, minute_sd=120)


class Idle(FastHttpUser):  # keeps `locust -f` from complaining when no class is named
    abstract = True
    wait_time = between(1, 2)
