"""(a) The framework floor versus POST /v1/payments, in one run, with one load generator.

Both are served by uvicorn with the same workers; wrk (one thread, C) drives both with
the same Lua script and connection count, in alternating rounds: floor, payments,
floor, payments, ... The ratio of each round pair is payments/floor throughput; the
figure quoted is the median ratio. Target: >= 0.7 with 0 errors.

    .venv/bin/python benchmarks/floor_ratio.py [--workers 2] [--seconds 15] [--rounds 3] [--connections 64]

Each round also prints the CPU spent per request served, from /proc: the service's
workers, every PostgreSQL process on the machine (another database's work on the same
server counts too: run it on a quiet server), wrk, the whole machine, and the machine's idle share
(a round bound by waiting rather than computing shows idle time); for payments, the
server's WAL per payment (bytes from its insert position; records and full-page images from `pg_stat_wal`).

Needs `wrk` (Debian: apt-get install -y wrk). Traffic goes to 127.0.0.1 only."""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests import harness as h  # noqa: E402

WRK_SCRIPT = Path(__file__).resolve().parent / "wrk_payments.lua"
TARGET_RATIO = 0.7


def write_wrk_data(pop: h.Population, path: Path, picks: int = 20_000, seed: int = 5) -> None:
    rng = random.Random(seed)
    merchants = rng.choices([m["merchant_id"] for m in pop.merchants], weights=pop.merchant_weights, k=picks)
    path.write_text(" ".join(m["member_id"] for m in pop.members) + "\n" + " ".join(merchants) + "\n")


def wrk(url_base: str, path: str, *, seconds: float, connections: int, data: Path, token: str, prefix: str,
        threads: int = 1, rate: int | None = None) -> dict:
    """One bounded wrk run; returns its summary (requests, errors, latency percentiles in µs)."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as summary:
        summary_path = summary.name
    env = dict(os.environ, EUM_WRK_DATA=str(data), EUM_WRK_TOKEN=token, EUM_WRK_PATH=path, EUM_WRK_PREFIX=prefix,
               EUM_WRK_SUMMARY=summary_path)
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{int(seconds)}s", "--timeout", "10s",
               "-s", str(WRK_SCRIPT), url_base]
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=seconds + 60)
    result = json.loads(Path(summary_path).read_text())
    os.unlink(summary_path)
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["errors"] = sum(result[k] for k in ("errors_connect", "errors_read", "errors_write", "errors_status",
                                               "errors_timeout"))
    return result


def setup_database(url: str, members: int, merchants: int) -> tuple[h.Population, dict]:
    pop = h.population(11, members, merchants)
    h.seed_registry(url, pop)
    h.seed_budgets(url, {("city", "2025"): 125_400_000_000, ("national", "2025"): 80_000_000_000,
                         ("city", "2025-11"): 12_000_000_000, ("national", "2025-11"): 8_000_000_000})
    h.seed_topups(url, [m["member_id"] for m in pop.members], 1_500_000)
    return pop, h.make_keys(url)


def measured_wrk(service: h.Service, url_base: str, path: str, **kwargs) -> dict:
    """`wrk`, with the CPU each party spent during it, per request served: the service's
    workers, every PostgreSQL process, wrk itself; and the machine's idle share."""
    pids = service.worker_pids()
    counted = path.startswith("/v1/")  # the payments service counts its batches; the floor app does not
    before = h.CpuSample.take(service, pids, counted=counted)
    result = wrk(url_base, path, **kwargs)
    cpu = before.per_request(h.CpuSample.take(service, pids, counted=counted), result["requests"])
    result["batch_mean"] = cpu["batch_mean"] if counted else None
    result["cpu_us"] = {"workers": cpu["workers"], "postgres": cpu["postgres"], "wrk": cpu["children"],
                        "machine": cpu["machine"]}
    result["idle"] = cpu["idle"]
    result["wal"] = {k: cpu[f"wal_{k}"] for k in ("bytes", "records", "fpi")}
    return result


def cpu_line(r: dict) -> str:
    c = r["cpu_us"]
    return (f"          CPU per request: workers {c['workers']:.0f} µs, postgres (all on the machine) "
            f"{c['postgres']:.0f} µs, "
            f"wrk {c['wrk']:.0f} µs; machine {c['machine']:.0f} µs in all, {100 * r['idle']:.0f}% idle"
            + (f"; {r['batch_mean']:.1f} payments per batch; WAL {r['wal']['bytes']:.0f} bytes, "
               f"{r['wal']['records']:.1f} records, {r['wal']['fpi']:.2f} full-page images"
               if r["batch_mean"] is not None else ""))


def line(name: str, r: dict) -> str:
    return (f"{name:9s} {r['rps']:8.0f} req/s  p50 {r['p50_us'] / 1000:6.2f} ms  p99 {r['p99_us'] / 1000:6.2f} ms  "
            f"p99.9 {r['p999_us'] / 1000:6.2f} ms  errors {r['errors']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--members", type=int, default=20_000)
    parser.add_argument("--merchants", type=int, default=3_000)
    args = parser.parse_args()
    assert 1 <= args.rounds <= 10 and 1 <= args.seconds <= 120

    h.print_machine({"workers": args.workers, "wrk": f"1 thread, {args.connections} connections",
                     "seconds per round": args.seconds, "rounds": args.rounds, **h.service_settings()})
    with h.fresh_database() as url, tempfile.TemporaryDirectory() as tmp:
        pop, keys = setup_database(url, args.members, args.merchants)
        data = Path(tmp) / "wrk-data.txt"
        write_wrk_data(pop, data)
        floor_argv = [h.PYTHON, "-m", "benchmarks.floor_app", "{port}", str(args.workers)]
        with h.running_service(url, workers=args.workers, name="payments") as svc, \
                h.running_service(url, workers=args.workers, argv=floor_argv, name="floor") as floor:
            common = dict(connections=args.connections, data=data, token=keys["card-app"])
            wrk(floor.base_url, "/floor", seconds=3, prefix="warm-f", **common)
            wrk(svc.base_url, "/v1/payments", seconds=3, prefix="warm-p", **common)
            warmed = payments_recorded(url)  # the warm-up's: the check below counts the rounds' on top
            ratios, floors, pays = [], [], []
            for round_no in range(args.rounds):
                f = measured_wrk(floor, floor.base_url, "/floor", seconds=args.seconds, prefix=f"f{round_no}",
                                 **common)
                p = measured_wrk(svc, svc.base_url, "/v1/payments", seconds=args.seconds, prefix=f"r{round_no}",
                                 **common)
                floors.append(f)
                pays.append(p)
                ratios.append(p["rps"] / f["rps"])
                print(line("floor", f))
                print(cpu_line(f))
                print(line("payments", p))
                print(cpu_line(p))
                print(f"round {round_no + 1}: ratio {ratios[-1]:.3f}")
                time.sleep(1)
        # wrk's requests less its errors (non-2xx included): the payments acknowledged
        checks = h_check(url, warmed + sum(p["requests"] - p["errors"] for p in pays))
    errors = sum(p["errors"] for p in pays)
    ratio = h.median(ratios)
    print(f"\nfloor median {h.median([f['rps'] for f in floors]):.0f} req/s; payments median "
          f"{h.median([p['rps'] for p in pays]):.0f} payments/s; errors {errors}")
    for name, runs in (("floor", floors), ("payments", pays)):
        medians = {k: h.median([r["cpu_us"][k] for r in runs]) for k in ("workers", "postgres", "wrk", "machine")}
        print(f"{name} CPU per request, medians: workers {medians['workers']:.0f} µs, postgres (all on the machine) "
              f"{medians['postgres']:.0f} µs, wrk {medians['wrk']:.0f} µs, machine {medians['machine']:.0f} µs; "
              f"idle {100 * h.median([r['idle'] for r in runs]):.0f}%"
              + (f"; WAL {h.median([r['wal']['bytes'] for r in runs]):.0f} bytes, "
                 f"{h.median([r['wal']['records'] for r in runs]):.1f} records per payment" if name == "payments" else ""))
    print(f"RESULT floor_ratio median {ratio:.3f} (target >= {TARGET_RATIO}, 0 errors): "
          f"{'PASS' if ratio >= TARGET_RATIO and errors == 0 and checks else 'MISS'}")
    return 0 if checks else 1  # a ratio that misses is a figure; a book check that fails is a failure


def payments_recorded(url: str) -> int:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM payments").fetchone()[0]


def h_check(url: str, acknowledged_min: int) -> bool:
    from loadtests.checks import check_book_after_run

    return check_book_after_run(url, acknowledged_count_min=acknowledged_min)


if __name__ == "__main__":
    sys.exit(main())
