"""`eum settle`, `eum reconcile`, `eum report`: finance commands, registered on the
main typer app by eum/cli.py (`settlement.cli.register(app)`)."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer

from rules.timeutil import SPAN_END, SPAN_FIRST
from settlement.config import TOLERANCE_WON_MAX

# What the finance commands refuse before they touch anything: one line on stderr,
# `error: ...`, and exit 2 (as `eum payments replay` refuses a file), nothing recorded.
# The bounds are the HTTP API's for the same inputs (api/finance.py: BusinessDate,
# POST /v1/reconciliations' tolerance_won), so the CLI and the API refuse alike.
BUSINESS_DATE_MIN, BUSINESS_DATE_MAX = SPAN_FIRST.date(), SPAN_END.date() - dt.timedelta(days=1)
PAYOUT_SUFFIXES = (".csv", ".xlsx", ".parquet")  # what settlement.export.write writes
REPORTS_DIR = Path("reports")  # `eum report`'s files without --out, in the folder it is run from


def _refuse(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _read(path: Path, label: str, after: str = "", limit: int | None = None) -> bytes:
    """The file's bytes, or a refusal naming it (missing, a folder, unreadable, larger
    than `limit`: refused by its size before it is read; by default a clearing file's
    `clearing_file_bytes_max`, the settings checked first as every finance command
    checks them)."""
    from eum.cli import _settlement_config
    from eum.textfiles import BadUpload, read_bounded

    try:
        return read_bounded(path, _settlement_config().clearing_file_bytes_max if limit is None else limit)
    except (OSError, BadUpload) as error:
        _refuse(f"{label}: {getattr(error, 'strerror', None) or error}{after}")


def _business_date(text: str, option: str) -> dt.date:
    """A business date given as YYYY-MM-DD within the book's era, or a refusal."""
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        _refuse(f"{option} {text!r} is not a date; give YYYY-MM-DD (Asia/Seoul)")
    try:
        day = dt.date.fromisoformat(text)
    except ValueError as error:
        _refuse(f"{option} {text!r} is not a date: {error}")
    if not BUSINESS_DATE_MIN <= day <= BUSINESS_DATE_MAX:
        _refuse(f"{option} {day} is outside {BUSINESS_DATE_MIN} .. {BUSINESS_DATE_MAX}")
    return day


def _check_writable(path: Path, option: str) -> None:
    """Refuse a file that could not be written: a folder, or one in a folder that is not
    writable (export.write makes missing folders, so the nearest existing one counts)."""
    if path.is_dir():
        _refuse(f"{option} {path} is a folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        _refuse(f"{option} {path} is not writable")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        _refuse(f"{option} {path}: {folder} is not a folder")
    try:  # os.access alone says yes to root everywhere (even /proc): try a file there
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".eum-probe-"):
            pass
    except OSError as error:
        _refuse(f"{option} {path}: the folder {folder} is not writable ({error.strerror or error})")


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same path once resolved (symbolic links
    followed), or another name of it (a hard link)."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def refuse_overwriting_input(out: Path, option: str, source: Path, label: str, nothing: str) -> None:
    """An output that is the file read is refused: written over, the file was gone (an
    HTML report in place of the network's clearing file), and with it the advice to run
    the same file again."""
    if same_file(out, source):
        _refuse(f"{option} {out} is the {label} {source} itself, which it would write over; give another; {nothing}")


def _check_results_out(out: Path, categories: tuple[str, ...]) -> None:
    """`eum reconcile --out`: an .xlsx file, or a folder (made if missing) of one .csv per
    category. Another kind of path is refused: `result.csv` used to become a folder."""
    if out.suffix.lower() == ".xlsx":
        _check_writable(out, "--out")
        return
    if out.exists() and not out.is_dir():
        _refuse(f"--out {out} is not a folder; give a folder (one .csv per category) or an .xlsx file")
    if out.suffix and not out.exists():
        _refuse(f"--out {out}: give an .xlsx file, or a folder for one .csv per category (a new folder's name "
                "without an extension)")
    for name in categories:
        _check_writable(out / f"{name}.csv", "--out")


def _check_payouts_format(payouts: Path, nothing: str) -> None:
    """Refuse a payouts file of a format `settlement.export.write` does not write."""
    if payouts.suffix.lower() not in PAYOUT_SUFFIXES:
        _refuse(f"--payouts {payouts}: unknown format {payouts.suffix or '(no extension)'!r}; "
                f"use {', '.join(PAYOUT_SUFFIXES)}; {nothing}")


def _payout_paths(payouts: Path, days: list[dt.date]) -> dict[dt.date, Path]:
    """Where each day's payouts go: the file itself for one day, FILE-DATE.EXT for a range."""
    if len(days) == 1:
        return {days[0]: payouts}
    return {day: payouts.with_name(f"{payouts.stem}-{day}{payouts.suffix}") for day in days}


def _engine():
    # A bad setting (EUM_SETTLEMENT_* too) is one line; logs to stderr as the settings say.
    from eum.cli import _require_migrated, _settings, _settlement_config
    from ledger.db import make_engine

    settings = _settings()
    _settlement_config()
    _require_migrated(settings.database_url)  # not at this release's head: exit 2, before reading
    return make_engine(settings.database_url)


def _progress(*columns, transient: bool = False):
    """A progress bar on stderr: stdout holds the results. They pass through the bar's
    console (printed above the bar, which stays whole) only when stdout is that terminal;
    a stderr that is not a terminal gets no bar (a log, or one `error:` line to parse)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = columns or (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    return Progress(*columns, console=Console(stderr=True), transient=transient, disable=not sys.stderr.isatty(),
                    redirect_stdout=sys.stdout.isatty())


def settle(date: Annotated[str, typer.Option("--date", help="business date YYYY-MM-DD (Asia/Seoul)")],
           to: Annotated[Optional[str], typer.Option(help="settle every date from --date to this one")] = None,
           on_behalf_of: Annotated[Optional[str], typer.Option(
               "--on-behalf-of", "--actor",
               help="whom this run is for, kept in the audit entry's detail as `on_behalf_of`; the run's `run_by` "
                    "and audit actor are always this OS account (`eum cli`). `--actor` is its old name")] = None,
           payouts: Annotated[Optional[Path], typer.Option(
               help="write the merchant payouts (.csv .xlsx .parquet); with --to, a file a day: FILE-DATE.EXT")]
           = None) -> None:
    """Settle one business date (or a range, day by day). Exit 1 if a run fails its checks;
    2 if refused before anything is settled (a bad date, a reversed range, a date not over
    yet anywhere in the range, a payouts file that cannot be written, a bad --on-behalf-of);
    3 when the database stopped it (the days settled before stay; run it again)."""
    from ledger.db import reader
    from ledger.errors import EumError
    from ledger.keys import operator
    from rules.timeutil import local_date
    from settlement import export, service

    from eum.cli import _database_errors, _on_behalf_of, _stopped_by_database

    on_behalf_of = _on_behalf_of(on_behalf_of)
    first = _business_date(date, "--date")
    last = _business_date(to, "--to") if to else first
    if last < first:
        _refuse(f"--to {last} is before --date {first}; nothing settled")
    days = [first + dt.timedelta(days=i) for i in range((last - first).days + 1)]
    # The whole range must be over before any day of it is settled (service.settle
    # refuses each open date, but only when it reaches it).
    today = local_date(time.time_ns() // 1000)
    if last >= today:
        open_day = max(first, today)
        _refuse(f"{service.BusinessDateOpen.code}: {open_day} (Asia/Seoul) is not over; settle it from "
                f"{open_day + dt.timedelta(days=1)}; nothing settled")
    paths: dict[dt.date, Path] = {}
    if payouts is not None:
        _check_payouts_format(payouts, "nothing settled")
        paths = _payout_paths(payouts, days)
        for path in paths.values():
            _check_writable(path, "--payouts")
    engine = _engine()
    failed = settled = 0
    try:
        with _progress() as progress:
            task = progress.add_task(f"settling {len(days)} day(s)", total=len(days))
            for day in days:
                progress.update(task, description=f"settling {day}")
                try:
                    result = service.settle(engine, day, actor=operator(), on_behalf_of=on_behalf_of)
                except _database_errors():  # the database's stop (Unavailable too), not a refusal: below
                    raise
                except EumError as error:  # e.g. midnight passed since the check above
                    progress.stop()
                    typer.echo(f"error: {error.code}: {error.detail}"
                               + (f"; the {settled} day(s) before {day} stay settled" if settled else
                                  "; nothing settled"), err=True)
                    raise typer.Exit(1 if settled else 2) from None
                settled += 1
                run = result.totals.get("run", {})
                mark = "replayed" if result.replayed else result.status
                # sys.stdout as it is now: the bar's stand-in while it runs on the same terminal
                # (click's own stdout would write under the bar's feet).
                # The operator's cash beside the merchants' money: a day of withdrawals alone
                # moves money (to members' bank accounts) with no payment and nothing payable. What a
                # withdrawal paid out: what it settled of the member's owed money never left the book.
                typer.echo(f"{result.settlement_id}  {mark:<9} payments {run.get('payment_count', 0):>9,}  "
                           f"net payable {run.get('net_payable_won', 0):>16,} won  "
                           f"topped up {run.get('topped_up_won', 0):>14,} won  "
                           f"withdrawals paid out {run.get('withdrawn_won', 0):>14,} won  payout {result.payout_date}",
                           file=sys.stdout)
                for check in result.failures:
                    typer.echo(f"   FAILED {check['name']}: {check['detail']}", file=sys.stdout)
                failed += result.status == "failed"
                if payouts is not None and result.status != "failed":
                    with reader(engine).connect() as conn:
                        frame = service.merchant_payouts(conn, result.settlement_id)
                    try:
                        export.write(frame, paths[day], sheet="merchant payouts")
                    except (OSError, ValueError) as error:  # e.g. a full disk, more rows than xlsx holds
                        progress.stop()
                        typer.echo(f"error: {result.settlement_id} is settled but its payouts were not written to "
                                   f"{paths[day]}: {error}; later days not settled (the payouts: GET "
                                   f"/v1/settlements/{result.settlement_id}/merchant-payouts)", err=True)
                        raise typer.Exit(1) from None
                    typer.echo(f"   payouts written to {paths[day]}", file=sys.stdout)
                progress.advance(task)
    except _database_errors() as error:
        _stopped_by_database(error, (f"the {settled} day(s) before it stay settled" if settled else "nothing settled")
                             + ": run it again (a day settled is answered as replayed)")
    finally:
        engine.dispose()
    raise typer.Exit(1 if failed else 0)


def reconcile(file: Path,
              tolerance_won: Annotated[Optional[int], typer.Option(help="amount tolerance in won")] = None,
              out: Annotated[Optional[Path], typer.Option(
                  help="write every result row: an .xlsx file (a sheet per category), or a folder (made if "
                       "missing) of one .csv per category")] = None,
              business_date: Annotated[Optional[str], typer.Option(
                  "--business-date", help="the day the file clears, YYYY-MM-DD (default: the days of its lines' "
                  "times; a line timed just past midnight would pull the next day in)")] = None) -> None:
    """Reconcile the card network's clearing file with the book. Exit 1 on any exception row,
    or when writing --out fails afterwards (a full disk, more rows than xlsx holds); 2 when
    refused before reconciling (a file that cannot be read, is malformed or has no lines
    after its header, a tolerance outside 0..10^12, a bad date, an --out that is neither
    an .xlsx file nor a folder or cannot be written, a process that cannot write the run's
    audit entry). Read-only on the ledger: the run is stored (`reconciliations`, its
    `reconciliation_id` printed), as `POST /v1/reconciliations` stores its runs, so the
    finance endpoints' reports show it."""
    import hashlib

    from ledger import audit
    from ledger.db import reader
    from ledger.errors import EumError
    from ledger.keys import operator
    from settlement import export, runs
    from settlement.reconcile import CATEGORIES, ClearingFileInvalid, parse_clearing, reconcile_parsed

    if tolerance_won is not None and not 0 <= tolerance_won <= TOLERANCE_WON_MAX:
        _refuse(f"--tolerance-won {tolerance_won} is outside 0 .. {TOLERANCE_WON_MAX:,} won")
    day = _business_date(business_date, "--business-date") if business_date is not None else None
    if out is not None:
        _check_results_out(out, CATEGORIES)
        for written in ([out] if out.suffix.lower() == ".xlsx" else [out / f"{name}.csv" for name in CATEGORIES]):
            refuse_overwriting_input(written, "--out", file, "clearing file", "nothing reconciled")
    data = [_read(file, str(file))]  # popped by the parse: not held while matching
    sha256, size = hashlib.sha256(data[0]).hexdigest(), len(data[0])
    engine = _engine()
    try:
        with engine.connect() as conn:  # the run's audit entry: refused now, not after the work
            try:
                audit.check_appendable(conn)
            except EumError as error:
                _refuse(f"{error.code}: {error.detail}; nothing reconciled")
        with _progress() as progress:
            task = progress.add_task(f"reconciling {file.name} ({size:,} bytes)", total=None)
            try:
                with reader(engine).connect() as conn:
                    clearing, facts = parse_clearing(data.pop())
                    result = reconcile_parsed(conn, clearing, facts, tolerance_won=tolerance_won, business_date=day)
                del clearing
            except ClearingFileInvalid as invalid:
                progress.stop()
                typer.echo(f"error: {file}: {invalid.detail}", err=True)
                for error in invalid.extra.get("errors", [])[:50]:
                    typer.echo(f"  line {error['line']}: {error['reason']}", err=True)
                raise typer.Exit(2) from None
            stored = runs.store(engine, result, actor=operator(), file_sha256=sha256, file_bytes=size,
                                rows_max=runs.CLI_ROWS_MAX)
            progress.update(task, total=1, completed=1)
    finally:
        engine.dispose()
    if result.facts.get("ignored_columns"):  # not read: say so, as the API's facts do
        typer.echo("note: columns ignored (no name this format knows): "
                   + ", ".join(repr(c) for c in result.facts["ignored_columns"]), err=True)
    typer.echo(f"reconciliation {stored['reconciliation_id']} stored")
    for name, count in result.counts().items():
        typer.echo(f"{name:<22} {count:>10,}")
    if out is not None:
        try:
            if out.suffix.lower() == ".xlsx":
                out.write_bytes(export.xlsx_bytes({n: result.frames[n] for n in CATEGORIES}))
            else:
                out.mkdir(parents=True, exist_ok=True)
                for name in CATEGORIES:
                    (out / f"{name}.csv").write_bytes(export.csv_bytes(result.frames[name]))
        except (OSError, ValueError) as error:  # checked before, but a disk fills; xlsx holds 1,048,575 rows
            typer.echo(f"error: --out {out}: the rows were not written: {getattr(error, 'strerror', None) or error}",
                       err=True)
            raise typer.Exit(1) from None
        typer.echo(f"rows written to {out}")
    raise typer.Exit(1 if result.exceptions else 0)


def _month(text: str, option: str) -> str:
    """A month given as YYYY-MM within the book's era (api/finance.py's MONTH_PATTERN), or a refusal."""
    if not re.fullmatch(r"\d{4}-\d{2}", text):
        _refuse(f"{option} {text!r} is not a month; give YYYY-MM (Asia/Seoul)")
    if not 1 <= int(text[5:]) <= 12:
        _refuse(f"{option} {text!r} is not a month: the month must be 01 .. 12")
    if not BUSINESS_DATE_MIN.year <= int(text[:4]) <= BUSINESS_DATE_MAX.year:
        _refuse(f"{option} {text} is outside {BUSINESS_DATE_MIN:%Y-%m} .. {BUSINESS_DATE_MAX:%Y-%m}")
    return text


def report(month: Annotated[Optional[str], typer.Option(help="YYYY-MM")] = None,
           date: Annotated[Optional[str], typer.Option("--date", help="a business date YYYY-MM-DD")] = None,
           out: Annotated[Optional[Path], typer.Option(
               help="the HTML file (default: reports/report-PERIOD.html, the month or date given)")] = None,
           clearing: Annotated[Optional[Path], typer.Option(help="a clearing file to show its exceptions")] = None,
           payouts: Annotated[Optional[Path], typer.Option(help="also write the period's payouts "
                                                                 "(.csv .xlsx .parquet)")] = None) -> None:
    """A self-contained HTML report (charts inline) for a month or a business date, to
    --out or reports/report-2026-11.html (reports/report-2026-11-20.html for a date). Exit 2,
    nothing written, when refused: not exactly one of --month and --date, a bad month or
    date, a clearing file that cannot be read or is malformed, a payouts file of another
    extension, or an output that cannot be written. Read-only on the book."""
    from ledger.db import reader
    from settlement import export
    from settlement import report as rep
    from settlement.reconcile import ClearingFileInvalid, reconcile as run

    if (month is None) == (date is None):
        _refuse("give exactly one of --month YYYY-MM or --date YYYY-MM-DD; nothing written")
    period = _month(month, "--month") if month is not None else None
    day = _business_date(date, "--date") if date is not None else None
    if out is None:  # one file a period: a day's report went over the month's (reports/report.html)
        out = REPORTS_DIR / f"report-{period or day}.html"
    _check_writable(out, "--out")
    if payouts is not None:
        _check_payouts_format(payouts, "nothing written")
        _check_writable(payouts, "--payouts")
        if payouts.resolve() == out.resolve():
            _refuse(f"--payouts {payouts} is the --out file; give another; nothing written")
    if clearing is not None:
        refuse_overwriting_input(out, "--out", clearing, "--clearing file", "nothing written")
        if payouts is not None:
            refuse_overwriting_input(payouts, "--payouts", clearing, "--clearing file", "nothing written")
    clearing_data = None
    if clearing is not None:
        clearing_data = _read(clearing, f"--clearing {clearing}", "; nothing written")
    engine = _engine()
    try:
        with _progress() as progress:
            task = progress.add_task("gathering", total=3)
            with reader(engine).connect() as conn:
                try:
                    # A day's report reconciles the file as that day's (a line timed past
                    # midnight must not bring the next day in); a month's, by its lines.
                    recon = (run(conn, clearing_data, business_date=None if period else day)
                             if clearing_data is not None else None)
                except ClearingFileInvalid as invalid:
                    progress.stop()
                    where = "; ".join(f"line {e['line']}: {e['reason']}" for e in invalid.extra.get("errors", [])[:5])
                    _refuse(f"--clearing {clearing}: {invalid.detail}" + (f" ({where})" if where else "")
                            + f"; nothing written (every line: eum reconcile {clearing})")
                progress.advance(task)
                progress.update(task, description="settlements, flows, abuse signals")
                data = (rep.month_data(conn, period, reconciliation=recon) if period
                        else rep.day_data(conn, day, reconciliation=recon))
                progress.advance(task)
            progress.update(task, description="rendering")
            html = rep.render(data)
            try:  # the payouts first: their format can still refuse (more rows than xlsx holds)
                if payouts is not None:
                    export.write(data.payouts, payouts, sheet="merchant payouts")
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(html, encoding="utf-8")
            except (OSError, ValueError) as error:  # e.g. a full disk
                progress.stop()
                typer.echo(f"error: the report was not written: {error}", err=True)
                raise typer.Exit(1) from None
            progress.advance(task)
    finally:
        engine.dispose()
    typer.echo(f"report written to {out}")
    if payouts is not None:
        typer.echo(f"payouts written to {payouts}")
    typer.echo(json.dumps({"settlements": len(data.settlements), "payout_rows": data.payouts.height,
                           "flagged_members": data.abuse.members.height if data.abuse else 0}))


def register(app: typer.Typer) -> None:
    app.command("settle")(settle)
    app.command("reconcile")(reconcile)
    app.command("report")(report)
