"""API keys: one role each, stored only as a peppered hash, with expiry and revocation."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass

import structlog
from sqlalchemy import Engine, select, update

from ledger import confusables, schema as s

ROLES = ("card-app", "policy-editor", "policy-approver", "finance", "auditor", "admin")
log = structlog.get_logger("ledger.keys")
KEY_PREFIX = "eum_"
CACHE_ENTRIES_MAX = 10_000
CACHE_TTL_S = 5.0  # a revoked key stops working within this many seconds on every worker
# While the database cannot be read, a key read valid within this many seconds is still
# honoured (`KeyVerifier.verify`), and read again by a request at most every CACHE_TTL_S
# (the start-up's refresher, `api.auth.keep_keys_warm`, tries every CACHE_TTL_S / 2). Only
# what needs no database can be served meanwhile (a resend answered from the replay
# table, a probe); a revocation cannot be recorded while the book is down.
STALE_MAX_S = 300.0


def database_unreachable(error: BaseException) -> bool:
    """`ledger.db.database_trouble` less what a database that is up answers: a pool
    checkout that timed out (the worker's connections are busy, not the database gone)
    and a statement or lock timeout (the server answered, cancelling it)."""
    import psycopg
    from sqlalchemy import exc as sa

    from ledger.db import database_trouble

    if not database_trouble(error) or isinstance(error, sa.TimeoutError):
        return False
    orig = getattr(error, "orig", None) or error
    return not isinstance(orig, (psycopg.errors.QueryCanceled, psycopg.errors.LockNotAvailable))


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
    (U+202E: shown as "alice"). They are compared by their look too (`skeleton`): a key
    issued to "Mallory" with a Cyrillic "М" and "а", or to an all-Cyrillic "аррӏе", is
    Mallory's or Apple's, and one issued to "Kim Min‐jun" with U+2010 HYPHEN (or an en
    dash, a minus sign) is Kim Min-jun's. The look-alikes known are Latin, Greek and
    Cyrillic letters, the digits 0 and 1, and what reads as a hyphen, an apostrophe, a
    full stop or a comma (`ledger.confusables`); others (Armenian "օ", Cherokee "Ꮇ") are
    not, and the comparison is coarse the other way: "Ian" and "lan", "Kim" and "Kirn"
    ("Kim" and "Klm": an "i" of any case reads as "l") are one person, so a third
    person approves. Whitespace is no part of a name as compared: "김 민준" (a space
    between surname and given name, as forms write it) is 김민준, and so "Alice Kim" is
    "AliceKim" (a false match only asks for another approver)."""
    (name_a, key_a), (name_b, key_b) = _actor_parts(actor_a), _actor_parts(actor_b)
    return (bool(_spellings(name_a) & _spellings(name_b)) or bool(_skeletons(name_a) & _skeletons(name_b))
            or (key_a is not None and key_a == key_b))


def person_name(name: str) -> str:
    """A holder's name as one person is known by, whatever the case, width or spacing it
    was typed with at issue: NFKC, casefolded (NFKC again: casefolding can undo it), with
    every invisible character (Unicode format characters, category Cf: zero-width
    spaces and joiners, the soft hyphen, bidirectional controls; the other default-
    ignorable code points: the combining grapheme joiner, variation selectors, Hangul
    fillers; graphic characters drawn blank) and other control character dropped, and
    all whitespace removed (made one space, "김 민준" was another person than 김민준)."""
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())
    return "".join(c for c in folded if not c.isspace() and not invisible(c))


_INVISIBLE = frozenset(("Cf", "Cc"))
# Unicode's Default_Ignorable_Code_Point ranges (DerivedCoreProperties.txt) that are not
# Cf or Cc: shown as nothing, yet not format characters — the combining grapheme joiner,
# variation selectors, the Hangul fillers (a Korean keyboard types them), Mongolian free
# variation selectors, and the unassigned ranges kept ignorable.
_IGNORABLE_RANGES = ((0x034F, 0x034F), (0x115F, 0x1160), (0x17B4, 0x17B5), (0x180B, 0x180F), (0x3164, 0x3164),
                     (0xFE00, 0xFE0F), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0xE0000, 0xE0FFF),
                     # Not default-ignorable, yet drawn as nothing: graphic characters a blank
                     # glyph stands for, the Braille pattern blank (So), the Khitan small
                     # script filler (Mn) and the musical null notehead (So): "alice" + U+2800
                     # read "alice" (the security audit), and + U+1D159 (its review).
                     (0x2800, 0x2800), (0x16FE4, 0x16FE4), (0x1D159, 0x1D159))


def invisible(c: str) -> bool:
    """Whether a character shows as nothing: a control or format character (Cc, Cf),
    another default-ignorable code point, or a graphic character drawn blank
    (`_IGNORABLE_RANGES`)."""
    if unicodedata.category(c) in _INVISIBLE:
        return True
    code = ord(c)
    return any(low <= code <= high for low, high in _IGNORABLE_RANGES)


_RLO, _PDF = "\u202e", "\u202c"


def _shown(name: str) -> list[str]:
    """A name as stored and as shown: text after a right-to-left override (U+202E, up to
    its pop U+202C or the end) is shown reversed: U+202E "ecila" reads "alice"."""
    if _RLO not in name:
        return [name]
    shown, rest = [], name
    while _RLO in rest:
        before, _, rest = rest.partition(_RLO)
        run, _, rest = rest.partition(_PDF)
        shown += [before, run[::-1]]
    return [name, "".join(shown) + rest]


def _spellings(name: str) -> set[str]:
    """`person_name` of a name as stored and as shown (`_shown`)."""
    return {person_name(spelling) for spelling in _shown(name)}


_LOOKS = {**confusables.TABLE, **confusables.PUNCTUATION}


def skeleton(name: str, table: dict[str, str] = _LOOKS) -> str:
    """What a name looks like, whatever letters it is typed with: UTS #39's skeleton, made
    blind to case. The name as `person_name` takes it, before casefolding (NFKC, invisible
    characters and whitespace dropped), is decomposed (NFD) and each
    character replaced by its confusable prototype (`ledger.confusables.TABLE`: Latin,
    Greek and Cyrillic letters, the digits 0 and 1; `PUNCTUATION`: what reads as a
    hyphen, an apostrophe, a full stop or a comma); then casefolded and mapped again,
    since a look-alike of a capital ("М") casefolds to a letter that is no look-alike of
    the small one ("м" beside "m"). "Mallory" typed with a Cyrillic "М" and "а", "MALLORY"
    and "mallory" are all "rnallory"; "아름" and "Arum" stay apart. Last, "i" is read as
    "l": the prototype of a capital "I" (Latin, Greek "Ι", Cyrillic "І") is "l" while a
    small "i" is its own, so without it no skeleton was blind to the case of an "i", and
    "TEST POLICY‐EDITOR" (capitals and U+2010 HYPHEN: neither spelling nor look matched)
    approved test policy-editor's draft (the policy-workflow audit). So "Min‐jun" with
    U+2010 HYPHEN, "MIN-JUN" and an all-Greek "ΜΙΝ-JUN" are all "rnln-jun"."""
    shown = "".join(c for c in unicodedata.normalize("NFKC", name) if not c.isspace() and not invisible(c))
    once = _prototypes(shown, table)
    return _prototypes(unicodedata.normalize("NFKC", once.casefold()), table).replace("i", "l")


_READ_ALSO = {**_LOOKS, **confusables.ALSO_READ}


def _prototypes(text: str, table: dict[str, str]) -> str:
    return unicodedata.normalize("NFD", "".join(table.get(c, c) for c in unicodedata.normalize("NFD", text)))


def _skeletons(name: str) -> set[str]:
    """`skeleton` of a name as stored and as shown (`_shown`), each also with the letters
    `ledger.confusables.ALSO_READ` names read the other way (Cyrillic "ӏ" as "l")."""
    return {skeleton(spelling, table) for spelling in _shown(name) for table in (_LOOKS, _READ_ALSO)}


NAME_CHARS_MAX = 200


def name_problem(name: str, what: str = "a key's name") -> str | None:
    """Why `name` cannot be a key holder's name, or None. A name is how a person is shown
    and told apart in the second-person check and the audit log, so it may hold no
    control, format or bidirectional character (invisible, or text that reads other than
    it is stored: the rule of policy names, rules.document.NO_CONTROLS, widened to every
    Cf character and every other default-ignorable code point, `invisible`) and no line
    or paragraph separator, and must say something. No word of it may mix Latin, Greek
    and Cyrillic letters (`lookalike_script`): "Mallory" typed with a Cyrillic "М" and
    "а" reads "Mallory" and is not the same text. A word in one script is allowed,
    whichever (Korean names in Hangul, "Kim 민준", "Иван"): a whole-script look-alike of
    another's name is caught where it matters, by `same_person`."""
    bad = sorted({c for c in name if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp") or invisible(c)})
    if bad:
        shown = ", ".join(f"U+{ord(c):04X} {unicodedata.name(c, unicodedata.category(c))}" for c in bad)
        return f"{what} may not hold control, invisible or bidirectional characters (found {shown})"
    if not person_name(name):
        return f"{what} must not be blank"
    if len(name) > NAME_CHARS_MAX:
        return f"{what} is at most {NAME_CHARS_MAX} characters"
    for word in unicodedata.normalize("NFKC", name).split():
        if len(scripts := Counter(script for c in word if (script := lookalike_script(c)) is not None)) > 1:
            most = scripts.most_common(1)[0][0]
            odd = ", ".join(f"U+{ord(c):04X} {unicodedata.name(c)}"
                            for c in dict.fromkeys(c for c in word if lookalike_script(c) not in (None, most)))
            return (f"{what} may not mix Latin, Greek and Cyrillic letters in one word, which can make it read as "
                    f"another name (found {word!r}: {odd} among {most} letters); write each word in one script")
    return None


LOOKALIKE_SCRIPTS = ("Latin", "Greek", "Cyrillic")


def lookalike_script(c: str) -> str | None:
    """The script of a Latin, Greek or Cyrillic letter, read from its Unicode name ("LATIN
    SMALL LETTER A", "CYRILLIC SMALL LETTER A"); None for anything else (a digit, a
    hyphen, Hangul). Whole scripts whose letters look alike: one word mixing them is how
    "Mallory" is typed with a Cyrillic "М" and "а"."""
    name = unicodedata.name(c, "")
    return next((script for script in LOOKALIKE_SCRIPTS if name.startswith(script.upper() + " ")), None)


def _actor_parts(actor: str) -> tuple[str, str | None]:
    """("name", "key_id") of "name (key_id)"; (actor, None) for a name alone (in-process loaders)."""
    if actor.endswith(")") and " (" in actor:
        name, _, key = actor[:-1].rpartition(" (")
        return name, key
    return actor, None


def refuse_if_author_revoked(conn, author: str, what: str) -> None:
    """Maker-checker's other half: a change made with a key revoked since is not
    approved (`AuthorKeyRevoked`, 409). An author with no key (a name alone, or a command
    line's OS account) is not refused."""
    from ledger.errors import AuthorKeyRevoked

    _, key_id = _actor_parts(author)
    if key_id is None:
        return
    revoked = conn.execute(select(s.api_keys.c.revoked_at_us).where(s.api_keys.c.key_id == key_id)).scalar()
    if revoked is not None:
        raise AuthorKeyRevoked(f"{what} was made with key {key_id}, revoked since ({author!r}): it is not approved; "
                               "make it again under a live key")


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
                            .values(revoked_at_us=now).returning(s.api_keys.c.name, s.api_keys.c.role)).first()
        if done is not None:
            # whose key and which role, so the log tells what stopped (it said {})
            audit.append(conn, at_us=now, actor=actor or operator(), action="key.revoke", object_type="api_key",
                         object_id=key_id, detail={"name": done.name, "role": done.role})
    return done is not None


def list_keys(engine: Engine) -> list[dict]:
    with engine.connect() as conn:
        rows = conn.execute(select(s.api_keys.c.key_id, s.api_keys.c.name, s.api_keys.c.role, s.api_keys.c.created_at_us,
                                   s.api_keys.c.expires_at_us, s.api_keys.c.revoked_at_us).order_by(s.api_keys.c.created_at_us))
        return [dict(r._mapping) for r in rows]


def _cached_until(now: float, expires_at_us: int | None) -> float:
    """When a cache entry read at `now` (monotonic) lapses: after CACHE_TTL_S, or at the
    key's expiry if that comes first. A revocation is known only by reading again; an
    expiry is known at the read, and an entry kept its full 5 s past it: a key expiring
    at 12:00:00 was still honoured at 12:00:04 (the security audit)."""
    if expires_at_us is None:
        return now + CACHE_TTL_S
    return now + min(CACHE_TTL_S, (expires_at_us - time.time_ns() // 1000) / 1e6)


class KeyVerifier:
    def __init__(self, engine: Engine, pepper: str):
        self._engine = engine
        self._pepper = pepper
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        # The keys read valid, as last read: digest -> (when that read began, monotonic;
        # the principal, None once read revoked or expired; its expiry, µs since the
        # epoch, or None), for a read the database cannot answer (`_stale`).
        self._good: dict[str, tuple[float, Principal | None, int | None]] = {}
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
        try:
            principal, expires_at_us = self._lookup(digest)
        except Exception as error:  # a key in use outlives a database outage (`_stale`)
            principal = self._stale(digest, now, error)
            good = self._good.get(digest) if principal is not None else None
            expires_at_us = good[2] if good is not None else None
            with self._lock:  # not read again by a request for CACHE_TTL_S: a down database may take seconds to say so
                self._cache[digest] = (_cached_until(time.monotonic(), expires_at_us), principal)
            return principal
        with self._lock:
            if len(self._cache) > CACHE_ENTRIES_MAX:  # unknown tokens first: a flood of them must not
                self._cache = {d: hit for d, hit in self._cache.items()  # push out the keys in use
                               if hit[1] is not None and hit[0] > now}
                if len(self._cache) > CACHE_ENTRIES_MAX:
                    self._cache.clear()
            self._cache[digest] = (_cached_until(now, expires_at_us), principal)
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
        in_use = {row.key_hash: (p, row.expires_at_us) for row in rows
                  if (p := self._principal(row)) is not None}  # not expired
        with self._lock:
            for digest, (principal, expires_at_us) in in_use.items():
                self._cache[digest] = (_cached_until(now, expires_at_us), principal)
            for digest in [d for d in self._good if d not in in_use]:  # revoked or expired since
                self._remember(digest, now, None, None)
            for digest, (principal, expires_at_us) in in_use.items():
                self._remember(digest, now, principal, expires_at_us)
        return len(in_use)

    def _lookup(self, digest: str) -> tuple[Principal | None, int | None]:
        """The key's principal (None: unknown, revoked or expired) and its expiry."""
        t = s.api_keys
        read_at = time.monotonic()
        with self._engine.connect() as conn:
            row = conn.execute(select(t).where(t.c.key_hash == digest)).first()
        principal = None if row is None else self._principal(row)
        with self._lock:
            if principal is not None or digest in self._good:  # an unknown token leaves no trace
                self._remember(digest, read_at, principal, None if row is None else row.expires_at_us)
        return principal, None if row is None else row.expires_at_us

    def _remember(self, digest: str, read_at: float, principal: Principal | None, expires_at_us: int | None) -> None:
        """What a read that started at `read_at` found of a key (None: not valid), unless
        a read that started later has said already: the refresher's read of every key,
        begun before a revocation and applied after a request's read found the key
        revoked, put it back as valid for an outage. Called with `_lock` held."""
        last = self._good.get(digest)
        if last is not None and last[0] > read_at:
            return
        if last is None and len(self._good) >= CACHE_ENTRIES_MAX:  # keys in use are far fewer: drop the oldest
            self._good = dict(sorted(self._good.items(), key=lambda kv: kv[1][0])[CACHE_ENTRIES_MAX // 2:])
        self._good[digest] = (read_at, principal, expires_at_us)

    def _stale(self, digest: str, now: float, error: Exception) -> Principal | None:
        """The principal a key had when last read valid, for a read that could not reach
        the database (`database_unreachable`): honoured up to STALE_MAX_S after that
        read and not past the key's expiry. Anything else, or a key never read valid
        here (an unknown token, a new key), raises the error: it cannot be judged. A
        database that is up but busy (this worker's pool had no connection free in time,
        a statement or lock timeout) is no outage: a revocation may be recorded there
        meanwhile, and the key's requests still reach the book."""
        good = self._good.get(digest)
        if not database_unreachable(error) or good is None or good[1] is None or now - good[0] > STALE_MAX_S \
                or (good[2] is not None and good[2] <= time.time_ns() // 1000):
            raise error
        log.warning("keys.served_from_last_read", key_id=good[1].key_id, read_s_ago=round(now - good[0], 1),
                    error=type(error).__name__)
        return good[1]

    @staticmethod
    def _principal(row) -> Principal | None:
        if row.revoked_at_us is not None:
            return None
        if row.expires_at_us is not None and row.expires_at_us <= time.time_ns() // 1000:
            return None
        return Principal(row.key_id, row.name, row.role)
