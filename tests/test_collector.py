"""The cyclic collector's pause for bulk jobs (ledger/collector.py): off inside, back on
after (also after an error), left off if something else had turned it off, and one pause
shared by nested and concurrent blocks. The payment replay runs its chunks inside it."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest

from ledger import collector
from ledger import replay as bulk_replay
from tests.conftest import make_api
from tests.test_bulk_replay import _payments, _setup


@pytest.fixture(autouse=True)
def collector_on():
    was = gc.isenabled()
    gc.enable()
    yield
    assert collector._holders == 0
    gc.enable() if was else gc.disable()


def test_off_inside_and_on_after_even_after_an_error():
    with collector.paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(ZeroDivisionError), collector.paused():
        1 / 0
    assert gc.isenabled()


def test_left_off_when_something_else_had_turned_it_off():
    gc.disable()
    with collector.paused():
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_nested_and_concurrent_blocks_share_one_pause():
    with collector.paused():
        with collector.paused():
            pass
        assert not gc.isenabled()  # the outer block still holds it
    assert gc.isenabled()

    entered, release = threading.Barrier(3), threading.Event()
    seen: list[bool] = []

    def job(hold: bool) -> None:
        with collector.paused():
            entered.wait()
            if hold:
                release.wait(10)
            seen.append(gc.isenabled())

    short, long = threading.Thread(target=job, args=(False,)), threading.Thread(target=job, args=(True,))
    short.start(), long.start()
    entered.wait()
    short.join(10)
    assert not gc.isenabled()  # the first block ended; the second still runs paused
    release.set()
    long.join(10)
    assert seen == [False, False] and gc.isenabled()


def test_cycles_made_during_the_pause_are_collected_after():
    class Node:
        pass

    freed = threading.Event()
    with collector.paused():
        a, b = Node(), Node()
        a.other, b.other = b, a
        weakref.finalize(a, freed.set)
        del a, b
        assert not freed.is_set()  # reference counting alone cannot free a cycle
    gc.collect()
    assert freed.is_set()


def test_replay_runs_its_chunks_paused_and_restores_the_collector(db_url):
    api = make_api(db_url)
    with api.client:
        _setup(api, None)
        book = bulk_replay.replay_book(api.services.book.engine, api.services.book.timeline)
        seen: list[bool] = []
        execute = book.execute

        def spying(commands, **kwargs):
            seen.append(gc.isenabled())
            return execute(commands, **kwargs)

        book.execute = spying
        report, _ = bulk_replay.replay_payments(book, _payments(20, seed=9), chunk=7)
        assert report.recorded == 20 and not report.errors
        assert seen == [False, False, False]
        assert gc.isenabled()
