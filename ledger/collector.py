"""Python's cyclic garbage collector, paused for a bulk job.

A bulk job (the payment replay, a grant disbursement file) builds a chunk's state, its
legs, rows and answers: hundreds of thousands of objects that all stay alive until the
chunk commits, and the answers longer. The collector counts allocations, not garbage:
every 700 new objects it traverses the young ones, every 10 of those the older ones,
and now and then everything alive. None of these objects form cycles (reference
counting frees them), so all that traversal finds nothing. Measured on the replay of
40,000 payments in chunks of 10,000: 1,740 collections, 1.28 s of a 6.4 s run, ~30 µs
of CPU per payment (docs/performance.md, item 24).

`paused()` turns the collector off for the length of the block and back on after,
unless something else had turned it off. Nested and concurrent blocks (threads) share
one pause: the collector comes back on when the last of them ends. Cycles made during
the pause (a caught exception's traceback, say) are not lost: the first collection
after it finds them.

It is for processes that run the bulk job and nothing else: `replay_payments` pauses
it; `eum grants disburse` and the benchmarks pause it around `bulk_disburse`. A
serving worker does not: the collector is the process's, and the worker serves other
requests during an upload. Its batches are small and short-lived anyway, and
`api.services.freeze_startup_heap` keeps its start-up heap out of the collector's
sight.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from typing import Iterator

_lock = threading.Lock()
_holders = 0  # blocks inside paused()
_turned_off = False  # whether the first of them turned the collector off (so the last turns it on)


@contextlib.contextmanager
def paused() -> Iterator[None]:
    global _holders, _turned_off
    with _lock:
        if _holders == 0:
            _turned_off = gc.isenabled()
            gc.disable()
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0 and _turned_off:
                _turned_off = False
                gc.enable()
