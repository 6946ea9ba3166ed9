"""Settings from the environment (prefix EUM_), through pydantic-settings."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SECRET = "dev-only-not-a-secret"
# PostgreSQL's statement_timeout and lock_timeout are int milliseconds: a larger value fails
# every connection, so the workers waited for the book for ever (operations audit)
PG_TIMEOUT_MS_MAX = 2_147_483_647
# What SQLAlchemy's SQLite driver takes from a URL's query without uri=true (the rest it drops)
SQLITE_DRIVER_ARGS = frozenset(("uri", "timeout", "isolation_level", "detect_types", "check_same_thread",
                                "cached_statements"))
# Per API key, by its role: (requests a second, burst). The card app's backend is one key
# carrying every payment, so it is high; staff tools are people and scripts (api/ratelimit.py).
RateLimit = tuple[Annotated[float, Field(gt=0, le=1_000_000)], Annotated[int, Field(ge=1, le=10_000_000)]]
DEFAULT_RATE_LIMITS: dict[str, tuple[float, int]] = {
    "card-app": (10_000.0, 20_000), "admin": (200.0, 2_000), "policy-editor": (100.0, 1_000),
    "policy-approver": (20.0, 200), "finance": (50.0, 500), "auditor": (20.0, 200),
}


class Settings(BaseSettings):
    # hide_input_in_errors: a bad secret (EUM_AUDIT_KEYS, EUM_KEY_PEPPER) is never echoed in an error
    model_config = SettingsConfigDict(env_prefix="EUM_", env_file=".env", extra="ignore", hide_input_in_errors=True)

    environment: Literal["development", "test", "production"] = "development"
    database_url: str = Field(
        f"sqlite:///{REPO_ROOT / 'var' / 'eum.db'}",
        description="SQLAlchemy URL; SQLite (WAL) when unset, postgresql+psycopg://... in production",
    )
    redis_url: str | None = Field(None, description="redis://host:port/db; unset: no Redis")
    redis_prefix: str = "eum:"
    policies_dir: Path = REPO_ROOT / "policies"
    # Pepper mixed into API-key hashes; production refuses the default.
    key_pepper: SecretStr = SecretStr(DEFAULT_SECRET)
    # Keys for the audit log's HMAC links, "id:secret[,id:secret...]": the first signs new
    # entries, all verify (ledger/audit.py). Unset: unkeyed links; production refuses that.
    audit_keys: SecretStr | None = None
    # A bearer token Prometheus must send for /metrics; unset: /metrics is open.
    metrics_token: SecretStr | None = None

    batch_size_max: int = Field(256, ge=1, le=10_000)
    batch_linger_us: int = Field(2_000, ge=0, le=50_000,
                                 description="a writer waits this long (or for a full batch) before writing a batch")
    batch_queue_max: int = Field(20_000, ge=1, description="pending commands per worker (queued or waiting for a held member) before 503")
    batch_writers: int = Field(1, ge=1, le=16, description="writer threads per worker (api/batcher.py)")
    request_timeout_ms: int = Field(5_000, ge=10, le=60_000)
    db_pool_size: int = Field(4, ge=1, le=64)
    db_statement_timeout_ms: int = Field(5_000, ge=10, le=PG_TIMEOUT_MS_MAX,
                                         description="server-side bound on a statement and a lock wait")
    db_connect_timeout_s: int = Field(3, ge=2, le=60, description="bound on opening a database connection (libpq "
                                                                 "treats less than 2 as 2)")
    db_pool_timeout_s: float = Field(5.0, gt=0, le=60, description="bound on waiting for a pooled connection")
    db_connection_max_age_s: int = Field(600, ge=1, le=86_400,
                                         description="a database connection is replaced after this long (the pool's "
                                                     "and the writers' kept ones): plans PostgreSQL keeps per "
                                                     "connection are made again")
    redis_timeout_ms: int = Field(50, ge=1, le=10_000, description="bound on every Redis call (connect and "
                                                                    "read); after a failure Redis is skipped a few s")
    request_body_bytes_max: int = Field(64 * 1024, ge=1024)
    upload_bytes_max: int = Field(256 * 1024 * 1024, ge=1024, description="CSV uploads (clearing files, recipients)")
    uploads_at_once: int = Field(2, ge=1, le=64, description="CSV uploads a worker takes at once; more: 503 overloaded")
    # Jobs that read a range of the book into memory (api/heavy.py): a simulation of a
    # month at Incheon scale peaks at ~6.4 GiB, and they run beside the payment path.
    heavy_jobs_at_once: int = Field(1, ge=1, le=16, description="simulations, correction proposals, settlement runs, "
                                                                "reports and reconciliations a worker runs at once; "
                                                                "more: 503 overloaded")
    simulation_payments_max: int = Field(25_000_000, ge=1, le=100_000_000,
                                         description="payments a simulation over HTTP re-evaluates; more: 422 "
                                                     "range_too_large (docs/performance.md, Simulation)")
    # A correction's plan reads one member group at a time (settlement.simulate.PLAN_GROUP_ROWS),
    # so its memory follows the group, not this bound; the bound is the simulator's ceiling.
    correction_payments_max: int = Field(25_000_000, ge=1, le=100_000_000,
                                         description="payments a correction proposal reads (its range and the rest "
                                                     "of its last month, one member group at a time); more: 422 "
                                                     "range_too_large (docs/performance.md, Simulation)")
    page_size_max: int = Field(200, ge=1, le=10_000)
    access_log: Literal["off", "staff", "all"] = Field(
        "staff", description="a log line per call: staff (all but the card app's and the probes'), all, off")
    # Redis refuses an expiry past ~2^63 ms ("invalid expire time"): every answer's SET failed,
    # read as Redis down, so replays all went to the database unsaid; a year is bound enough
    idempotency_cache_ttl_s: int = Field(86_400, ge=1, le=31_536_000)
    api_fast_path: bool = Field(True, description="answer well-formed card-app payments and top-ups at the "
                                                  "ASGI edge (api/cardfast.py); false: through FastAPI routing")
    budget_approval: Literal["one_person", "second_person"] = Field(
        "one_person", description="who sets a budget limit: 'one_person', API.md's PUT /v1/budgets/{source}/{period} "
                                  "(requests with a second person work beside it); 'second_person', only a budget "
                                  "request approved by a different person, and the PUT is refused (403)")
    idempotency_lookup: Literal["local", "redis"] = Field(
        "local", description="replays: answered from this worker's recent answers, else by the book ('local'); "
                             "or also looked up in Redis first on every write ('redis'): see api/fastpath.py")
    rate_limits: dict[Literal["card-app", "policy-editor", "policy-approver", "finance", "auditor", "admin"],
                      RateLimit] = Field(
        default_factory=lambda: dict(DEFAULT_RATE_LIMITS),
        description='per key, by role: [requests a second, burst], JSON, e.g. {"card-app": [10000, 20000]}; '
                    'a role left out is not limited, {} turns limits off')
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_json: bool = True

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("database_url")
    @classmethod
    def _database(cls, url: str) -> str:
        if not url.startswith(("sqlite:", "postgresql:", "postgresql+psycopg:")):
            raise ValueError("a sqlite:///PATH or postgresql://USER@HOST:PORT/DB URL"
                             + (" (postgresql://, not postgres://)" if url.startswith("postgres:") else ""))
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError
        from sqlalchemy.util import asbool

        try:  # what every command's engine reads it with (their messages may echo the password)
            parsed = make_url(url)
            port = parsed.port
        except (ValueError, ArgumentError):
            parsed, port = None, 0
        if port is not None and not 1 <= port <= 65_535:
            raise ValueError("a URL that does not parse: the port is a number from 1 to 65535, and a password's "
                             "@ : / [ ] % are %-encoded")
        if url.startswith("sqlite") and parsed is not None and not asbool(parsed.query.get("uri", False)):
            # SQLAlchemy hands SQLite the rest of the query only with uri=true, else drops it with a
            # warning outside the JSON log: `?mode=ro` opened the book writable (operations audit)
            if ignored := sorted(set(parsed.query) - SQLITE_DRIVER_ARGS):
                raise ValueError(f"SQLite reads {', '.join(ignored)} only with uri=true and a file: URI "
                                 "(sqlite:///file:/srv/eum.db?mode=ro&uri=true); without it they are ignored")
        if url.startswith("postgresql") and not parsed.database and "dbname" not in parsed.query:
            # libpq's default is the database named as the user: `postgres` for the admin, whom
            # `eum serve` then migrated and served the book in (operations audit, 2026-12-07).
            raise ValueError("a postgresql://USER@HOST:PORT/DB URL names its database (without one PostgreSQL "
                             "connects to the database named as the user, and the book would be made there)")
        return url

    @field_validator("redis_url")
    @classmethod
    def _redis(cls, url: str | None) -> str | None:
        if url is None:
            return url
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("a redis://HOST:PORT/DB URL (or rediss://, unix://)")
        from urllib.parse import urlsplit

        from redis.connection import parse_url

        # Read as the workers' clients read it: a port that is not a number had passed here,
        # and the start was a traceback. The reason is not echoed: a password's unencoded /
        # puts the rest of it in the port or the path.
        try:
            parse_url(url)
            path = urlsplit(url).path.strip("/")
        except ValueError:
            path = None
        # redis-py drops a database that is not a number and uses 0, which may be another service's
        if path is None or (url.startswith(("redis://", "rediss://")) and path and not path.isdigit()):
            raise ValueError("a URL that does not parse: redis://[:PASSWORD@]HOST:PORT/DB, the port a number from 1 "
                             "to 65535, DB a number, the query redis's own options, and a password's @ : / [ ] % "
                             "%-encoded")
        return url

    @field_validator("key_pepper")
    @classmethod
    def _pepper(cls, value: SecretStr) -> SecretStr:
        # Empty in any environment: `EUM_KEY_PEPPER=` (a template's blank line) hashed the
        # keys with no pepper, and they stopped verifying once it was filled in.
        if not value.get_secret_value().strip():
            raise ValueError("EUM_KEY_PEPPER is empty: set it to a secret, or unset it for the development default "
                             "(keys are hashed with it: changing it means reissuing every key)")
        return value

    @model_validator(mode="after")
    def _production_secrets(self) -> "Settings":
        if self.environment == "production":
            pepper = self.key_pepper.get_secret_value()
            # (Empty is refused in every environment, `_pepper`: compose's default when it is
            # not set.) Not a length: keys are hashed with it, and a deployment's pepper cannot
            # change without reissuing every key.
            if pepper == DEFAULT_SECRET:
                raise ValueError("EUM_KEY_PEPPER must be set to a secret in production")
            if self.database_url.startswith("sqlite"):
                raise ValueError("production needs PostgreSQL: set EUM_DATABASE_URL")
            if not self.audit_keyring.signing:
                raise ValueError("EUM_AUDIT_KEYS must be set in production (id:secret), so that the audit log's "
                                 "links cannot be recomputed by someone who can write the database")
        return self

    @field_validator("audit_keys")
    @classmethod
    def _audit_keys(cls, value: SecretStr | None) -> SecretStr | None:
        from ledger.audit import Keyring

        Keyring.parse(None if value is None else value.get_secret_value())
        return value

    @property
    def audit_keyring(self):
        from ledger.audit import Keyring

        return Keyring.parse(None if self.audit_keys is None else self.audit_keys.get_secret_value())

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
