"""`eum settle`, `eum reconcile`, `eum report`: finance commands, registered on the
main typer app by eum/cli.py (`settlement.cli.register(app)`)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Annotated, Optional

import typer


def _engine():
    from eum.settings import get_settings
    from ledger.db import make_engine

    return make_engine(get_settings().database_url)


def _progress():
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                    transient=False)


def settle(date: Annotated[str, typer.Option("--date", help="business date YYYY-MM-DD (Asia/Seoul)")],
           to: Annotated[Optional[str], typer.Option(help="settle every date from --date to this one")] = None,
           actor: Annotated[str, typer.Option(help="who runs it (audited)")] = "cli",
           payouts: Annotated[Optional[Path], typer.Option(help="write the merchant payouts (.csv .xlsx .parquet)")]
           = None) -> None:
    """Settle one business date (or a range, day by day). Exit 1 if a run fails its checks."""
    from ledger.db import reader
    from settlement import export, service

    first = dt.date.fromisoformat(date)
    last = dt.date.fromisoformat(to) if to else first
    days = [first + dt.timedelta(days=i) for i in range((last - first).days + 1)]
    engine = _engine()
    failed = 0
    with _progress() as progress:
        task = progress.add_task(f"settling {len(days)} day(s)", total=len(days))
        for day in days:
            progress.update(task, description=f"settling {day}")
            result = service.settle(engine, day, actor=actor)
            run = result.totals.get("run", {})
            mark = "replayed" if result.replayed else result.status
            progress.console.print(f"{result.settlement_id}  {mark:<9} payments {run.get('payment_count', 0):>9,}  "
                                   f"net payable {run.get('net_payable_won', 0):>16,} won  payout {result.payout_date}")
            for check in result.failures:
                progress.console.print(f"   [red]FAILED[/red] {check['name']}: {check['detail']}")
            failed += result.status == "failed"
            if payouts is not None and result.status != "failed":
                with reader(engine).connect() as conn:
                    frame = service.merchant_payouts(conn, result.settlement_id)
                path = payouts if len(days) == 1 else payouts.with_name(f"{payouts.stem}-{day}{payouts.suffix}")
                export.write(frame, path, sheet="merchant payouts")
                progress.console.print(f"   payouts written to {path}")
            progress.advance(task)
    raise typer.Exit(1 if failed else 0)


def reconcile(file: Path,
              tolerance_won: Annotated[Optional[int], typer.Option(help="amount tolerance in won")] = None,
              out: Annotated[Optional[Path], typer.Option(help="write every result row (.xlsx, or a folder of .csv)")]
              = None) -> None:
    """Reconcile the card network's clearing file with the book. Exit 1 on any exception row."""
    from ledger.db import reader
    from settlement import export
    from settlement.reconcile import CATEGORIES, ClearingFileInvalid, reconcile as run

    data = file.read_bytes()
    with _progress() as progress:
        task = progress.add_task(f"reconciling {file.name} ({len(data):,} bytes)", total=None)
        try:
            with reader(_engine()).connect() as conn:
                result = run(conn, data, tolerance_won=tolerance_won)
        except ClearingFileInvalid as invalid:
            progress.stop()
            typer.echo(f"{file}: {invalid.detail}", err=True)
            for error in invalid.extra.get("errors", [])[:50]:
                typer.echo(f"  line {error['line']}: {error['reason']}", err=True)
            raise typer.Exit(2) from None
        progress.update(task, total=1, completed=1)
    for name, count in result.counts().items():
        typer.echo(f"{name:<22} {count:>10,}")
    if out is not None:
        if out.suffix.lower() == ".xlsx":
            out.write_bytes(export.xlsx_bytes({n: result.frames[n] for n in CATEGORIES}))
        else:
            out.mkdir(parents=True, exist_ok=True)
            for name in CATEGORIES:
                (out / f"{name}.csv").write_bytes(export.csv_bytes(result.frames[name]))
        typer.echo(f"rows written to {out}")
    raise typer.Exit(1 if result.exceptions else 0)


def report(month: Annotated[Optional[str], typer.Option(help="YYYY-MM")] = None,
           date: Annotated[Optional[str], typer.Option("--date", help="a business date YYYY-MM-DD")] = None,
           out: Annotated[Path, typer.Option(help="the HTML file")] = Path("reports/report.html"),
           clearing: Annotated[Optional[Path], typer.Option(help="a clearing file to show its exceptions")] = None,
           payouts: Annotated[Optional[Path], typer.Option(help="also write the period's payouts")] = None) -> None:
    """A self-contained HTML report (charts inline) for a month or a business date."""
    from ledger.db import reader
    from settlement import export
    from settlement import report as rep
    from settlement.reconcile import reconcile as run

    if (month is None) == (date is None):
        typer.echo("give exactly one of --month or --date", err=True)
        raise typer.Exit(2)
    engine = _engine()
    with _progress() as progress:
        task = progress.add_task("gathering", total=3)
        with reader(engine).connect() as conn:
            recon = run(conn, clearing.read_bytes()) if clearing else None
            progress.advance(task)
            progress.update(task, description="settlements, flows, abuse signals")
            data = (rep.month_data(conn, month, reconciliation=recon) if month
                    else rep.day_data(conn, dt.date.fromisoformat(date), reconciliation=recon))
            progress.advance(task)
        progress.update(task, description="rendering")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(rep.render(data), encoding="utf-8")
        if payouts is not None:
            export.write(data.payouts, payouts, sheet="merchant payouts")
        progress.advance(task)
    typer.echo(f"report written to {out}")
    typer.echo(json.dumps({"settlements": len(data.settlements), "payout_rows": data.payouts.height,
                           "flagged_members": data.abuse.members.height if data.abuse else 0}))


def register(app: typer.Typer) -> None:
    app.command("settle")(settle)
    app.command("reconcile")(reconcile)
    app.command("report")(report)
