"""A bounded open-loop HTTP load generator (asyncio, keep-alive connections to 127.0.0.1).

Requests are scheduled at a constant rate and each latency is measured from its
*scheduled* send time, so a stall shows up in the percentiles instead of quietly
lowering the rate (no coordinated omission). Stops after --duration seconds; at most
--connections requests are in flight (a request that finds none free waits, and that
wait counts in its latency).

    python benchmarks/loadgen.py --port P --rate 1000 --duration 60 --data FILE --token KEY
Prints one JSON line: sent, ok, errors, status counts, p50/p90/p99/p99.9/max in ms."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
import uuid

HOST = "127.0.0.1"


def payment_body(rng: random.Random, members: list[str], merchants: list[str], serial: int, tag: str) -> bytes:
    amount = min(max(int(math.exp(math.log(12_300) + 0.8 * rng.gauss(0, 1)) // 100) * 100, 1_000), 2_000_000)
    second = serial % 3600
    return json.dumps({"payment_id": f"lg-{tag}-{serial}", "member_id": rng.choice(members),
                       "merchant_id": rng.choice(merchants), "amount": amount,
                       "occurred_at": f"2025-11-14T12:{second // 60:02d}:{second % 60:02d}+09:00"}).encode()


async def main_async(args) -> dict:
    lines = open(args.data).read().splitlines()
    members, merchants = lines[0].split(), lines[1].split()
    rng = random.Random(args.seed)
    tag = uuid.uuid4().hex[:8]
    pool: asyncio.Queue = asyncio.Queue()
    for _ in range(args.connections):
        pool.put_nowait(await asyncio.open_connection(HOST, args.port))
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    head = (f"POST {args.path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {args.token}\r\n").encode()

    async def one(scheduled: float, body: bytes) -> None:
        nonlocal errors
        reader, writer = await pool.get()
        try:
            writer.write(head + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            status_line = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            status = int(status_line.split()[1])
            statuses[status] = statuses.get(status, 0) + 1
            if status >= 300:
                errors += 1
            latencies.append(time.perf_counter() - scheduled)
        except Exception:
            errors += 1
            reader, writer = await asyncio.open_connection(HOST, args.port)
        finally:
            pool.put_nowait((reader, writer))

    interval = 1.0 / args.rate
    start = time.perf_counter() + 0.1
    total = int(args.rate * args.duration)
    tasks = []
    for serial in range(total):
        scheduled = start + serial * interval
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(scheduled, payment_body(rng, members, merchants, serial, tag))))
        if len(tasks) > 5_000:
            tasks = [t for t in tasks if not t.done()]
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    elapsed = time.perf_counter() - start
    latencies.sort()

    def pct(q: float) -> float:
        return round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 2) if latencies else float("nan")

    return {"sent": total, "ok": total - errors, "errors": errors, "statuses": statuses,
            "achieved_per_s": round(len(latencies) / elapsed, 1), "p50_ms": pct(0.5), "p90_ms": pct(0.9),
            "p99_ms": pct(0.99), "p999_ms": pct(0.999), "max_ms": round(1000 * latencies[-1], 2) if latencies else None}


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
