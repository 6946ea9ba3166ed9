"""Reading query results into polars: PostgreSQL through COPY (CSV, streamed), SQLite
through the cursor. One Core statement, two transports."""

from __future__ import annotations

import io

import polars as pl
from sqlalchemy import Connection
from sqlalchemy.sql import Select

COPY_CHUNK_BYTES_MAX = 1 << 20


def read_frame(conn: Connection, stmt: Select, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """Run `stmt` and return its rows as a frame with `schema` (column order = the
    statement's). Enum and Categorical columns are read as strings and cast."""
    names = list(schema)
    if conn.dialect.name == "postgresql":
        return _copy(conn, stmt, schema)
    rows = conn.execute(stmt).all()
    plain = {n: (pl.String if isinstance(t, (pl.Enum, pl.Categorical)) else t) for n, t in schema.items()}
    frame = pl.DataFrame(rows, schema=plain, orient="row") if rows else pl.DataFrame(schema=plain)
    return frame.select(names).cast(schema)


def _copy(conn: Connection, stmt: Select, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    sql = str(stmt.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
    buffer = io.BytesIO()
    raw = conn.connection.dbapi_connection
    with raw.cursor() as cursor:
        with cursor.copy(f"COPY ({sql}) TO STDOUT WITH (FORMAT csv, HEADER false)") as copy:
            for chunk in copy:
                buffer.write(chunk)
    plain = {n: (pl.String if isinstance(t, (pl.Enum, pl.Categorical)) else t) for n, t in schema.items()}
    if buffer.tell() == 0:
        return pl.DataFrame(schema=plain).cast(schema)
    buffer.seek(0)
    # The CSV carries no header: columns come in the statement's order.
    frame = pl.read_csv(buffer, has_header=False, new_columns=list(plain), schema=plain,
                        empty_string_is_null=False, null_values=[""])
    return frame.cast(schema)


def write_frame_pg(conn: Connection, table: str, frame: pl.DataFrame) -> None:
    """Append a frame to a PostgreSQL table by COPY, inside the caller's transaction."""
    buffer = io.BytesIO()
    frame.write_csv(buffer, include_header=False, null_value="")
    raw = conn.connection.dbapi_connection
    columns = ", ".join(f'"{c}"' for c in frame.columns)
    with raw.cursor() as cursor:
        with cursor.copy(f'COPY "{table}" ({columns}) FROM STDIN WITH (FORMAT csv)') as copy:
            copy.write(buffer.getvalue())


def arrow_available() -> bool:
    """Whether the ADBC PostgreSQL driver (binary COPY into Arrow) is installed."""
    try:
        import adbc_driver_postgresql.dbapi  # noqa: F401
    except ImportError:
        return False
    return True


def adbc_uri(conn: Connection) -> str:
    """A libpq URI for the database `conn` is connected to (for a connection of its own),
    with the engine's bounded waits (ledger.db): connect timeout, keepalives, and
    tcp_user_timeout, so that a lost server cannot hang a read."""
    from ledger.db import TCP_KEEPALIVES, TCP_USER_TIMEOUT_MS

    url = conn.engine.url.set(drivername="postgresql")
    bounds = {"connect_timeout": "3", "tcp_user_timeout": str(TCP_USER_TIMEOUT_MS),
              **{k: str(v) for k, v in TCP_KEEPALIVES.items()}}
    url = url.update_query_dict({k: v for k, v in bounds.items() if k not in url.query})
    return url.render_as_string(hide_password=False)


def _sql(stmt) -> str:
    from sqlalchemy.dialects import postgresql

    return str(stmt.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))


def _frame(table, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    frame = pl.from_arrow(table)
    if not isinstance(frame, pl.DataFrame) or frame.width != len(schema):
        raise RuntimeError(f"unexpected result shape for {list(schema)}")
    frame = frame.rename(dict(zip(frame.columns, schema)))
    return frame.cast(schema)


def read_frame_arrow(uri: str, stmt: Select, schema: dict[str, pl.DataType],
                     statement_timeout_ms: int | None = None) -> pl.DataFrame:
    """Run `stmt` on a new PostgreSQL connection and return its rows as a frame with
    `schema`: ADBC reads the result by binary COPY straight into Arrow, with no text
    formatting on the server and no parsing per value here. Safe to call from a thread."""
    return read_arrow_snapshot(uri, stmt, schema, (), statement_timeout_ms)[0]


def _begin_snapshot(cursor, statement_timeout_ms: int | None) -> None:
    cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    cursor.execute("SET TRANSACTION READ ONLY")
    if statement_timeout_ms is not None:
        cursor.execute(f"SET statement_timeout = {int(statement_timeout_ms)}")
    # Rows shipped through a Gather cost more than one backend scanning alone, and the
    # caller already reads on several connections at once.
    cursor.execute("SET max_parallel_workers_per_gather = 0")


def _rows_in_snapshot(uri: str, snapshot: str, row_stmts, statement_timeout_ms: int | None) -> list[list[tuple]]:
    from adbc_driver_postgresql import dbapi

    with dbapi.connect(uri) as conn, conn.cursor() as cursor:
        _begin_snapshot(cursor, statement_timeout_ms)
        cursor.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
        rows = []
        for stmt in row_stmts:
            cursor.execute(_sql(stmt))
            rows.append([tuple(r) for r in cursor.fetchall()])
        conn.rollback()
    return rows


def read_arrow_snapshot(uri: str, stmt: Select, schema: dict[str, pl.DataType], row_stmts,
                        statement_timeout_ms: int | None = None) -> tuple[pl.DataFrame, list[list[tuple]]]:
    """`stmt` as a frame (as `read_frame_arrow`) and each of `row_stmts` as rows, all in
    one REPEATABLE READ snapshot, so that the rows describe exactly the frame's rows,
    whatever commits meanwhile. The row statements run at the same time as the frame's,
    on a second connection that imports the first one's snapshot (`pg_export_snapshot`)."""
    from concurrent.futures import ThreadPoolExecutor

    from adbc_driver_postgresql import dbapi

    with dbapi.connect(uri) as conn, conn.cursor() as cursor:  # not autocommit: in a transaction
        _begin_snapshot(cursor, statement_timeout_ms)
        with ThreadPoolExecutor(1, thread_name_prefix="snapshot-rows") as pool:
            pending = None
            if row_stmts:
                cursor.execute("SELECT pg_export_snapshot()")
                snapshot = str(cursor.fetchone()[0])
                # The snapshot can be imported while this transaction lives: it ends
                # only after the rows are in.
                pending = pool.submit(_rows_in_snapshot, uri, snapshot, row_stmts, statement_timeout_ms)
            cursor.execute(_sql(stmt))
            table = cursor.fetch_arrow_table()
            rows = pending.result() if pending is not None else []
        conn.rollback()  # read only
    return _frame(table, schema), rows
