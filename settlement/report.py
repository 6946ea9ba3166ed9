"""Self-contained HTML reports for a business day and for a month: inline SVG charts,
inline CSS, no scripts, no network. One file finance staff can mail or archive.

Sections: settlement status and checks; totals (members' money in by top-ups and out by
withdrawals among them); cashback by funder and district per
day; grant programs (each funder's money in, what came back; disbursed, spent,
expired); budget burn against the limit with a forecast; top merchants; reconciliation
exceptions; the abuse (깡) report.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from dataclasses import dataclass, field
from html import escape

import orjson
import polars as pl
from sqlalchemy import Connection, select

from ledger import schema as s
from ledger.book import cashback_held
from ledger.queries import burn_window_days, forecast_exhausted_on, recent_burn
from rules.timeutil import local_date
from settlement import abuse as abuse_mod
from settlement import runs
from settlement import svg
from settlement.calendar import month_days
from settlement.io import read_frame
from settlement.reconcile import CATEGORIES, READABLE_TIMES, Reconciliation, with_readable_times
from settlement.service import SUCCESSFUL, budget_burn, list_settlements, month_payouts, stored_flows

TOP_MERCHANTS = 20
EXCEPTION_ROWS_MAX = 200


@dataclass
class ReportData:
    title: str
    period: str  # "YYYY-MM-DD" (a day) or "YYYY-MM" (a month)
    days: list[str]  # the business dates charted
    settlements: list[dict]
    funders: pl.DataFrame  # for_business_date, source, district, cashback_*_won
    payouts: pl.DataFrame  # merchant payout rows of the period
    budgets: list[dict] = field(default_factory=list)  # {source, period, limit_won}
    reconciliation: Reconciliation | None = None
    abuse: abuse_mod.AbuseReport | None = None
    generated_at: str = ""
    grants: pl.DataFrame | None = None  # for_business_date, program_id, district, disbursed/spent/... _won
    grant_funders: pl.DataFrame | None = None  # for_business_date, program_id, source, grant_*_won
    budget_burn: pl.DataFrame | None = None  # for_business_date, source, cashback_net_won against the month
    operator_cash: pl.DataFrame | None = None  # for_business_date, topped_up_won, withdrawn_won, operator_cash_net_won


# ---------------------------------------------------------------- gathering from the database


def _budgets(conn: Connection, month: str) -> list[dict]:
    b = s.budgets
    rows = conn.execute(select(b.c.source, b.c.period, b.c.limit_won, b.c.committed_won)
                        .where(b.c.period.in_([month, month[:4]]), b.c.limit_won.is_not(None))).all()
    today = local_date(time.time_ns() // 1000)  # what is committed now, as GET /v1/budgets reads it
    recent = recent_burn(conn, today)
    return [{"source": r.source, "period": r.period, "limit_won": int(r.limit_won),
             "committed_won": int(r.committed_won), "as_of": today.isoformat(),
             "recent_won": recent.get((r.source, r.period), 0)} for r in rows]


def _abuse_report(conn: Connection, lo_date: dt.date, hi_date: dt.date, merchants: bool = True) -> abuse_mod.AbuseReport:
    from rules.timeutil import local_midnight_us

    lo, hi = local_midnight_us(lo_date), local_midnight_us(hi_date + dt.timedelta(days=1))
    p, r, m = s.payments, s.refunds, s.merchants
    in_range = (p.c.status == "approved", p.c.occurred_at_us >= lo, p.c.occurred_at_us < hi)
    pay = read_frame(conn, select(p.c.payment_id, p.c.member_id, p.c.merchant_id, p.c.amount_won,
                                  p.c.occurred_at_us, p.c.cashback_won).where(*in_range),
                     abuse_mod.PAYMENTS_SCHEMA)
    # A payment a correction re-based holds its corrected parts, not `cashback_won` less
    # its refunds' clawbacks (`ledger.book.cashback_held`).
    held = [(payment_id, sum(cashback_held(orjson.loads(detail), orjson.loads(state)).values()))
            for payment_id, detail, state in conn.execute(
                select(p.c.payment_id, p.c.detail, p.c.refund_state)
                .where(*in_range, p.c.refund_state.like('%"corrected":%')))]
    pay = pay.join(pl.DataFrame(held, schema={"payment_id": pl.String, abuse_mod.HELD_COLUMN: pl.Int64},
                                orient="row"), on="payment_id", how="left", maintain_order="left")
    ref = read_frame(conn, select(r.c.refund_id, r.c.payment_id, r.c.amount_won, r.c.occurred_at_us,
                                  r.c.clawback_won).where(r.c.occurred_at_us >= lo), abuse_mod.REFUNDS_SCHEMA)
    reg = read_frame(conn, select(m.c.merchant_id, m.c.annual_sales_won),
                     {"merchant_id": pl.String, "annual_sales_won": pl.Int64}) if merchants else None
    days = (hi_date - lo_date).days + 1
    return abuse_mod.report(pay, ref, reg, _abuse_config(conn, hi - 1, max(days, 1)))


def _abuse_config(conn: Connection, at_us: int, period_days: int) -> abuse_mod.AbuseConfig:
    """The thresholds, with the cap on monthly eligible spend of the city policy in force
    at `at_us` as the book recorded it (files and API alike): where its components' last
    bands end, the largest (DOMAIN.md: 30만 until 2025-09, 50만 from 2025-10); none when
    one is open-ended (no spend is near a cap). A book that records no city policy (data
    written outside the service) keeps `AbuseConfig`'s. The report had a fixed 30만 and
    flagged a regular who spent 30만 at their shop in a 50만 month as farming near it."""
    from rules.document import BASE_LAYER, PolicyDocument

    config = abuse_mod.AbuseConfig(period_days=period_days)
    p = s.policies
    documents = conn.execute(select(p.c.document).where(p.c.status == "activated", p.c.effective_from_us <= at_us)
                             .order_by(p.c.effective_from_us.desc())).scalars()
    for document in documents:
        policy = PolicyDocument.model_validate_json(document)
        if policy.layer == BASE_LAYER:
            ends = [variant.bands[-1].up_to_won for component in policy.components
                    for variant in component.variants]
            cap = None if not ends or None in ends else max(ends)
            return dataclasses.replace(config, cap_spend_won=cap)
    return config


def month_data(conn: Connection, month: str, *, reconciliation: Reconciliation | None = None,
               with_abuse: bool = True) -> ReportData:
    days = [d.isoformat() for d in month_days(month)]
    flows = _month_flows(conn, month)
    in_month = pl.col("for_business_date").str.starts_with(month)
    stl = [r for r in list_settlements(conn, month=month)]
    abuse = _abuse_report(conn, month_days(month)[0], month_days(month)[-1]) if with_abuse else None
    if reconciliation is None:  # the latest stored run of each day (`eum report --clearing` gives its file's)
        reconciliation = runs.latest_covering(conn, days)
    return ReportData(f"e-eum settlement — {month}", month, days, _settlement_rows(stl),
                      flows["funders"].filter(in_month), month_payouts(conn, month), _budgets(conn, month),
                      reconciliation, abuse, _now(), flows["grants"].filter(in_month),
                      flows["grant_funders"].filter(in_month), budget_burn(flows["funders"], month),
                      flows["operator_cash"].filter(in_month))


def day_data(conn: Connection, business_date: dt.date, *, reconciliation: Reconciliation | None = None,
             with_abuse: bool = True) -> ReportData:
    month = business_date.strftime("%Y-%m")
    day = business_date.isoformat()
    days = [d.isoformat() for d in month_days(month) if d <= business_date]
    flows = _month_flows(conn, month)
    funders = flows["funders"].filter(pl.col("for_business_date").str.starts_with(month),
                                      pl.col("for_business_date") <= day)
    on_day = pl.col("for_business_date") == day
    payouts = month_payouts(conn, month).filter(pl.col("for_business_date") == day)
    stl = [r for r in list_settlements(conn, month=month) if r.business_date == day]
    abuse = _abuse_report(conn, business_date.replace(day=1), business_date) if with_abuse else None
    if reconciliation is None:  # the latest stored run that compared the day
        reconciliation = runs.latest_covering(conn, [day])
    return ReportData(f"e-eum settlement — {day}", day, days, _settlement_rows(stl), funders, payouts,
                      _budgets(conn, month), reconciliation, abuse, _now(), flows["grants"].filter(on_day),
                      flows["grant_funders"].filter(on_day), budget_burn(flows["funders"], month, through=day),
                      flows["operator_cash"].filter(on_day))


def _month_flows(conn: Connection, month: str) -> dict[str, pl.DataFrame]:
    """The stored flows of every business date from the month's first on, read once: the
    month's own, and later dates' clawbacks of its payments (for the budget burn)."""
    return stored_flows(conn, since=f"{month}-01")


def _settlement_rows(results) -> list[dict]:
    return [{"settlement_id": r.settlement_id, "business_date": r.business_date, "status": r.status,
             "kind": r.kind, "payout_date": r.payout_date, "watermark_us": r.watermark_us,
             "failures": [f"{c['name']}: {c['detail']}" for c in r.failures],
             "checks": len(r.checks)} for r in results]


def _now() -> str:
    return dt.datetime.now(dt.timezone(dt.timedelta(hours=9))).isoformat(timespec="seconds")


# ---------------------------------------------------------------- rendering


CSS = """
body{font-family:'Noto Sans KR','Malgun Gothic','Apple SD Gothic Neo',sans-serif;margin:24px;color:#222;max-width:1000px}
h1{font-size:22px}h2{font-size:17px;margin-top:32px;border-bottom:1px solid #ccc;padding-bottom:4px}
table{border-collapse:collapse;font-size:12px;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 7px;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
th{background:#eef2f8}.ok{color:#1d7a35;font-weight:bold}.bad{color:#b3261e;font-weight:bold}
.kpi{display:inline-block;margin:6px 18px 6px 0}.kpi b{display:block;font-size:18px}
.note{color:#666;font-size:12px}
"""


def _table(frame: pl.DataFrame, rows_max: int = 50) -> str:
    if frame.height == 0:
        return "<p class='note'>none</p>"
    head = "".join(f"<th>{escape(c)}</th>" for c in frame.columns)
    numeric = [d.is_integer() for d in frame.dtypes]
    body = []
    for row in frame.head(rows_max).iter_rows():
        cells = []
        for value, is_num in zip(row, numeric):
            if value is None:
                cells.append("<td></td>")
            elif is_num:
                cells.append(f"<td class='n'>{value:,}</td>")
            elif isinstance(value, list):
                cells.append(f"<td>{escape(' '.join(map(str, value[:10])))}</td>")
            else:
                cells.append(f"<td>{escape(str(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    more = f"<p class='note'>{frame.height - rows_max:,} more rows not shown</p>" if frame.height > rows_max else ""
    return f"<table><tr>{head}</tr>{''.join(body)}</table>{more}"


def won(value: int) -> str:
    """A headline figure, exact to the won: 1,102,464원 (the charts' 만 labels are floored:
    that figure would read 110만)."""
    return f"{int(value):,}원"


def _kpis(data: ReportData) -> str:
    p = data.payouts
    total = (lambda c: int(p[c].sum()) if p.height else 0)
    f = data.funders
    if len(data.period) == 10:
        f = f.filter(pl.col("for_business_date") == data.period)
    items = [("payments", f"{total('payment_count'):,}"), ("sales", won(total("sales_won"))),
             ("refunds", won(total("refunds_won"))), ("net sales", won(total("net_sales_won"))),
             ("fees", won(total("fee_won"))), ("merchant share", won(total("merchant_share_won"))),
             ("net payable", won(total("net_payable_won"))),
             ("cashback (net)", won(int(f["cashback_net_won"].sum()) if f.height else 0))]
    cash = data.operator_cash
    if cash is not None:  # the operator's cash: in by top-ups, out by withdrawals (what they paid out)
        items += [("top-ups", won(int(cash["topped_up_won"].sum()) if cash.height else 0)),
                  ("withdrawals paid out", won(int(cash["withdrawn_won"].sum()) if cash.height else 0))]
    return "".join(f"<span class='kpi'>{escape(k)}<b>{escape(v)}</b></span>" for k, v in items)


def _status(data: ReportData) -> str:
    if not data.settlements:
        return "<p class='bad'>No settlement run for this period.</p>"
    rows = []
    for r in data.settlements:
        cls = "ok" if r["status"] in SUCCESSFUL else "bad"
        why = "<br>".join(escape(f) for f in r["failures"]) or f"all {r['checks']} checks passed"
        rows.append(f"<tr><td>{escape(r['business_date'])}</td><td>{escape(r['settlement_id'])}</td>"
                    f"<td class='{cls}'>{escape(r['status'])}</td><td>{escape(r['kind'])}</td>"
                    f"<td>{escape(r['payout_date'])}</td><td>{why}</td></tr>")
    return ("<table><tr><th>business date</th><th>settlement</th><th>status</th><th>kind</th><th>payout</th>"
            "<th>checks</th></tr>" + "".join(rows) + "</table>")


def _pivot(f: pl.DataFrame, days: list[str], by: str) -> dict[str, list[int]]:
    if f.height == 0:
        return {}
    g = f.group_by("for_business_date", by).agg(pl.col("cashback_net_won").sum())
    names = (g.group_by(by).agg(pl.col("cashback_net_won").sum()).sort("cashback_net_won", descending=True)[by]
             .to_list())
    lookup = {(d, k): int(v) for d, k, v in g.iter_rows()}
    return {name: [lookup.get((d, name), 0) for d in days] for name in names}


def _funder_charts(data: ReportData) -> str:
    f = data.funders
    if data.period == data.days[-1] and len(data.period) == 10:
        day = f.filter(pl.col("for_business_date") == data.period)
        districts = sorted(set(day["district"].to_list()))
        sources = list(_pivot(f, data.days, "source"))  # the order (and colours) of the chart above
        lookup = {(d, s_): int(v) for d, s_, v in day.group_by("district", "source")
                  .agg(pl.col("cashback_net_won").sum()).iter_rows()}
        by_district = svg.stacked_bars(districts, {s_: [lookup.get((d, s_), 0) for d in districts]
                                                   for s_ in sources},
                                       title=f"Cashback on {data.period} by merchant district, stacked by funder")
    else:
        by_district = svg.stacked_bars([d[5:] for d in data.days], _pivot(f, data.days, "district"),
                                       title="Cashback per day by merchant district")
    by_funder = svg.stacked_bars([d[5:] for d in data.days], _pivot(f, data.days, "source"),
                                 title="Cashback per day by funder (net of clawbacks)")
    # The table is the report's period, as its headline: a day's report tables that day
    # (it tabled the month so far beside the day's headline, 2,112,817 against 2,018,040).
    scope = f.filter(pl.col("for_business_date") == data.period) if len(data.period) == 10 else f
    table = (scope.group_by("source").agg(pl.col("cashback_accrued_won").sum(), pl.col("cashback_clawed_back_won").sum(),
                                          pl.col("cashback_corrected_won").sum(), pl.col("cashback_net_won").sum())
             .sort("cashback_net_won", descending=True) if scope.height else scope)
    return by_funder + by_district + _table(table)


BURN_CHART_LINES = 6  # funders drawn in the burn chart (each with its forecast), when few have limits


def burn(burned: pl.DataFrame, days: list[str], month_days_all: list[str], budgets: list[dict],
         ) -> tuple[dict[str, list[int | None]], dict[str, int], list[dict]]:
    """Net cashback per funder counted against the month's budgets (`service.budget_burn`:
    a refund's clawback of the month's payments counts in the month, on the day it was
    made), cumulative over the days shown, its forecast to month end at the recent daily
    burn (the last 7 days shown, fewer early in the month, floored, none when they gave
    back more than they burned: the rule of
    `ledger.queries.forecast_exhausted_on`, which gives the summary's forecast day, as
    `GET /v1/budgets` does), and the limits; plus a summary per funder: every funder
    that burned or has a limit this month (drawn: see `BURN_CHART_LINES`). The year's
    forecast is `GET /v1/budgets`' own, as of today (`_budgets`)."""
    series: dict[str, list[int | None]] = {}
    limits: dict[str, int] = {}
    summary = []
    month = month_days_all[0][:7]
    by_source = _pivot(burned, days, "source")
    after = (burned.filter(pl.col("for_business_date") > days[-1]).group_by("source")
             .agg(pl.col("cashback_net_won").sum()) if days and burned.height else burned.clear())
    later = {source: int(value) for source, value in after.select("source", "cashback_net_won").iter_rows()}
    limit_of = {b["source"]: b["limit_won"] for b in budgets if b["period"] == month}
    # The year's limits beside the month's (DOMAIN.md: budgets are set per year): what the
    # year row has committed, as `GET /v1/budgets` reads it. A year limit used up read as
    # "no limit" here (the year-end audit). Not drawn: the chart is the month's.
    year_of = {b["source"]: b for b in budgets if b["period"] == month[:4]}
    # Every funder in the table; in the chart each one with a limit and the largest others,
    # up to BURN_CHART_LINES funders (a table of the six largest had hidden a district's
    # limit: the settlement outputs audit).
    sources = sorted(set(by_source) | set(limit_of) | set(year_of),
                     key=lambda source: (-sum(by_source.get(source, ())), source))
    unlimited = [source for source in sources if source not in limit_of]
    charted = set(limit_of) | set(unlimited[:max(0, BURN_CHART_LINES - len(limit_of))])
    for source in sources:
        daily = by_source.get(source, [0] * len(days))
        cumulative, acc = [], 0
        for value in daily:
            acc += value
            cumulative.append(acc)
        spent = acc + later.get(source, 0)  # with later clawbacks of this month's payments
        if cumulative:
            cumulative[-1] = spent
        elapsed = len(daily)
        # The recent burn over the window's days, which end on the last day shown (its
        # cumulative holds later clawbacks of the month's payments too).
        window = burn_window_days(month, dt.date.fromisoformat(days[-1])) if days else 0
        recent = spent - (cumulative[-1 - window] if elapsed > window else 0)
        # Money given back in the window is no burn (`forecast_exhausted_on`'s rule): a week of
        # clawbacks drew the month falling below what it had committed.
        per_day = max(recent // window, 0) if window else 0
        forecast: list[int | None] = [None] * (elapsed - 1) + [spent]
        for i in range(elapsed, len(month_days_all)):
            forecast.append(spent + per_day * (i - elapsed + 1))
        limit = limit_of.get(source)
        if source in charted:
            series[source] = cumulative + [None] * (len(month_days_all) - elapsed)
            series[f"{source} forecast"] = forecast
            if limit is not None:
                limits[source] = limit
        exhausted = (forecast_exhausted_on(month, limit, spent, dt.date.fromisoformat(days[-1]), recent_won=recent)
                     if days else None)
        year = year_of.get(source)
        summary.append({"source": source, "spent_won": spent, "per_day_won": per_day,
                        "month_end_forecast_won": forecast[-1] if forecast else spent, "limit_won": limit,
                        "forecast_exhausted_on": exhausted,
                        "year_limit_won": year["limit_won"] if year else None,
                        "year_committed_won": year["committed_won"] if year else None,
                        # as GET /v1/budgets forecasts it, today: none once the year is over
                        "year_forecast_exhausted_on": (forecast_exhausted_on(month[:4], year["limit_won"],
                                                                             year["committed_won"],
                                                                             dt.date.fromisoformat(year["as_of"]),
                                                                             recent_won=year["recent_won"])
                                                       if year else None)})
    return series, limits, summary


def _burn_chart(data: ReportData) -> str:
    all_days = [d.isoformat() for d in month_days(data.days[0][:7])]
    seen = data.funders["for_business_date"].to_list() + [r["business_date"] for r in data.settlements]
    last = max(seen, default=data.days[0])
    burned = data.budget_burn if data.budget_burn is not None else data.funders
    series, limits, summary = burn(burned, [d for d in data.days if d <= last], all_days, data.budgets)
    chart = svg.lines([d[5:] for d in all_days], series, title="Budget burn: cumulative cashback, forecast, limit",
                      dashed={k for k in series if k.endswith("forecast")}, limits=limits)
    years = any(row["year_limit_won"] is not None for row in summary)
    note = "" if limits else ("<p class='note'>No monthly budget limit is set for these funders"
                              + ("; their year limits are in the table.</p>" if years else ".</p>"))
    schema = {"source": pl.String, "spent_won": pl.Int64, "per_day_won": pl.Int64,
              "month_end_forecast_won": pl.Int64, "limit_won": pl.Int64, "forecast_exhausted_on": pl.String,
              "year_limit_won": pl.Int64, "year_committed_won": pl.Int64, "year_forecast_exhausted_on": pl.String}
    return chart + note + _table(pl.DataFrame(summary, schema=schema))


def top_merchants(payouts: pl.DataFrame, n: int = TOP_MERCHANTS) -> pl.DataFrame:
    if payouts.height == 0:
        return payouts
    return (payouts.group_by("merchant_id").agg(
        pl.col("payment_count").sum(), pl.col("sales_won").sum(), pl.col("refunds_won").sum(),
        pl.col("net_sales_won").sum(), pl.col("fee_won").sum(), pl.col("merchant_share_won").sum(),
        pl.col("net_payable_won").sum()).sort(["net_sales_won", "merchant_id"], descending=[True, False]).head(n))


def _merchants(data: ReportData) -> str:
    top = top_merchants(data.payouts)
    if top.height == 0:
        return "<p class='note'>none</p>"
    chart = svg.hbars(top["merchant_id"].to_list(), top["net_sales_won"].to_list(),
                      title=f"Top {top.height} merchants by net sales")
    return chart + _table(top)


def readable(frame: pl.DataFrame) -> pl.DataFrame:
    """A reconciliation's rows for people: each time as RFC 3339 (Seoul) in place of its
    integer microseconds (which the files and the API keep)."""
    frame = with_readable_times(frame)
    return frame.drop([c for c in READABLE_TIMES if c in frame.columns])


def _reconciliation(data: ReportData) -> str:
    r = data.reconciliation
    if r is None:
        return "<p class='note'>No clearing file reconciled for this report.</p>"
    counts = r.counts()
    head = "".join(f"<span class='kpi'>{escape(k)}<b>{v:,}</b></span>" for k, v in counts.items())
    parts = [head]
    if r.runs:  # stored runs (settlement.runs): which, by whom, of which file
        parts.append(_table(pl.DataFrame([{"reconciliation_id": run["reconciliation_id"],
                                           "business_dates": run["business_dates"], "run_by": run["run_by"],
                                           "created_at": run["created_at"], "file_sha256": run["file_sha256"],
                                           "file_bytes": run["file_bytes"],
                                           "exceptions": sum(n for k, n in run["counts"].items() if k != "matched")}
                                          for run in r.runs]), len(r.runs)))
    for name in CATEGORIES:
        if name == "matched" or counts[name] == 0:
            continue
        # Stored runs (settlement.runs) bring a category's first rows only, so the rows not
        # shown are counted from `counts`, not from the frame.
        frame = r.frames[name].head(EXCEPTION_ROWS_MAX)
        rest = ("" if frame.height >= counts[name] else
                f"<p class='note'>{counts[name] - frame.height:,} more rows not shown (a stored run's rows: GET "
                "/v1/reconciliations/{id}; every row: eum reconcile FILE --out)</p>")
        parts.append(f"<h3>{escape(name)} ({counts[name]:,})</h3>{_table(readable(frame), EXCEPTION_ROWS_MAX)}{rest}")
    return "".join(parts)


def _abuse_section(data: ReportData) -> str:
    if data.abuse is None:
        return "<p class='note'>Not computed.</p>"
    return ("<h3>Members</h3>" + _table(data.abuse.members, 30) + "<h3>Merchants</h3>"
            + _table(data.abuse.merchants, 30))


def _grants_section(data: ReportData) -> str:
    """Per program and funder: money put in, money returned, net; per program: what
    members received, spent, had restored, and what expired."""
    gf, g = data.grant_funders, data.grants
    if (gf is None or gf.height == 0) and (g is None or g.height == 0):
        return "<p class='note'>No grant money moved in this period.</p>"
    by_funder = (gf.group_by("program_id", "source").agg(pl.col(c).sum() for c in
                                                         ("grant_funded_won", "grant_returned_won", "grant_net_won"))
                 .sort("program_id", "source")
                 .rename({"grant_funded_won": "funded_won", "grant_returned_won": "returned_won",
                          "grant_net_won": "net_won"})) if gf is not None else pl.DataFrame()
    per_source = (by_funder.group_by("source").agg(pl.col("net_won").sum()).sort("source")
                  if by_funder.height else by_funder)
    kpis = "".join(f"<span class='kpi'>{escape(r['source'])} (net)<b>{escape(won(r['net_won']))}</b></span>"
                   for r in per_source.iter_rows(named=True))
    columns = ("disbursed_won", "spent_won", "restored_won", "expired_won", "returned_to_funders_won")
    by_program = (g.group_by("program_id").agg(pl.col(c).sum() for c in columns).sort("program_id")
                  if g is not None else pl.DataFrame())
    return (kpis + "<p class='note'>Each funder's money in each program: put in by disbursements, returned "
            "by expiries and by refunds after a program ended.</p>" + _table(by_funder)
            + "<p class='note'>Members' grant money by program.</p>" + _table(by_program))


def render(data: ReportData) -> str:
    sections = [
        ("Settlement", _status(data) + _kpis(data)),
        ("Cashback by funder and district", _funder_charts(data)),
        ("Grant programs", _grants_section(data)),
        ("Budget burn", _burn_chart(data)),
        ("Top merchants", _merchants(data)),
        ("Reconciliation exceptions", _reconciliation(data)),
        ("Cashing-out (깡) and abuse", _abuse_section(data)),
    ]
    body = "".join(f"<h2>{escape(t)}</h2>{html}" for t, html in sections)
    return (f"<!DOCTYPE html><html lang='ko'><head><meta charset='utf-8'><title>{escape(data.title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{escape(data.title)}</h1>"
            f"<p class='note'>Generated {escape(data.generated_at)}. Money in won, exact; chart labels in"
            " 만 = 10,000 and 억 = 100,000,000, floored."
            f"</p>{body}</body></html>")
