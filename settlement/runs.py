"""Reconciliation runs, stored (`reconciliations`, migration 0020): what `POST
/v1/reconciliations` and `eum reconcile` answered, so that `GET /v1/reconciliations/{id}`
reads it back and the day's and month's HTML reports show its exceptions (they showed
none: only `eum report --clearing FILE` did).

A run keeps its summary (facts, counts, amounts per category, rows_truncated), who ran it
and when, the file's SHA-256 and size, and its exception rows: at most `rows_stored` of
each category (the answer's `rows_max`, but at least the report's EXCEPTION_ROWS_MAX), as
gzip-compressed JSON. The matched rows are not kept: a 1.5-million-line file is ~1.5
million of them, and nothing reads them back. Past the cap a category keeps its count and
amounts, and `rows_truncated` says so; every row is `eum reconcile --out`'s.

The same file sent again is a new run, not a replay of the first: it is compared with the
book as it is now (a payment recorded late, a refund since), and the reports show the
latest run of each date. Each run is audited (`reconciliation.run`) in the transaction
that stores it.
"""

from __future__ import annotations

import gzip
import time
import uuid
import zlib
from typing import Callable

import orjson
import polars as pl
from sqlalchemy import Connection, Engine, func, select

from ledger import audit
from ledger.errors import NotFound
from rules.timeutil import rfc3339
from settlement import schema as ss
from settlement.reconcile import CATEGORIES, CATEGORY_COLUMNS, READABLE_TIMES, ROW_SCHEMA, Reconciliation

EXCEPTION_ROWS_MIN = 200  # settlement.report.EXCEPTION_ROWS_MAX: what the report shows of a category
RUNS_PAGE = 400
CLI_ROWS_MAX = 1_000  # `eum reconcile`'s run lists what POST /v1/reconciliations' default rows_max does
GZIP_LEVEL = 6


class ReconciliationNotFound(NotFound):
    code, title = "reconciliation_not_found", "Reconciliation not found"


def _now_us() -> int:
    return time.time_ns() // 1000


def rows_stored(rows_max: int) -> int:
    """The exception rows kept of each category: the answer's, and at least what the report shows."""
    return max(rows_max, EXCEPTION_ROWS_MIN)


def store(engine: Engine, result: Reconciliation, *, actor: str, file_sha256: str, file_bytes: int,
          rows_max: int, clock: Callable[[], int] = _now_us) -> dict:
    """Keep `result` as a run and audit it, in one transaction; the answer (`answer`) with
    the rows of each category at most `rows_max`, the matched ones included (this once)."""
    keep = rows_stored(rows_max)
    counts = result.counts()
    body = result.body(rows_max)
    # The stored rows are the answer's own where it lists as many (no second copy of them),
    # compressed a category at a time: at rows_max 100,000 a category's JSON is ~30 MB.
    packer = zlib.compressobj(GZIP_LEVEL, wbits=31)  # gzip
    parts = []
    for i, name in enumerate(n for n in CATEGORIES if n != "matched"):
        rows = body[name] if keep == rows_max else result.frames[name].head(keep).to_dicts()
        parts.append(packer.compress((b"," if i else b"{") + orjson.dumps(name) + b":" + orjson.dumps(rows)))
    parts.append(packer.compress(b"}") + packer.flush())
    blob = b"".join(parts)
    del parts
    dates = list(result.facts["business_dates"])
    run_id = f"rec-{uuid.uuid4().hex[:16]}"
    summary = {"facts": result.facts, "counts": counts, "amounts": result.amounts()}
    with engine.begin() as conn:
        # Later runs sort after earlier ones even where the clock stepped back: the reports
        # show the latest run of a date by this time.
        last = conn.execute(select(func.max(ss.reconciliations.c.created_at_us))).scalar()
        now = max(clock(), (last or 0) + 1)
        conn.execute(ss.reconciliations.insert().values(
            reconciliation_id=run_id, first_business_date=min(dates), last_business_date=max(dates), run_by=actor,
            created_at_us=now, file_sha256=file_sha256, file_bytes=file_bytes, rows_max=rows_max,
            rows_stored=keep, exception_count=result.exceptions, summary=orjson.dumps(summary).decode(),
            exceptions=blob))
        conn.execute(ss.reconciliation_dates.insert(), [{"business_date": d, "reconciliation_id": run_id,
                                                         "created_at_us": now} for d in dates])
        audit.append(conn, at_us=now, actor=actor, action="reconciliation.run", object_type="reconciliation",
                     object_id=run_id, detail={"business_dates": dates, "file_sha256": file_sha256,
                                               "file_bytes": file_bytes, "counts": counts,
                                               "tolerance_won": result.facts["tolerance_won"]})
    run = _run(actor, now, file_sha256, file_bytes)
    return {"reconciliation_id": run_id, "run": run, **body, "amounts": summary["amounts"]}


def _run(actor: str, at_us: int, file_sha256: str, file_bytes: int) -> dict:
    return {"run_by": actor, "created_at": rfc3339(at_us), "file_sha256": file_sha256, "file_bytes": file_bytes}


def _row(conn: Connection, run_id: str):
    row = conn.execute(select(ss.reconciliations).where(ss.reconciliations.c.reconciliation_id == run_id)).first()
    if row is None:
        raise ReconciliationNotFound(f"no reconciliation {run_id!r}")
    return row


def answer(conn: Connection, run_id: str) -> dict:
    """The run's answer as `POST /v1/reconciliations` gave it, but for the matched rows,
    which are not kept: none listed, `rows_truncated.matched` true where there were any."""
    row = _row(conn, run_id)
    summary = orjson.loads(row.summary)
    counts = summary["counts"]
    rows = orjson.loads(gzip.decompress(row.exceptions))
    listed = {name: rows[name][:row.rows_max] for name in CATEGORIES if name != "matched"}
    truncated = {name: counts[name] > (0 if name == "matched" else row.rows_max) for name in CATEGORIES}
    return {"reconciliation_id": row.reconciliation_id,
            "run": _run(row.run_by, row.created_at_us, row.file_sha256, row.file_bytes),
            "facts": summary["facts"], "counts": counts, "rows_truncated": truncated, "matched": [], **listed,
            "amounts": summary["amounts"]}


def list_runs(conn: Connection, *, date: str | None = None, limit: int = RUNS_PAGE,
              after: str | None = None) -> list[dict]:
    """Runs in the order they were made, `limit` after the run `after` (an id that is no
    run starts nowhere: empty); with `date`, those that compared that business date."""
    t, d = ss.reconciliations, ss.reconciliation_dates
    query = (select(t.c.reconciliation_id, t.c.run_by, t.c.created_at_us, t.c.file_sha256, t.c.file_bytes,
                    t.c.summary).order_by(t.c.created_at_us, t.c.reconciliation_id).limit(limit))
    if date is not None:
        query = query.where(t.c.reconciliation_id.in_(select(d.c.reconciliation_id).where(d.c.business_date == date)))
    if after is not None:
        last = conn.execute(select(t.c.created_at_us).where(t.c.reconciliation_id == after)).scalar()
        if last is None:
            return []
        query = query.where((t.c.created_at_us > last)
                            | ((t.c.created_at_us == last) & (t.c.reconciliation_id > after)))
    out = []
    for r in conn.execute(query):
        summary = orjson.loads(r.summary)
        out.append({"reconciliation_id": r.reconciliation_id,
                    **_run(r.run_by, r.created_at_us, r.file_sha256, r.file_bytes),
                    "business_dates": summary["facts"]["business_dates"], "counts": summary["counts"],
                    "amounts": summary["amounts"]})
    return out


def latest_covering(conn: Connection, days: list[str]) -> Reconciliation | None:
    """For the reports: the latest run that compared each of `days`, their exception rows
    as one Reconciliation (each run whole, once, however many of the days it covers),
    or None when no run compared any of them."""
    d = ss.reconciliation_dates
    ranked = select(d.c.business_date, d.c.reconciliation_id, func.row_number().over(
        partition_by=d.c.business_date, order_by=(d.c.created_at_us.desc(), d.c.reconciliation_id.desc()))
        .label("n")).where(d.c.business_date.in_(days)).subquery()
    ids = conn.execute(select(ranked.c.reconciliation_id).where(ranked.c.n == 1).distinct()).scalars().all()
    if not ids:
        return None
    t = ss.reconciliations
    rows = conn.execute(select(t).where(t.c.reconciliation_id.in_(ids))
                        .order_by(t.c.first_business_date, t.c.created_at_us)).all()
    frames: dict[str, list[pl.DataFrame]] = {name: [] for name in CATEGORIES}
    counted = {name: 0 for name in CATEGORIES}
    dates: list[str] = []
    runs = []
    for row in rows:
        summary = orjson.loads(row.summary)
        stored = orjson.loads(gzip.decompress(row.exceptions))
        for name in CATEGORIES:
            counted[name] += summary["counts"][name]
            # The report shows a category's first rows: the frames are built of those alone.
            frames[name].append(_frame(name, stored.get(name, [])[:EXCEPTION_ROWS_MIN]))
        del stored
        dates += summary["facts"]["business_dates"]
        runs.append({"reconciliation_id": row.reconciliation_id,
                     **_run(row.run_by, row.created_at_us, row.file_sha256, row.file_bytes),
                     "business_dates": summary["facts"]["business_dates"], "counts": summary["counts"]})
    facts = {"business_dates": sorted(set(dates)), "reconciliation_ids": [r["reconciliation_id"] for r in runs]}
    return Reconciliation({name: pl.concat(parts) for name, parts in frames.items()}, facts, counted, tuple(runs))


def _frame(name: str, rows: list[dict]) -> pl.DataFrame:
    """A category's stored rows as the frame `reconcile_frames` made them: its columns, each
    time beside its microseconds as text."""
    columns: list[str] = []
    for column in CATEGORY_COLUMNS[name]:
        columns += [column, READABLE_TIMES[column]] if column in READABLE_TIMES else [column]
    schema = {c: ROW_SCHEMA.get(c, pl.String) for c in columns}
    return pl.DataFrame(rows, schema=schema) if rows else pl.DataFrame(schema=schema)


__all__ = ["store", "answer", "list_runs", "latest_covering", "ReconciliationNotFound", "rows_stored"]
