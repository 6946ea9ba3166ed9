"""The append-only audit log, each entry chained to the previous one by hash.

Two kinds of link, named by the entry's `chain` column (migration 0011):

- legacy (`chain` NULL, entries written before 0011):
  entry_hash = sha256(prev_hash | at_us | actor | action | object_type | object_id | detail)
- `v2` and `v2:<key id>`: the same fields and the chain name, each prefixed by its
  length (so no field can borrow another's bytes), hashed with sha256, or, where a key
  is configured (`EUM_AUDIT_KEYS`), with HMAC-SHA256 under that key. Without the key,
  someone who can write the database cannot forge a keyed link.

A verifier recomputes the chain; an edited, removed or reordered entry breaks it, and so
does a link weaker than one before it (an unkeyed entry after a keyed one, a legacy
entry after a v2 one), which is what a forger without the key would have to write; a
writer without the key refuses to append after a keyed entry. With keys, the verifier
also wants the newest entry keyed (else the whole log could have been rewritten in the
weaker kinds). A tail cut off is seen only against a head kept elsewhere.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from dataclasses import dataclass, field

import orjson
from sqlalchemy import Connection, select

from ledger import schema as s
from ledger.errors import EumError

GENESIS = "0" * 64
AUDIT_LOCK_KEY = 7_301_001  # PostgreSQL advisory lock: one appender at a time
V2 = "v2"
_KEY_ID = re.compile(r"^[A-Za-z0-9._-]{1,32}$")
KEY_MIN_CHARS = 16


@dataclass(frozen=True)
class Keyring:
    """Audit keys by id. The first key of `EUM_AUDIT_KEYS` signs new entries; all of
    them verify, so a rotated-out key stays listed after the new one."""
    keys: dict[str, bytes] = field(default_factory=dict)
    signing: str | None = None

    @classmethod
    def parse(cls, text: str | None) -> "Keyring":
        """`id:secret[,id:secret...]`; raises ValueError saying what is wrong (never the secret)."""
        if not text or not text.strip():
            return cls()
        keys: dict[str, bytes] = {}
        for n, item in enumerate(text.split(","), 1):
            key_id, sep, secret = item.strip().partition(":")
            if not sep or not _KEY_ID.match(key_id):
                raise ValueError(f"audit key {n}: write it as id:secret, the id of 1-32 letters, digits, . _ -")
            if len(secret) < KEY_MIN_CHARS:
                raise ValueError(f"audit key {key_id!r}: the secret must be at least {KEY_MIN_CHARS} characters")
            if key_id in keys:
                raise ValueError(f"audit key {key_id!r} is listed twice")
            keys[key_id] = secret.encode()
        return cls(keys, next(iter(keys)))


_UNSET = object()
_configured: Keyring | object = _UNSET


def configure(keyring: Keyring) -> None:
    """Set the keys this process signs and verifies with (the service and CLI do, from
    their settings); a process that does not reads `EUM_AUDIT_KEYS` on its first append."""
    global _configured
    _configured = keyring


def current_keyring() -> Keyring:
    global _configured
    if _configured is _UNSET:
        from eum.settings import get_settings

        _configured = get_settings().audit_keyring
    return _configured  # type: ignore[return-value]


def _legacy_digest(prev: str, at_us: int, actor: str, action: str, object_type: str, object_id: str,
                   detail: str) -> str:
    text = "|".join((prev, str(at_us), actor, action, object_type, object_id, detail))
    return hashlib.sha256(text.encode()).hexdigest()


def _v2_digest(chain: str, secret: bytes | None, prev: str, at_us: int, actor: str, action: str, object_type: str,
               object_id: str, detail: str) -> str:
    message = b"".join(len(b).to_bytes(4, "big") + b for b in (
        x.encode() for x in ("eum-audit", chain, prev, str(at_us), actor, action, object_type, object_id, detail)))
    if secret is None:
        return hashlib.sha256(message).hexdigest()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def append(conn: Connection, *, at_us: int, actor: str, action: str, object_type: str, object_id: str,
           detail: dict) -> str:
    return append_many(conn, [{"at_us": at_us, "actor": actor, "action": action, "object_type": object_type,
                               "object_id": object_id, "detail": detail}])[-1]


def append_many(conn: Connection, entries: list[dict]) -> list[str]:
    """`append` for each entry (dicts of its keyword arguments), in order: one lock, one
    read of the head and one insert for all of them. The writers of money append after
    the rows their transaction locks (the log's lock last, as every appender takes it),
    so no appender waits for the log while holding what a writer wants next."""
    assert entries
    keyring = current_keyring()
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({AUDIT_LOCK_KEY})")
    t = s.audit_log
    last = conn.execute(select(t.c.entry_hash, t.c.chain).order_by(t.c.entry_id.desc()).limit(1)).first()
    prev = last.entry_hash if last is not None else GENESIS
    if keyring.signing is None:
        _refuse_unkeyed(last.chain if last is not None else None)
        chain, secret = V2, None
    else:
        chain, secret = f"{V2}:{keyring.signing}", keyring.keys[keyring.signing]
    rows, hashes = [], []
    for entry in entries:
        text = orjson.dumps(entry["detail"], option=orjson.OPT_SORT_KEYS).decode()
        entry_hash = _v2_digest(chain, secret, prev, entry["at_us"], entry["actor"], entry["action"],
                                entry["object_type"], entry["object_id"], text)
        rows.append({"at_us": entry["at_us"], "actor": entry["actor"], "action": entry["action"],
                     "object_type": entry["object_type"], "object_id": entry["object_id"], "detail": text,
                     "prev_hash": prev, "entry_hash": entry_hash, "chain": chain})
        hashes.append(entry_hash)
        prev = entry_hash
    conn.execute(t.insert(), rows)  # in order: entry ids ascend as the links do
    return hashes


def _refuse_unkeyed(last_chain: str | None) -> None:
    if _strength(last_chain) == 2:
        # An unkeyed link after a keyed one breaks the chain for good: refuse the change.
        raise UnkeyedAppend("the audit log is keyed and this process has no EUM_AUDIT_KEYS: set them (as the "
                            "service has them) and run the command again; nothing was changed")


def check_appendable(conn: Connection) -> None:
    """Raise `UnkeyedAppend` where `append` would now. A job whose money moves over
    several transactions, with its entry written after them (a bulk disbursement, an
    expiry), calls it before the first, so that it never moves money it cannot record."""
    if current_keyring().signing is None:
        t = s.audit_log
        _refuse_unkeyed(conn.execute(select(t.c.chain).order_by(t.c.entry_id.desc()).limit(1)).scalar())


def keyed_head(conn: Connection, actor: str) -> bool:
    """With a signing key set and the newest entry not keyed (keys just set on a log kept
    without them), append one entry saying which key signs from here: the chain is then
    keyed at its head at once, which a verifier holding the keys wants. Run at service
    start; returns whether it appended."""
    keyring = current_keyring()
    if keyring.signing is None:
        return False
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({AUDIT_LOCK_KEY})")  # one worker appends it
    t = s.audit_log
    last = conn.execute(select(t.c.chain).order_by(t.c.entry_id.desc()).limit(1)).first()
    if last is None or _strength(last.chain) == 2:
        return False
    append(conn, at_us=time.time_ns() // 1000, actor=actor, action="audit.keyed", object_type="audit_log",
           object_id=keyring.signing, detail={"key_id": keyring.signing})
    return True


class UnkeyedAppend(EumError):
    """An entry would be written without a key after keyed ones."""

    status, code, title = 500, "audit_key_missing", "This process cannot sign the audit log"


@dataclass(frozen=True)
class ChainReport:
    entries: int
    broken_at: int | None
    reason: str = ""
    head: str = ""  # the last entry's hash: kept elsewhere, it shows later that no tail was cut off
    legacy: int = 0  # entries by kind of link
    unkeyed: int = 0
    keyed: int = 0
    keyed_from: int | None = None  # the first keyed entry: kept with the head, it shows a chain rewritten unkeyed

    @property
    def ok(self) -> bool:
        return self.broken_at is None


def _strength(chain: str | None) -> int:
    return 0 if chain is None else 1 if chain == V2 else 2


def verify(conn: Connection, expect_head: str | None = None, keyring: Keyring | None = None) -> ChainReport:
    """Recompute the chain. A chain checks every entry against the one before it, but
    not that entries were cut off its end: `expect_head`, a head kept from an earlier
    verify, must still be an entry of the chain. Keyed entries need their key in
    `keyring` (this process's keys by default)."""
    keyring = current_keyring() if keyring is None else keyring
    t = s.audit_log
    prev = GENESIS
    count = last_id = 0
    counts = [0, 0, 0]
    keyed_from = None
    strongest = 0
    seen = expect_head is None

    def broken(entry_id: int, reason: str) -> ChainReport:
        return ChainReport(count, entry_id, reason, "", *counts, keyed_from)

    for row in conn.execute(select(t).order_by(t.c.entry_id)):
        count += 1
        last_id = row.entry_id
        if row.prev_hash != prev:
            return broken(row.entry_id, "prev_hash does not match the previous entry")
        strength = _strength(row.chain)
        if strength < strongest:
            return broken(row.entry_id, f"a {'legacy' if strength == 0 else 'unkeyed'} link after a stronger one: "
                                        "an entry written without the log's key")
        strongest = strength
        if row.chain is None:
            expected = _legacy_digest(prev, row.at_us, row.actor, row.action, row.object_type, row.object_id,
                                      row.detail)
        elif row.chain == V2:
            expected = _v2_digest(V2, None, prev, row.at_us, row.actor, row.action, row.object_type, row.object_id,
                                  row.detail)
        else:
            version, _, key_id = row.chain.partition(":")
            secret = keyring.keys.get(key_id) if version == V2 else None
            if secret is None:
                return broken(row.entry_id, f"signed as {row.chain!r}: this verifier does not hold that key "
                                            "(EUM_AUDIT_KEYS)")
            expected = _v2_digest(row.chain, secret, prev, row.at_us, row.actor, row.action, row.object_type,
                                  row.object_id, row.detail)
            if keyed_from is None:
                keyed_from = row.entry_id
        if not hmac.compare_digest(row.entry_hash, expected):
            return broken(row.entry_id, "entry content does not match its hash")
        counts[strength] += 1
        prev = row.entry_hash
        seen = seen or prev == expect_head
    if not seen:
        return ChainReport(count, last_id + 1, f"no entry has the expected head {expect_head}: entries were cut "
                                               "off the end of the log, or the chain was rewritten", prev, *counts,
                           keyed_from)
    if keyring.signing is not None and count and strongest < 2:
        # With the keys in hand a chain whose newest entry is not keyed is suspect: the whole
        # log rewritten in the weaker kinds would pass every link check above.
        return ChainReport(count, last_id, "the newest entry is not keyed although keys are set: the log was "
                                           "rewritten without the key, or the service has not started with the "
                                           "keys yet (its start signs an audit.keyed entry)", prev, *counts,
                           keyed_from)
    return ChainReport(count, None, head=prev, legacy=counts[0], unkeyed=counts[1], keyed=counts[2],
                       keyed_from=keyed_from)
