"""The append-only audit log, each entry chained to the previous one by hash.

entry_hash = sha256(prev_hash | at_us | actor | action | object_type | object_id | detail)
A verifier recomputes the chain; an edited, removed or reordered entry breaks it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import orjson
from sqlalchemy import Connection, select

from ledger import schema as s

GENESIS = "0" * 64
AUDIT_LOCK_KEY = 7_301_001  # PostgreSQL advisory lock: one appender at a time


def _digest(prev: str, at_us: int, actor: str, action: str, object_type: str, object_id: str, detail: str) -> str:
    text = "|".join((prev, str(at_us), actor, action, object_type, object_id, detail))
    return hashlib.sha256(text.encode()).hexdigest()


def append(conn: Connection, *, at_us: int, actor: str, action: str, object_type: str, object_id: str,
           detail: dict) -> str:
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({AUDIT_LOCK_KEY})")
    t = s.audit_log
    prev = conn.execute(select(t.c.entry_hash).order_by(t.c.entry_id.desc()).limit(1)).scalar_one_or_none() or GENESIS
    text = orjson.dumps(detail, option=orjson.OPT_SORT_KEYS).decode()
    entry_hash = _digest(prev, at_us, actor, action, object_type, object_id, text)
    conn.execute(t.insert().values(at_us=at_us, actor=actor, action=action, object_type=object_type,
                                   object_id=object_id, detail=text, prev_hash=prev, entry_hash=entry_hash))
    return entry_hash


@dataclass(frozen=True)
class ChainReport:
    entries: int
    broken_at: int | None
    reason: str = ""
    head: str = ""  # the last entry's hash: kept elsewhere, it shows later that no tail was cut off

    @property
    def ok(self) -> bool:
        return self.broken_at is None


def verify(conn: Connection, expect_head: str | None = None) -> ChainReport:
    """Recompute the chain. A chain checks every entry against the one before it, but
    not that entries were cut off its end: `expect_head`, a head kept from an earlier
    verify, must still be an entry of the chain."""
    t = s.audit_log
    prev = GENESIS
    count = last_id = 0
    seen = expect_head is None
    for row in conn.execute(select(t).order_by(t.c.entry_id)):
        count += 1
        last_id = row.entry_id
        if row.prev_hash != prev:
            return ChainReport(count, row.entry_id, "prev_hash does not match the previous entry")
        expected = _digest(prev, row.at_us, row.actor, row.action, row.object_type, row.object_id, row.detail)
        if row.entry_hash != expected:
            return ChainReport(count, row.entry_id, "entry content does not match its hash")
        prev = row.entry_hash
        seen = seen or prev == expect_head
    if not seen:
        return ChainReport(count, last_id + 1, f"no entry has the expected head {expect_head}: entries were cut "
                                               "off the end of the log, or the chain was rewritten", prev)
    return ChainReport(count, None, head=prev)
