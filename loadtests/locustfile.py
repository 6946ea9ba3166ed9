"""Locust scenarios on the HTTP contract (../shared/API.md beside the repository), for `loadtests/run.py`.

Each user class is one scenario; pick it by name on the locust command line:
- LunchPeak: payments at sales-weighted merchants around 12:30 on a Friday, with the
  card app checking the member's balance now and then;
- TopupStorm: the first of the month, members topping up (the monthly limit resets);
- RefundWave: refunds (whole and partial) of the day's earlier payments, with new
  payments going on;
- GrantDay: a relief grant disbursed to many members while they already spend it.

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

    def at(self, day_key: str, minute_mean: float, minute_sd: float) -> str:
        minute = min(max(self.rng.gauss(minute_mean, minute_sd), 0), 24 * 60 - 1)
        return f"{DATA[day_key]}T{int(minute // 60):02d}:{int(minute % 60):02d}:{self.rng.randrange(60):02d}+09:00"

    def write(self, kind: str, id_field: str, path: str, name: str, body: dict, role: str = "card-app") -> None:
        """POST one write; acknowledged (2xx) ids go to the ack file, and with
        EUM_LT_SENT_DIR every send and what it was told go to the sent file."""
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

    def pay(self, day_key: str = "peak_day", minute_mean: float = 12.5 * 60, minute_sd: float = 40,
            member: str | None = None) -> None:
        body = {"payment_id": self.next_id("P"), "member_id": member or self.member(), "merchant_id": self.merchant(),
                "amount": amount_won(self.rng), "occurred_at": self.at(day_key, minute_mean, minute_sd)}
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


class TopupStorm(CardApp):
    @task(8)
    def topup(self):
        body = {"topup_id": self.next_id("T"), "member_id": self.member(),
                "amount": self.rng.choice((50_000, 100_000, 200_000, 300_000, 500_000)),
                "occurred_at": self.at("next_month_day", 9 * 60, 120)}
        self.write("topup", "topup_id", "/v1/topups", "POST /v1/topups", body)

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


_RECIPIENTS = None


def _grant_recipients():
    global _RECIPIENTS
    if _RECIPIENTS is None:
        members = list(DATA["members"])
        random.Random(7).shuffle(members)
        _RECIPIENTS = iter(members)
    return _RECIPIENTS


class GrantDay(CardApp):
    """Disbursements of the relief grant (policy-editor key), and payments that spend it."""

    def on_start(self):
        super().on_start()
        self.officer = {"Authorization": f"Bearer {DATA['keys']['policy-editor']}"}

    @task(3)
    def disburse(self):
        # A program gives each member once (once_per_member): recipients are drawn without
        # replacement, from one shuffled list shared by the process's users.
        member = next(_grant_recipients(), None)
        if member is None:
            return
        # The amount is the program's: its rules give it from the recipient's district
        # (the registry's); they read no attribute, so none is sent (one they do not read
        # is refused, 422).
        body = {"disbursement_id": self.next_id("D"), "member_id": member,
                "occurred_at": f"{DATA['grant_day']}T09:00:00+09:00"}
        self.write("disbursement", "disbursement_id", f"/v1/grant-programs/{DATA['grant_program']}/disbursements",
                   "POST /v1/grant-programs/{id}/disbursements", body, role="policy-editor")

    @task(7)
    def payment(self):
        self.pay(day_key="grant_day", minute_mean=13 * 60, minute_sd=120)


class Idle(FastHttpUser):  # keeps `locust -f` from complaining when no class is named
    abstract = True
    wait_time = between(1, 2)
