"""Benchmarks against the running service (`eum serve --workers N`, PostgreSQL + Redis):

  hot       (b) hot accounts: every payment at a few very busy merchants, all charging
            the one city budget (limit set), against the same load spread over the
            sales-weighted merchants; wrk at full speed, alternating rounds in one run.
            Target: hot >= 0.9 of spread, 0 errors.
  constant  (e) a constant 1,000 payments/s (open loop, benchmarks/loadgen.py):
            target p99 < 25 ms, p99.9 < 100 ms, 0 errors.
  writers   (e) the same constant rate, alternating service settings in one run
            (`--configs WRITERS:LINGER_US,...`; by default one writer thread per worker
            with a 2 ms linger, the service's default, against two writers with no
            linger, the default before 2026-12-04d); per configuration the
            latencies, the mean batch size and the CPU per payment of the workers and of
            all PostgreSQL processes on the machine (from /proc; another database's
            work on the same server counts too).
  memory    (f) resident memory of every worker sampled every few seconds under a
            constant load: target flat and < 300 MiB per worker (10 minutes in CI-free
            conditions; --seconds sets this run's length, printed with the result).

    .venv/bin/python benchmarks/service_runs.py hot|constant|writers|memory [--workers 2] [...]"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.floor_ratio import line, setup_database, wrk, write_wrk_data  # noqa: E402
from loadtests import harness as h  # noqa: E402
from api.fastpath import LOCAL_ENTRIES_MAX  # noqa: E402

LOADGEN = Path(__file__).resolve().parent / "loadgen.py"


def loadgen(svc: h.Service, data: Path, token: str, rate: float, duration: float, connections: int = 128) -> dict:
    out = subprocess.run([h.PYTHON, str(LOADGEN), "--port", str(svc.port), "--rate", str(rate), "--duration",
                          str(duration), "--data", str(data), "--token", token, "--connections", str(connections)],
                         capture_output=True, text=True, timeout=duration + 120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def hot_verdict(ratio: float, errors: int, book_ok: bool) -> str:
    """(b)'s verdict. A run with errors (wrk's: refused, broken or timed-out connections
    and non-2xx answers) is not a PASS, however fast, as in floor_ratio.py's (a)."""
    return "PASS" if ratio >= 0.9 and not errors and book_ok else "MISS"


def run_hot(args, url, pop, keys, tmp: Path) -> bool:
    spread = tmp / "spread.txt"
    write_wrk_data(pop, spread)
    hot = tmp / "hot.txt"
    busy = [m["merchant_id"] for m in pop.merchants if m["category"] not in ("large_mart",)
            and m["annual_sales_won"] <= 3_000_000_000][:3]
    hot.write_text(" ".join(m["member_id"] for m in pop.members) + "\n" + " ".join(busy) + "\n")
    ratios, errors = [], 0
    with h.running_service(url, workers=args.workers, name="hot") as svc:
        common = dict(connections=args.connections, token=keys["card-app"])
        wrk(svc.base_url, "/v1/payments", seconds=3, data=spread, prefix="warm", **common)
        for round_no in range(args.rounds):
            s = wrk(svc.base_url, "/v1/payments", seconds=args.seconds, data=spread, prefix=f"s{round_no}", **common)
            t = wrk(svc.base_url, "/v1/payments", seconds=args.seconds, data=hot, prefix=f"h{round_no}", **common)
            ratios.append(t["rps"] / s["rps"])
            errors += s["errors"] + t["errors"]
            print(line("spread", s))
            print(line("hot", t))
            print(f"round {round_no + 1}: hot/spread {ratios[-1]:.3f}")
    from loadtests.checks import check_book_after_run

    ok = check_book_after_run(url)
    ratio = h.median(ratios)
    print(f"hot merchants: {busy}; every payment charges city and national budgets (limits set)")
    print(f"RESULT hot_accounts median hot/spread {ratio:.3f}, errors {errors} (target >= 0.9, 0 errors): "
          f"{hot_verdict(ratio, errors, ok)}")
    return ok


def run_constant(args, url, pop, keys, tmp: Path) -> bool:
    data = tmp / "data.txt"
    write_wrk_data(pop, data)
    results = []
    with h.running_service(url, workers=args.workers, name="constant") as svc:
        loadgen(svc, data, keys["card-app"], args.rate, 5)  # warm up
        for _ in range(args.rounds):
            r = loadgen(svc, data, keys["card-app"], args.rate, args.seconds)
            results.append(r)
            print(f"{args.rate:.0f}/s for {args.seconds:.0f} s: achieved {r['achieved_per_s']}/s, p50 {r['p50_ms']} ms, "
                  f"p99 {r['p99_ms']} ms, p99.9 {r['p999_ms']} ms, max {r['max_ms']} ms, errors {r['errors']}; "
                  f"over 25 ms {r['over_25ms']}, most in seconds [second, count, slowest ms] {r['worst_seconds']}")
    from loadtests.checks import check_book_after_run

    ok = check_book_after_run(url)
    p99 = h.median([r["p99_ms"] for r in results])
    p999 = h.median([r["p999_ms"] for r in results])
    errors = sum(r["errors"] for r in results)
    print(f"RESULT constant_rate {args.rate:.0f}/s: median p99 {p99} ms, p99.9 {p999} ms, errors {errors} "
          f"(target p99 < 25, p99.9 < 100, 0 errors): {'PASS' if p99 < 25 and p999 < 100 and not errors and ok else 'MISS'}")
    return ok


DEFAULT_WRITER_CONFIGS = "1:2000,2:0"


def writer_configs(spec: str) -> dict[str, dict[str, str]]:
    """`WRITERS:LINGER_US,...` as named service settings, e.g. "2:0,1:2000"."""
    configs = {}
    for part in spec.split(","):
        writers, linger_us = (int(x) for x in part.split(":"))
        assert 1 <= writers <= 8 and 0 <= linger_us <= 50_000, part
        name = f"{writers} writer{'s' if writers > 1 else ''}, linger {linger_us / 1000:g} ms"
        configs[name] = {"EUM_BATCH_WRITERS": str(writers), "EUM_BATCH_LINGER_US": str(linger_us)}
    return configs


def run_writers(args, url, pop, keys, tmp: Path) -> bool:
    data = tmp / "data.txt"
    write_wrk_data(pop, data)
    configs = writer_configs(args.configs)
    results: dict[str, list[dict]] = {name: [] for name in configs}
    for round_no in range(args.rounds):
        for name, env in configs.items():
            with h.running_service(url, workers=args.workers, env_extra=env, name="writers") as svc:
                pids = svc.worker_pids()
                loadgen(svc, data, keys["card-app"], args.rate, 3)  # warm up
                before = h.CpuSample.take(svc, pids)
                r = loadgen(svc, data, keys["card-app"], args.rate, args.seconds)
                cpu = before.per_request(h.CpuSample.take(svc, pids), r["ok"])
            r["batch_mean"] = cpu["batch_mean"] or 0.0
            r["worker_us"] = cpu["workers"]
            r["postgres_us"] = cpu["postgres"]
            results[name].append(r)
            print(f"round {round_no + 1} {name:24s} achieved {r['achieved_per_s']}/s, p50 {r['p50_ms']} ms, "
                  f"p99 {r['p99_ms']} ms, p99.9 {r['p999_ms']} ms, errors {r['errors']}, batch {r['batch_mean']:.1f}; "
                  "CPU per payment: "
                  f"workers {r['worker_us']:.0f} us, PostgreSQL (all on the machine) {r['postgres_us']:.0f} us", flush=True)
    from loadtests.checks import check_book_after_run

    ok = check_book_after_run(url)
    for name, rs in results.items():
        print(f"RESULT writers {args.rate:.0f}/s {name}: median p50 {h.median([r['p50_ms'] for r in rs]):.1f} ms, "
              f"p99 {h.median([r['p99_ms'] for r in rs]):.1f} ms, p99.9 {h.median([r['p999_ms'] for r in rs]):.1f} ms, "
              f"batch {h.median([r['batch_mean'] for r in rs]):.1f}, CPU per payment workers {h.median([r['worker_us'] for r in rs]):.0f} us, PostgreSQL (all on the machine) "
              f"{h.median([r['postgres_us'] for r in rs]):.0f} us, errors {sum(r['errors'] for r in rs)}; "
              f"book {'ok' if ok else 'FAILED'}")
    return ok


def run_memory(args, url, pop, keys, tmp: Path) -> bool:
    data = tmp / "data.txt"
    write_wrk_data(pop, data)
    samples: list[tuple[float, list[float]]] = []
    with h.running_service(url, workers=args.workers, name="memory") as svc:
        pids = svc.worker_pids()
        stop = threading.Event()

        def sample():
            started = time.monotonic()
            while not stop.wait(args.sample_s):
                samples.append((time.monotonic() - started, [h.rss_mib(p) or 0.0 for p in pids]))

        thread = threading.Thread(target=sample, daemon=True)
        before = [h.rss_mib(p) or 0.0 for p in pids]
        thread.start()
        r = loadgen(svc, data, keys["card-app"], args.rate, args.seconds)
        stop.set()
        thread.join(10)
    print(f"load: {args.rate:.0f}/s for {args.seconds:.0f} s, achieved {r['achieved_per_s']}/s, errors {r['errors']}")
    print("RSS MiB per worker (t, workers...): before " + ", ".join(f"{v:.0f}" for v in before))
    for t, values in samples[:: max(1, len(samples) // 12)]:
        print(f"  t={t:5.0f}s " + "  ".join(f"{v:6.1f}" for v in values))
    peak = max(max(v) for _, v in samples) if samples else 0.0
    # Warm-up: each worker's replay table (api/fastpath.py, bounded) fills, and the
    # allocator reaches its working set. Flatness is judged after it: the median of the
    # first and of the last half of the remaining samples.
    fill_s = LOCAL_ENTRIES_MAX * args.workers / max(args.rate, 1.0)
    warm_s = args.warmup_s if args.warmup_s is not None else min(args.seconds / 3, max(60.0, 1.2 * fill_s))
    steady = [max(v) for t, v in samples if t >= warm_s] or [max(v) for _, v in samples]
    half = max(1, len(steady) // 2)
    early, late = h.median(steady[:half]), h.median(steady[-half:])
    print(f"RESULT memory over {args.seconds:.0f} s: peak {peak:.0f} MiB per worker; after a {warm_s:.0f} s "
          f"warm-up (replay table full after ~{fill_s:.0f} s): first half {early:.0f} MiB, last half "
          f"{late:.0f} MiB (growth {late - early:+.1f} MiB; target flat, < 300): "
          f"{'PASS' if peak < 300 and late - early < 10 else 'MISS'}")
    return True  # no book check: a run of its own length, the memory its figure


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=("hot", "constant", "writers", "memory"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--sample-s", type=float, default=5)
    parser.add_argument("--warmup-s", type=float, default=None,
                        help="memory: seconds left out of the flatness test (default: until the replay table is full)")
    parser.add_argument("--configs", default=DEFAULT_WRITER_CONFIGS,
                        help="writers: service settings to alternate, WRITERS:LINGER_US,... (default %(default)s)")
    parser.add_argument("--members", type=int, default=20_000)
    parser.add_argument("--merchants", type=int, default=3_000)
    args = parser.parse_args()
    args.seconds = args.seconds or {"hot": 15, "constant": 30, "writers": 20, "memory": 600}[args.which]
    assert 1 <= args.rounds <= 10 and 1 <= args.seconds <= 1_200
    service = h.service_settings()  # as the service resolves them, from the same EUM_* environment
    if args.which == "writers":  # each configuration sets its own
        service = {"batch_size_max": service["batch_size_max"], "writers:linger_us": args.configs}
    h.print_machine({"benchmark": args.which, "workers": args.workers, "seconds": args.seconds,
                     "rounds": args.rounds, "rate": args.rate if args.which != "hot" else "max (wrk)", **service})
    with h.fresh_database() as url, tempfile.TemporaryDirectory() as tmp:
        pop, keys = setup_database(url, args.members, args.merchants)
        run = {"hot": run_hot, "constant": run_constant, "writers": run_writers, "memory": run_memory}[args.which]
        ok = run(args, url, pop, keys, Path(tmp))
    return 0 if ok else 1  # a target missed is a figure; a book check that fails is a failure


if __name__ == "__main__":
    sys.exit(main())
