"""loadtests/faultkit.py's reading of the service's own request times
(`served_slower_than`), which tests/test_faults.py bounds latency with: the client's
clock on a loaded machine also counts the load generator's own delays."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from api import metrics
from loadtests.faultkit import served_slower_than


def exposition(observed: dict[str, list[float]]) -> str:
    """/metrics text with the service's request histogram (its name, label and buckets)."""
    registry = CollectorRegistry()
    latency = Histogram(metrics.LATENCY._name, "HTTP request latency", ["route"], registry=registry,
                        buckets=metrics.LATENCY._upper_bounds)
    for route, seconds in observed.items():
        for s in seconds:
            latency.labels(route).observe(s)
    return generate_latest(registry).decode()


def test_requests_slower_than_a_bound_are_counted_at_the_next_bucket_bound():
    text = exposition({"/v1/payments": [0.002, 0.4, 1.0, 1.7, 2.6], "/readyz": [4.0, 4.0]})
    assert served_slower_than(text, "/v1/payments", 1.0) == (2, 1.0, 5)  # 1.7 and 2.6; 1.0 is within
    assert served_slower_than(text, "/v1/payments", 1.2) == (1, 2.5, 5)  # rounded up to the 2.5 s bucket
    assert served_slower_than(text, "/v1/payments", 0.0015) == (4, 0.0025, 5)  # 0.002 within
    assert served_slower_than(text, "/readyz", 1.0) == (2, 1.0, 2)  # each route its own


def test_a_route_never_timed_is_no_request_at_all():
    assert served_slower_than(exposition({"/readyz": [0.1]}), "/v1/payments", 1.0) == (0, math.inf, 0)
