"""A bounded open-loop HTTP load generator (asyncio protocols, keep-alive connections
to 127.0.0.1).

Requests are scheduled at a constant rate and each latency is measured from its
*scheduled* send time, so a stall shows up in the percentiles instead of quietly
lowering the rate (no coordinated omission). Stops after --duration seconds; at most
--connections requests are in flight (a request that finds none free waits, and that
wait counts in its latency).

It shares the 2 cores with the service it measures, so it is kept lean: each
connection is an `asyncio.Protocol` that parses its responses from one buffer (no
stream reader, no task per request), the scheduler wakes once per millisecond at most
and sends every request that has come due, and the request bytes of the next second are
built while the current one runs. (The first version, with a task and a stream reader
per request, cost ~185 µs of CPU per request on the 2026-12-04d machine.)

    python benchmarks/loadgen.py --port P --rate 1000 --duration 60 --data FILE --token KEY
Prints one JSON line: sent, ok, errors, status counts, p50/p90/p99/p99.9/max in ms, the
generator's own CPU per request, the count of requests over 25 ms and the five seconds
(from the start) holding most of them, each as [second, count, slowest ms].
`--latencies FILE` also writes every request as a line `sent_unix_s latency_s status`
(status 0: no answer; sent is when it was scheduled), for a caller that judges a window
of the run (`service_runs.py beside`)."""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import random
import time
import uuid

HOST = "127.0.0.1"
TICK_S = 0.001


def payment_body(rng: random.Random, members: list[str], merchants: list[str], serial: int, tag: str) -> bytes:
    amount = min(max(int(math.exp(math.log(12_300) + 0.8 * rng.gauss(0, 1)) // 100) * 100, 1_000), 2_000_000)
    second = serial % 3600
    return json.dumps({"payment_id": f"lg-{tag}-{serial}", "member_id": rng.choice(members),
                       "merchant_id": rng.choice(merchants), "amount": amount,
                       "occurred_at": f"2025-11-14T12:{second // 60:02d}:{second % 60:02d}+09:00"}).encode()


class Run:
    """What the connections report back to."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.latencies: list[float] = []
        self.scheduled: list[float] = []  # each latency's scheduled send time, for the worst seconds
        self.samples: list[tuple[float, float, int]] | None = None  # (scheduled, latency, status) with --latencies
        self.statuses: dict[int, int] = {}
        self.errors = 0
        self.free: collections.deque[Connection] = collections.deque()
        self.waiting: collections.deque[tuple[float, bytes]] = collections.deque()  # no connection was free
        self.in_flight = 0
        self.idle = asyncio.Event()

    def send(self, scheduled: float, request: bytes) -> None:
        if self.free:
            self.free.popleft().send(scheduled, request)
        else:
            self.waiting.append((scheduled, request))

    def done(self, connection: "Connection", status: int | None, scheduled: float) -> None:
        now = time.perf_counter()
        if self.samples is not None:
            self.samples.append((scheduled, now - scheduled, status or 0))
        if status is None:
            self.errors += 1
        else:
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if status >= 300:
                self.errors += 1
            self.latencies.append(now - scheduled)
            self.scheduled.append(scheduled)
        self.in_flight -= 1
        if connection.usable:
            self.give(connection)
        else:
            asyncio.ensure_future(self.reconnect())
        if not self.in_flight and not self.waiting:
            self.idle.set()

    def give(self, connection: "Connection") -> None:
        if self.waiting:
            connection.send(*self.waiting.popleft())
        else:
            self.free.append(connection)

    async def connect(self) -> "Connection":
        _, protocol = await asyncio.get_running_loop().create_connection(lambda: Connection(self), HOST, self.port)
        return protocol

    async def reconnect(self) -> None:
        try:
            self.give(await self.connect())
        except OSError:
            self.errors += 1


class Connection(asyncio.Protocol):
    """One keep-alive connection, one request at a time; responses parsed in place."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.scheduled: float | None = None
        self.usable = True

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, scheduled: float, request: bytes) -> None:
        self.run.in_flight += 1
        self.run.idle.clear()
        self.scheduled = scheduled
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.scheduled is None:
            return
        head = bytes(self.buffer[:end]).lower()
        length = 0
        at = head.find(b"content-length:")
        if at >= 0:
            stop = head.find(b"\r\n", at)
            length = int(head[at + 15:stop if stop >= 0 else len(head)])
        if len(self.buffer) < end + 4 + length:
            return
        status = int(head[9:12])
        del self.buffer[:end + 4 + length]
        scheduled, self.scheduled = self.scheduled, None
        self.run.done(self, status, scheduled)

    def connection_lost(self, exc) -> None:
        self.usable = False
        if self.scheduled is not None:
            scheduled, self.scheduled = self.scheduled, None
            self.run.done(self, None, scheduled)  # counts the error and reconnects
        elif self in self.run.free:  # closed while idle: never hand it a request
            self.run.free.remove(self)
            asyncio.ensure_future(self.run.reconnect())


async def main_async(args) -> dict:
    lines = open(args.data).read().splitlines()
    members, merchants = lines[0].split(), lines[1].split()
    rng = random.Random(args.seed)
    tag = uuid.uuid4().hex[:8]
    run = Run(args.port)
    if args.latencies:
        run.samples = []
    for _ in range(args.connections):
        run.free.append(await run.connect())
    head = (f"POST {args.path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {args.token}\r\n").encode()

    def request(serial: int) -> bytes:
        body = payment_body(rng, members, merchants, serial, tag)
        return head + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body

    interval = 1.0 / args.rate
    total = int(args.rate * args.duration)
    per_second = max(1, int(args.rate))
    ready = collections.deque(request(n) for n in range(min(total, 2 * per_second)))
    built = len(ready)  # requests built ahead: serials [serial, built) are in `ready`
    cpu0 = time.process_time()
    start = time.perf_counter() + 0.1
    serial = 0
    while serial < total:
        now = time.perf_counter()
        due = min(total, int((now - start) / interval) + 1) if now >= start else 0
        while serial < due:
            if not ready:  # the builder fell behind: build this one now
                ready.append(request(built))
                built += 1
            run.send(start + serial * interval, ready.popleft())
            serial += 1
        # Keep the next second or two of requests built, a few at a time, in the slack.
        while built < total and len(ready) < 2 * per_second and time.perf_counter() - now < TICK_S / 2:
            ready.append(request(built))
            built += 1
        if serial < total:
            # A fixed tick: the loop's timers have millisecond resolution, so a shorter
            # sleep would return at once and spin. Requests due meanwhile go at the next
            # tick, and their latency counts from when they were due.
            await asyncio.sleep(TICK_S)
    try:
        await asyncio.wait_for(run.idle.wait(), timeout=60)
    except asyncio.TimeoutError:
        run.errors += run.in_flight + len(run.waiting)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    if args.latencies:
        to_unix = time.time() - time.perf_counter()
        with open(args.latencies, "w") as out:
            out.writelines(f"{to_unix + sent:.6f} {latency:.6f} {status}\n" for sent, latency, status in run.samples)
    latencies = sorted(run.latencies)

    def pct(q: float) -> float:
        return round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 2) if latencies else float("nan")

    # Where the tail sits in time: the seconds (from the start) with the most requests
    # over 25 ms, and each one's slowest; a tail from a few stalls looks different
    # from one spread evenly.
    slow: dict[int, list[float]] = {}
    for latency, scheduled in zip(run.latencies, run.scheduled):
        if latency > 0.025:
            slow.setdefault(int(scheduled - start), []).append(latency)
    worst = sorted(slow.items(), key=lambda item: -len(item[1]))[:5]
    return {"sent": total, "ok": total - run.errors, "errors": run.errors, "statuses": run.statuses,
            "achieved_per_s": round(len(latencies) / elapsed, 1), "p50_ms": pct(0.5), "p90_ms": pct(0.9),
            "p99_ms": pct(0.99), "p999_ms": pct(0.999), "max_ms": round(1000 * latencies[-1], 2) if latencies else None,
            "loadgen_cpu_us": round(1e6 * cpu / max(total, 1), 1),
            "over_25ms": sum(len(v) for v in slow.values()),
            "worst_seconds": [[second, len(v), round(1000 * max(v), 1)] for second, v in worst]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/v1/payments")
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--duration", type=float, default=30)
    parser.add_argument("--connections", type=int, default=128)
    parser.add_argument("--data", required=True)
    parser.add_argument("--token", default="")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--latencies", default="", help="write every request's send time, latency and status here")
    args = parser.parse_args()
    assert 0 < args.rate <= 20_000 and 0 < args.duration <= 1_200 and 1 <= args.connections <= 1_000
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(main_async(args))))


if __name__ == "__main__":
    main()
