"""What one worker process holds: engines, the book, the batcher, caches, Redis."""

from __future__ import annotations

import datetime as dt
import gc
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from sqlalchemy import Connection, Engine, select

from api.batcher import Batcher
from api.fastpath import IdempotencyCache
from api import metrics
from eum.settings import Settings
from ledger import audit, policies
from ledger import schema as s
from ledger.book import Book
from ledger.db import book_tag, make_engine, reader
from ledger.keys import KeyVerifier
from ledger.programs import ProgramCache
from rules.compiled import CompiledPolicy, PolicyTimeline, compile_policy
from rules.loader import load_policy_dir
from rules.document import PolicyDocument
from rules.timeutil import from_us

log = structlog.get_logger("api.services")


@dataclass
class Services:
    settings: Settings
    engine: Engine
    reader: Engine
    book: Book
    batcher: Batcher
    keys: KeyVerifier
    programs: ProgramCache
    idempotency: IdempotencyCache
    files: list[CompiledPolicy]  # the policy files as read and checked at start

    @property
    def timeline(self) -> PolicyTimeline:
        return self.book.timeline

    _timeline_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def reload_policies(self) -> None:
        """The policy files read at start plus those activated through the API, as one
        timeline. The files are not read again: one edited on disk meanwhile is refused
        at the next start (`load_files`), never taken in unchecked.

        Read and installed under one lock, so timelines are installed in the order they
        were read and the last installed is the newest: the poller and the activation
        and withdrawal requests of one worker all install through here. (Each request
        installed the timeline it had read in its own transaction: one that read before
        another's step could install after it, and after the poller had taken the step
        as seen, leaving the worker on a withdrawn policy until the next change; the
        staff-races audit.)"""
        with self._timeline_lock, self.reader.connect() as conn:
            self.book.timeline = timeline_in(conn, self.files)

    def close(self) -> None:
        self.batcher.close()
        self.engine.dispose()


def load_files(conn: Connection, policies_dir: Path) -> list[CompiledPolicy]:
    """The policy files, compiled, each the policy recorded under its id: a file edited in
    place (or gone) raises `ledger.policies.PolicyFileChanged`, since the payments a policy
    judged name it by its id. New files are recorded by `sync_file_policies`."""
    files = load_policy_dir(policies_dir)
    policies.check_file_policies(conn, files, policies_dir)
    return files


def load_timeline(settings: Settings, engine: Engine) -> PolicyTimeline:
    """The checked files and the policies activated through the API, for a command that
    only reads the book."""
    with engine.connect() as conn:
        return timeline_in(conn, load_files(conn, settings.policies_dir))


def book_timeline(settings: Settings, engine: Engine) -> PolicyTimeline:
    """As `load_timeline`, for a command that writes the book: new files are recorded
    (and audited) first, as the service's start does, so every policy id an event names
    is one recorded."""
    files = load_policy_dir(settings.policies_dir)
    with engine.begin() as conn:
        policies.sync_file_policies(conn, files, settings.policies_dir)
        return timeline_in(conn, files)


def timeline_in(conn: Connection, files: list[CompiledPolicy]) -> PolicyTimeline:
    """The files' policies and those activated through the API, as one timeline, as this
    connection sees them (inside an activation's transaction: with it). Raises
    `rules.compiled.PolicyClash` when they cannot be in force together."""
    compiled = list(files)
    file_ids = {p.policy_id for p in compiled}
    rows = conn.execute(select(s.policies.c.policy_id, s.policies.c.document, s.policies.c.effective_from_us)
                        .where(s.policies.c.status == "activated")
                        .where(s.policies.c.origin == "api")).all()
    for policy_id, document, effective_from_us in rows:
        if policy_id in file_ids:
            continue
        doc = PolicyDocument.model_validate_json(document)
        compiled.append(compile_policy(doc, from_us(effective_from_us)))
    return PolicyTimeline(compiled)


def build(settings: Settings) -> Services:
    audit.configure(settings.audit_keyring)
    engine = make_engine(settings.database_url, pool_size=settings.db_pool_size,
                         statement_timeout_ms=settings.db_statement_timeout_ms,
                         connect_timeout_s=settings.db_connect_timeout_s, pool_timeout_s=settings.db_pool_timeout_s,
                         connection_max_age_s=settings.db_connection_max_age_s)
    read = reader(engine)
    programs = ProgramCache()
    keys = KeyVerifier(read, settings.key_pepper.get_secret_value())
    try:  # the database reads first: if it is down, nothing is left running (threads, Redis)
        with read.connect() as conn:
            files = load_files(conn, settings.policies_dir)
            timeline = timeline_in(conn, files)
        keys.warm()
        with engine.begin() as conn:  # keys just set on a log kept without them: keyed at its head now
            audit.keyed_head(conn, actor="eum service start")
    except BaseException:
        engine.dispose()
        raise
    book = Book(engine, timeline, programs, on_budget_event=metrics.budget_event, on_budget_cut=metrics.budget_cut)
    idempotency = IdempotencyCache.connect(settings.redis_url, settings.redis_prefix,
                                           settings.idempotency_cache_ttl_s,
                                           lookup=getattr(settings, "idempotency_lookup", "local"),
                                           timeout_s=settings.redis_timeout_ms / 1000,
                                           book=book_tag(engine) if settings.redis_url else "")

    def committed(commands, outcomes):
        metrics.count_payments(commands, outcomes)
        # New answers and replays the book answered alike: after a flush, a restart or on
        # another worker, a replay read from the book is cached again (this worker's table,
        # then Redis after the answers, as for new ones). The book's own JSON bytes
        # (`Outcome.raw`): no second serialisation.
        return idempotency.remember((c.kind, c.key, c.request_hash, o.raw if o.raw is not None else o.body)
                                    for c, o in zip(commands, outcomes) if o.error is None and c.kind != "expiry")

    if os.environ.get("EUM_GC_FREEZE") == "1":
        freeze_startup_heap()
    batcher = Batcher(book, batch_size_max=settings.batch_size_max, linger_us=settings.batch_linger_us,
                      queue_max=settings.batch_queue_max, on_batch=metrics.observe_batch, on_committed=committed,
                      after_answered=idempotency.publish, connection_max_age_s=settings.db_connection_max_age_s,
                      writers=settings.batch_writers)
    return Services(
        settings=settings, engine=engine, reader=read, book=book, batcher=batcher,
        keys=keys, programs=programs, idempotency=idempotency, files=files,
    )


def freeze_startup_heap() -> None:
    """A serving worker keeps what start-up built (modules, models, compiled policies)
    for its whole life: moved out of the cyclic collector's sight (`gc.freeze`), it is
    no longer traversed by every full collection. Measured before this: full
    collections of 100–430 ms in each worker, the tail (p99.9) of the constant-rate run
    (docs/performance.md). Set by `eum serve` (EUM_GC_FREEZE=1), not in tests."""
    gc.collect()
    gc.freeze()


def seoul_today() -> dt.date:
    return dt.datetime.now(dt.timezone(dt.timedelta(hours=9))).date()
