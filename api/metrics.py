"""Prometheus metrics. With several uvicorn workers, set PROMETHEUS_MULTIPROC_DIR
(`eum serve` does) so /metrics aggregates all of them."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess

REQUESTS = Counter("eum_requests_total", "HTTP requests", ["route", "status"])
LATENCY = Histogram("eum_request_seconds", "HTTP request latency", ["route"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
BATCH_SIZE = Histogram("eum_batch_commands", "Commands per group commit", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
BATCH_SECONDS = Histogram("eum_batch_seconds", "Time to write one batch",
                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))
QUEUE_DEPTH = Gauge("eum_batch_queue_depth", "Commands waiting for a writer, after each batch and every second (summed over workers)",
                    multiprocess_mode="livesum")
PAYMENTS = Counter("eum_payments_total", "Payments by outcome", ["status", "decline_code"])
CASHBACK_WON = Counter("eum_cashback_won_total", "Cashback granted, in won")
BUDGET_EVENTS = Counter("eum_budget_events_total", "Budget warnings: thresholds crossed, sources with no limit",
                        ["source", "event"])
BUDGET_CUTS = Counter("eum_budget_cut_payments_total",
                      "Payments whose cashback a budget cut (reason budget_partial or budget_skip), per budget",
                      ["source", "period", "reason"])


_PAYMENT_CHILDREN: dict = {}
_REQUEST_CHILDREN: dict = {}


def count_payment(status: str, decline_code: str, cashback_won: int) -> None:
    """PAYMENTS and CASHBACK_WON, with the labelled child looked up once per label pair."""
    child = _PAYMENT_CHILDREN.get((status, decline_code))
    if child is None:
        child = _PAYMENT_CHILDREN[(status, decline_code)] = PAYMENTS.labels(status, decline_code)
    child.inc()
    if cashback_won:
        CASHBACK_WON.inc(cashback_won)


def count_payments(commands, outcomes) -> None:
    """`count_payment` for each payment a batch committed: by the writer thread that
    committed it, whoever hears the answer (a request that gave up before the commit is
    retried and answered as a replay). A replay is not counted again, save one of the
    batch's own COMMIT, which went through unseen (`Outcome.own_commit`)."""
    for command, outcome in zip(commands, outcomes):
        if command.kind == "payment" and outcome.error is None and (not outcome.replayed or outcome.own_commit):
            body = outcome.body
            count_payment(body["status"], body.get("decline_code", ""), body["cashback"]["amount"])


def observe_request(route: str, status: int, seconds: float) -> None:
    """REQUESTS and LATENCY for the hot routes (children cached, as count_payment)."""
    children = _REQUEST_CHILDREN.get((route, status))
    if children is None:
        children = _REQUEST_CHILDREN[(route, status)] = (REQUESTS.labels(route, str(status)), LATENCY.labels(route))
    children[0].inc()
    children[1].observe(seconds)


def observe_batch(size: int, seconds: float, depth: int = 0) -> None:
    BATCH_SIZE.observe(size)
    BATCH_SECONDS.observe(seconds)
    QUEUE_DEPTH.set(depth)


def budget_event(source: str, event: str) -> None:
    BUDGET_EVENTS.labels(source, event).inc()


def budget_cut(source: str, period: str, reason: str, payments: int) -> None:
    BUDGET_CUTS.labels(source, period, reason).inc(payments)


def _forget_dead_workers(directory: str) -> None:
    """Drop the live gauges of workers that are gone (killed, then replaced by uvicorn's
    supervisor), as `prometheus_client.multiprocess.mark_process_dead` is meant to be
    called for: else a killed worker's last queue depth stayed in the sum until the
    service restarted. Counters of the dead stay: what they counted happened. (A pid
    another process has taken since is read as alive: its gauge stays until then.)"""
    for path in Path(directory).glob("gauge_live*_*.db"):
        pid = path.stem.rpartition("_")[2]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            try:
                multiprocess.mark_process_dead(int(pid), directory)
            except FileNotFoundError:  # another worker's scrape removed it first (a 500 here: the review)
                pass
        except PermissionError:  # alive, another user's
            pass


class _WorkersCollector(multiprocess.MultiProcessCollector):
    """MultiProcessCollector, leaving out a worker's file of 0 bytes. prometheus_client
    makes a worker's file, then sizes it: a scrape in between failed to read its header
    (struct.error), a 500 that lost every worker's metrics, and a worker killed in that
    moment left the empty file for good, so every later scrape failed too
    (prometheus/client_python#1199). An empty file holds nothing yet; once sized, a file
    never returns to 0 bytes, so a file read as empty is left out only while it is."""

    def collect(self):
        files = []
        for path in glob.glob(os.path.join(self._path, "*.db")):
            try:
                if os.stat(path).st_size:
                    files.append(path)
            except FileNotFoundError:  # a dead worker's gauge, removed by another scrape
                pass
        return self.merge(files, accumulate=True)


def render() -> tuple[bytes, str]:
    if directory := os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        _forget_dead_workers(directory)
        registry = CollectorRegistry()
        _WorkersCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
