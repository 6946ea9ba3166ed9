"""API keys: one role each, stored only as a peppered hash, with expiry and revocation."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
import unicodedata
from dataclasses import dataclass

from sqlalchemy import Engine, select, update

from ledger import schema as s

ROLES = ("card-app", "policy-editor", "policy-approver", "finance", "auditor", "admin")
KEY_PREFIX = "eum_"
CACHE_ENTRIES_MAX = 10_000
CACHE_TTL_S = 5.0  # a revoked key stops working within this many seconds on every worker


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    name: str
    role: str

    @property
    def actor(self) -> str:
        return f"{self.name} ({self.key_id})"


def same_person(actor_a: str, actor_b: str) -> bool:
    """Maker-checker: two actors ("name (key_id)") are one person when they share the key
    *or* the name, so one person holding two keys cannot approve their own change. Names
    are compared as `person_name` gives them: a key issued to "alice" is Alice's, and so
    is one issued, before such names were refused (`name_problem`), to "alice" with a
    zero-width space (U+200B) inside, or to "ecila" after a right-to-left override
    (U+202E: shown as "alice")."""
    (name_a, key_a), (name_b, key_b) = _actor_parts(actor_a), _actor_parts(actor_b)
    return bool(_spellings(name_a) & _spellings(name_b)) or (key_a is not None and key_a == key_b)


def person_name(name: str) -> str:
    """A holder's name as one person is known by, whatever the case, width or spacing it
    was typed with at issue: NFKC, casefolded (NFKC again: casefolding can undo it), with
    every invisible character (Unicode format characters, category Cf: zero-width
    spaces and joiners, the soft hyphen, bidirectional controls; the other default-
    ignorable code points: the combining grapheme joiner, variation selectors, Hangul
    fillers) and other control character dropped, and every run of whitespace one space
    and none around."""
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())
    return " ".join("".join(c for c in folded if c.isspace() or not invisible(c)).split())


_INVISIBLE = frozenset(("Cf", "Cc"))
# Unicode's Default_Ignorable_Code_Point ranges (DerivedCoreProperties.txt) that are not
# Cf or Cc: shown as nothing, yet not format characters — the combining grapheme joiner,
# variation selectors, the Hangul fillers (a Korean keyboard types them), Mongolian free
# variation selectors, and the unassigned ranges kept ignorable.
_IGNORABLE_RANGES = ((0x034F, 0x034F), (0x115F, 0x1160), (0x17B4, 0x17B5), (0x180B, 0x180F), (0x3164, 0x3164),
                     (0xFE00, 0xFE0F), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0xE0000, 0xE0FFF))


def invisible(c: str) -> bool:
    """Whether a character shows as nothing: a control or format character (Cc, Cf), or
    another default-ignorable code point (`_IGNORABLE_RANGES`)."""
    if unicodedata.category(c) in _INVISIBLE:
        return True
    code = ord(c)
    return any(low <= code <= high for low, high in _IGNORABLE_RANGES)


_RLO, _PDF = "\u202e", "\u202c"


def _spellings(name: str) -> set[str]:
    """`person_name` of a name as stored and as shown: text after a right-to-left
    override (U+202E, up to its pop U+202C or the end) is shown reversed: U+202E "ecila"
    reads "alice"."""
    spellings = {person_name(name)}
    if _RLO in name:
        shown, rest = [], name
        while _RLO in rest:
            before, _, rest = rest.partition(_RLO)
            run, _, rest = rest.partition(_PDF)
            shown += [before, run[::-1]]
        spellings.add(person_name("".join(shown) + rest))
    return spellings


NAME_CHARS_MAX = 200


def name_problem(name: str, what: str = "a key's name") -> str | None:
    """Why `name` cannot be a key holder's name, or None. A name is how a person is shown
    and told apart in the second-person check and the audit log, so it may hold no
    control, format or bidirectional character (invisible, or text that reads other than
    it is stored: the rule of policy names, rules.document.NO_CONTROLS, widened to every
    Cf character and every other default-ignorable code point, `invisible`) and no line
    or paragraph separator, and must say something."""
    bad = sorted({c for c in name if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp") or invisible(c)})
    if bad:
        shown = ", ".join(f"U+{ord(c):04X} {unicodedata.name(c, unicodedata.category(c))}" for c in bad)
        return f"{what} may not hold control, invisible or bidirectional characters (found {shown})"
    if not person_name(name):
        return f"{what} must not be blank"
    if len(name) > NAME_CHARS_MAX:
        return f"{what} is at most {NAME_CHARS_MAX} characters"
    return None


def _actor_parts(actor: str) -> tuple[str, str | None]:
    """("name", "key_id") of "name (key_id)"; (actor, None) for a name alone (in-process loaders)."""
    if actor.endswith(")") and " (" in actor:
        name, _, key = actor[:-1].rpartition(" (")
        return name, key
    return actor, None


def hash_key(token: str, pepper: str) -> str:
    return hmac.new(pepper.encode(), token.encode(), hashlib.sha256).hexdigest()


def operator() -> str:
    """Who runs a command on this machine (the OS account), for the audit log: every
    command line entry's actor, whatever the command was told (a name it is run for is
    at most a detail, `on_behalf_of`)."""
    import getpass

    try:
        return f"{getpass.getuser()} (eum cli)"
    except Exception:  # noqa: BLE001 - no account name (a container without one)
        return "unknown (eum cli)"


def create_key(engine: Engine, *, name: str, role: str, pepper: str, expires_at_us: int | None = None,
               actor: str | None = None) -> tuple[str, str]:
    """Returns (key_id, token). The token is shown once; only its hash is stored. The
    issue is in the audit log (who issued which key, to which name, with which role):
    one person could otherwise issue a key under another name to approve their own change."""
    from ledger import audit

    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if (problem := name_problem(name)) is not None:
        raise ValueError(problem)
    key_id = secrets.token_hex(6)
    token = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    now = time.time_ns() // 1000
    with engine.begin() as conn:
        conn.execute(s.api_keys.insert().values(
            key_id=key_id, name=name, role=role, key_hash=hash_key(token, pepper),
            created_at_us=now, expires_at_us=expires_at_us, revoked_at_us=None))
        audit.append(conn, at_us=now, actor=actor or operator(), action="key.create", object_type="api_key",
                     object_id=key_id, detail={"name": name, "role": role, "expires_at_us": expires_at_us})
    return key_id, token


def revoke_key(engine: Engine, key_id: str, actor: str | None = None) -> bool:
    from ledger import audit

    now = time.time_ns() // 1000
    with engine.begin() as conn:
        done = conn.execute(update(s.api_keys).where((s.api_keys.c.key_id == key_id) & s.api_keys.c.revoked_at_us.is_(None))
                            .values(revoked_at_us=now))
        if done.rowcount == 1:
            audit.append(conn, at_us=now, actor=actor or operator(), action="key.revoke", object_type="api_key",
                         object_id=key_id, detail={})
    return done.rowcount == 1


def list_keys(engine: Engine) -> list[dict]:
    with engine.connect() as conn:
        rows = conn.execute(select(s.api_keys.c.key_id, s.api_keys.c.name, s.api_keys.c.role, s.api_keys.c.created_at_us,
                                   s.api_keys.c.expires_at_us, s.api_keys.c.revoked_at_us).order_by(s.api_keys.c.created_at_us))
        return [dict(r._mapping) for r in rows]


class KeyVerifier:
    def __init__(self, engine: Engine, pepper: str):
        self._engine = engine
        self._pepper = pepper
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._lock = threading.Lock()

    def cached(self, token: str) -> tuple[bool, Principal | None]:
        """(known, principal) from the cache alone: no I/O, safe on the event loop."""
        if not token.startswith(KEY_PREFIX) or len(token) > 200:
            return True, None
        hit = self._cache.get(hash_key(token, self._pepper))
        if hit is not None and hit[0] > time.monotonic():
            return True, hit[1]
        return False, None

    def verify(self, token: str) -> Principal | None:
        if not token.startswith(KEY_PREFIX) or len(token) > 200:
            return None
        digest = hash_key(token, self._pepper)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        principal = self._lookup(digest)
        with self._lock:
            if len(self._cache) > CACHE_ENTRIES_MAX:  # unknown tokens first: a flood of them must not
                self._cache = {d: hit for d, hit in self._cache.items()  # push out the keys in use
                               if hit[1] is not None and hit[0] > now}
                if len(self._cache) > CACHE_ENTRIES_MAX:
                    self._cache.clear()
            self._cache[digest] = (now + CACHE_TTL_S, principal)
        return principal

    def warm(self) -> int:
        """Every key in use, read into the cache in one query at start-up, so that a new
        worker's first requests do not each read the database for the same key (under a
        loaded machine that burst took over a second: 503s right after a restart).
        Returns how many keys were cached."""
        t = s.api_keys
        now = time.monotonic()
        with self._engine.connect() as conn:
            rows = conn.execute(select(t).where(t.c.revoked_at_us.is_(None))).all()
        in_use = {row.key_hash: p for row in rows if (p := self._principal(row)) is not None}  # not expired
        with self._lock:
            for digest, principal in in_use.items():
                self._cache[digest] = (now + CACHE_TTL_S, principal)
        return len(in_use)

    def _lookup(self, digest: str) -> Principal | None:
        t = s.api_keys
        with self._engine.connect() as conn:
            row = conn.execute(select(t).where(t.c.key_hash == digest)).first()
        return None if row is None else self._principal(row)

    @staticmethod
    def _principal(row) -> Principal | None:
        if row.revoked_at_us is not None:
            return None
        if row.expires_at_us is not None and row.expires_at_us <= time.time_ns() // 1000:
            return None
        return Principal(row.key_id, row.name, row.role)
