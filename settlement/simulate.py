"""Simulation and corrections over the book of record: recorded payments re-evaluated
under another policy with the vectorised evaluator (`rules.simulate`), reported beside
what was paid.

    simulate(conn_or_engine, policy, from_us, to_us, actual_timeline=None) -> dict (JSON-able)
        (reads narrow and evaluates one member group at a time: `_simulate_streamed`)
    corrections(conn_or_engine, wrong, right, from_us, to_us) -> [(member_id, delta_won, by_funder)]
    correction_plan(...) -> CorrectionPlan (per member-month, by funder and component)
        (reads and evaluates one member group at a time: `MemberGroup`, PLAN_GROUP_ROWS)

Read-only: nothing here writes to the book; posting a correction is a separate step
(second-person approval, `ledger.commands.Correct`).

Choices, and why:
- What is re-evaluated: the approved payments whose occurred_at is in [from, to), with
  their recorded spend split, each member's in the order the book recorded them
  (`BOOK_ORDER`), as it paid them: a simulation's (`_in_book_order`) and a
  correction's plan, the plan also with the payments before `from` of the month that
  the book recorded after the range's first (`_recorded_late`); a simulation leaves
  those in the month's start. Members' and
  merchants' facts (districts, sales, category, flags, share) are each payment's as the
  registry stood when the book recorded it (`recorded_at_us`): the fact versions the
  registry writes append (`member_facts`, `merchant_facts`, migration 0022), the one
  valid at or before that time (`_fact_versions`, `_as_of`). A payment recorded in
  the very microsecond of a registry write is taken as judged by the new version; a
  batch that read a merchant just before its write committed but was stamped after the
  write's time (merchants are read unlocked) was judged by the old one, and is counted
  in `recorded_mismatch_payments` where that changes its cashback. Payments recorded
  before 0022 are judged by the registry as it stood at the upgrade (versions from 0).
- Starting state: a member's month as of `from` is the state of their payments
  earlier in that month (but those `_recorded_late`) as the book holds it: eligible
  spend less refunded base, and the cashback (in total and per component) each payment
  holds now, as its member-month's counters do. That is its recorded cashback net of
  its refunds' clawbacks, or, for a payment a posted correction re-based, its
  corrected parts less what refunds took back of them (`ledger.book.cashback_held`;
  `_held`); its eligible spend is its base as corrections re-based it (`base_won`,
  `counts_toward_month` and refunded base). The policy under test takes over at
  `from`; what happened before it is history. (Before, a correction's cashback was left out of the start: a correction
  of a month's rest under a monthly cap, after one of its first half, saw the cap room
  the first half had before it was corrected.)
- Refunds ("net payment" model): a payment is re-evaluated on what is left of it, the
  spend split less what its refunds restored (the refund state, per balance), as if the
  refunded part had never been spent. A fully refunded payment costs nothing and does
  not count toward the month, as the book ends up. The book, though, counted the whole
  payment until the refund's occurred_at and clawed back floor(funded × refunded base /
  base) then; so a member who paid again in between, near a band's end or a cap, got
  a little less band room in the book than re-evaluation gives. Measured on a generated
  book (3% of payments refunded, tests/test_simulate.py): the policy that recorded it,
  re-evaluated, reproduces every payment without refunds exactly; with refunds, 47 of
  400 members differed (+0.4% of the cashback), every one of them with a refund. The
  alternative, refunds as dated events with draft-policy clawbacks, makes the caps'
  running sums non-monotone (no closed form); not worth it for a cost estimate.
- Actual = held: what each payment holds, as the start counts it (its cashback and
  lines' `funded_by` net of the clawbacks recorded in the refund state, per line and
  funder, or a re-based payment's corrected parts), so that a simulation compares with
  what its members and funders have, the months it starts from agreeing. Budgets cut
  what the book paid (partial/skip); the simulation applies no budget, so its figures
  are cost without limits. Pass `actual_timeline` to compare against the policies in
  force re-evaluated by the same model: differences are then the policy's alone (0
  members affected when the draft equals the policy in force), which is what the
  "members affected" figure should be read against; the totals held and as recorded
  (`Loaded.recorded`: net of refunds' clawbacks, a posted correction's parts not
  counted, as the original lines would have clawed back) are reported beside.
- Corrections compare the right policy with the wrong one, both re-evaluated on the
  same payments and starting state (right − wrong), per payment by component and
  funder (summed per member-month for the lines), not with the recorded amounts: a
  member untouched by the slip gets exactly 0, whatever budgets, partial refunds or the
  order of recording did to the recorded figures. Payments where the wrong policy's
  re-evaluation differs from what they hold (as recorded, or as a posted correction
  left them) are counted and logged (`recorded_mismatch_payments`) so an approver sees
  when the two diverge. The wrong
  policy is each member-month's timeline as its corrections left it (`PriorCorrection`:
  each approved one's right policy over its own range, in the order they took effect,
  but not one whose line for it did not post), and the right policy is drafted over the
  range on top of it. A payment a posted correction already re-based (read apart:
  `_corrected_in_range`) that the right policy gives other than that timeline is
  planned from what it holds (right − held), and so is one recorded since a
  correction over it was planned (`_paid_after_corrections`: paid by the policies
  activated, not as corrected, and those of its member-month recorded after it); so
  the same correction proposed again plans nothing, and after each correction every
  payment holds what the timeline as corrected gives it (docs/design.md,
  "Corrections"). Each planned payment also carries the right policy's base (counts
  toward the month, the balances that earn cashback), which posting re-bases it on; a
  payment whose base or counting the two policies give differently is planned
  whatever its cashback. A correction's plan reads on to the
  end of `to`'s month (`rest_of_month`): the payments after the range are re-evaluated
  under the policy then in force, from where the range left their month.
"""

from __future__ import annotations

import datetime as dt
import io
import zlib
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Iterator

import orjson
import polars as pl
import structlog
from sqlalchemy import BigInteger, Connection, Engine, Integer, cast, or_, select
from sqlalchemy import literal as sa_literal
from sqlalchemy import func as sa_func
from sqlalchemy.sql import Select

from ledger import schema as s
from ledger.errors import CorrectionTooLarge, RangeTooLarge
from rules.compiled import CompiledPolicy, PolicyTimeline
from rules.evaluate import DECLINE_INSUFFICIENT_FUNDS
from rules.grants import GrantProgramDocument
from rules.simulate import (EPOCH_ORDINAL, SEOUL_OFFSET_US, US_PER_DAY, Evaluation, MonthStart, evaluate_frame,
                            month_key, month_key_of, month_text)
from rules.timeutil import local_date, local_midnight_us, rfc3339
from settlement.points_model import PointsFeedback, evaluate_with_points

log = structlog.get_logger("settlement.simulate")

PAYMENTS_MAX = 25_000_000  # a month at Incheon scale is ~20 million
FETCH_ROWS = 20_000
READ_CHUNK_ROWS = 1_000_000  # payments per chunk of the bulk read
MEMBER_DIFFERENCES_MAX = 1_000
TIERS = (("le_3eok", 300_000_000), ("3_to_30eok", 3_000_000_000), ("gt_30eok", None))  # ≤3억, 3–30억, >30억
BUDGET_NOTE = "budgets not applied: the simulation reports what the policy would cost without budget limits"

Policy = CompiledPolicy | PolicyTimeline


@dataclass(frozen=True)
class Costs:
    """Cashback per payment row, and in total per component and per funder."""

    payments: pl.DataFrame  # row, cashback_won
    by_component: pl.DataFrame  # component_id, amount_won
    by_funder: pl.DataFrame  # source, amount_won


def _totals(frame: pl.DataFrame, key: str) -> pl.DataFrame:
    return (frame.group_by(key).agg(pl.col("amount_won").sum())
            .select(pl.col(key).cast(pl.String), pl.col("amount_won").cast(pl.Int64)))


def costs_of(evaluation: Evaluation) -> Costs:
    return Costs(evaluation.payments.select("row", "cashback_won"),
                 _totals(evaluation.lines, "component_id"), _totals(evaluation.funding, "source"))


@dataclass(frozen=True)
class Loaded:
    """A range of the book, ready to evaluate: `payments` in `rules.simulate` form (row
    = position), the months' state as of `from`, and what was recorded for each row and
    what it holds now (they differ for a payment a posted correction re-based)."""

    payments: pl.DataFrame
    start: MonthStart
    recorded: Costs  # as recorded, net of refunds' clawbacks (posted corrections not counted)
    held: Costs  # what each row holds now: `recorded`, or a re-based payment's `ledger.book.cashback_held`
    recorded_policy_ids: dict[str, int]
    refunded_payments: int
    row_reader_payments: int = 0  # payments (in range or before) whose JSON was parsed one by one


# ---------------------------------------------------------------- reading the book


@contextmanager
def _connection(conn_or_engine: Connection | Engine) -> Iterator[Connection]:
    if isinstance(conn_or_engine, Connection):
        yield conn_or_engine
        return
    with conn_or_engine.execution_options(readonly=True).connect() as conn:
        yield conn


def _cashback_programs(conn: Connection) -> set[str]:
    rows = conn.execute(select(s.grant_programs.c.program_id, s.grant_programs.c.document))
    return {pid for pid, doc in rows if GrantProgramDocument.model_validate_json(doc).cashback_on_spend}


def _too_many(payments_max: int) -> RangeTooLarge:
    """Found while reading: the bound below the one `payments_at_most` checks first (an
    API worker's) or the simulator's own, `PAYMENTS_MAX`, for a caller that counted none."""
    return RangeTooLarge(f"more than {payments_max:,} payments in the range; simulate a shorter range",
                         payments_max=payments_max)


def payments_at_most(conn: Connection, from_us: int, to_us: int, limit: int) -> int:
    """The payments with `occurred_at` in [from, to), approved or declined, counted up to
    `limit` + 1 and no further: an index-only scan of `ix_payments_occurred` that stops
    there, so a year's range costs no more to refuse than the bound's count (declines
    are counted too: the index alone cannot tell them apart, and they are few)."""
    p = s.payments
    within = (select(sa_literal(1).label("one"))
              .where(p.c.occurred_at_us >= from_us, p.c.occurred_at_us < to_us).limit(limit + 1).subquery())
    return int(conn.execute(select(sa_func.count()).select_from(within)).scalar_one())


def refuse_range_over(conn: Connection, from_us: int, to_us: int, payments_max: int, *, job: str,
                      advice: str) -> None:
    """422 `range_too_large` before anything is read, when [from, to) holds more than
    `payments_max` payments: what an API worker would otherwise hold in memory beside
    the payment path (docs/performance.md, Simulation)."""
    if payments_at_most(conn, from_us, to_us, payments_max) > payments_max:
        raise RangeTooLarge(f"the range holds more than {payments_max:,} payments, more than a {job} in the "
                            f"service reads at once; nothing was done: {advice}", payments_max=payments_max)


def _month_start_us(at_us: int) -> int:
    day = local_date(at_us)
    return local_midnight_us(dt.date(day.year, day.month, 1))


def months_spanned(from_us: int, to_us: int) -> tuple[int, int]:
    """The start of `from`'s month and the end of the month of the instant before `to`."""
    return _month_start_us(from_us), _month_end_us(to_us)


def _month_end_us(at_us: int) -> int:
    """The start of the month after the instant before `at_us` (`at_us` itself at a month's start)."""
    day = local_date(at_us - 1)
    return local_midnight_us(dt.date(day.year + day.month // 12, day.month % 12 + 1, 1))


@dataclass(frozen=True)
class MemberGroup:
    """One of `groups` disjoint sets of members, by a hash of the member id that the
    database computes in each read's WHERE, so a read of the group never sends the
    other members' rows (a correction's plan, read one group at a time:
    `correction_plan`). PostgreSQL: `hashtext` of the id; SQLite: CRC-32 of its UTF-8
    bytes, a function registered on the connection the read runs on (`_in_group`).
    Either is fixed for an id, so every read of one plan puts a member in one group."""

    group: int
    groups: int

    def __post_init__(self) -> None:
        assert 0 <= self.group < self.groups, (self.group, self.groups)


MEMBER_GROUP_SQL = "eum_member_group"  # SQLite: the function `_in_group` registers


def _member_group_of(member_id: str, groups: int) -> int:
    return zlib.crc32(member_id.encode()) % groups


def _in_group(conn: Connection, column, member_group: MemberGroup):
    """The condition that `column` (a member id) is of `member_group`. On PostgreSQL
    `mod(abs(hashtext(id)::bigint), groups)`: hashtext is an int4, whose abs overflows
    at -2³¹ as an int4; and `mod()`, not `%`, which a statement compiled with its
    values in it (`read_frames`' COPY) would double for the driver's placeholders."""
    if conn.dialect.name == "postgresql":
        return sa_func.mod(sa_func.abs(cast(sa_func.hashtext(column), BigInteger)),
                           member_group.groups) == member_group.group
    # Each time: a pooled connection may be new; registering again replaces it.
    conn.connection.driver_connection.create_function(MEMBER_GROUP_SQL, 2, _member_group_of, deterministic=True)
    return getattr(sa_func, MEMBER_GROUP_SQL)(column, member_group.groups) == member_group.group


def _of_group(conn: Connection, stmt: Select, column, member_group: MemberGroup | None) -> Select:
    """`stmt`, of `member_group`'s members only when there is one."""
    return stmt if member_group is None else stmt.where(_in_group(conn, column, member_group))


@dataclass
class _Reader:
    """Columns of the in-range payments and the starting state, filled row by row."""

    cashback_programs: set[str]
    from_us: int
    cols: dict[str, list] = field(default_factory=lambda: defaultdict(list))
    rec_components: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    rec_funders: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    held_components: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    held_funders: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    start_months: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    start_components: dict[tuple[str, int, str], int] = field(default_factory=lambda: defaultdict(int))
    policy_ids: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    refunded: int = 0
    late: set[str] = field(default_factory=set)  # before `from`, evaluated with the range (`_recorded_late`)

    def add(self, r) -> None:
        detail = orjson.loads(r.detail)
        state = orjson.loads(r.refund_state or "{}")
        clawed: dict[str, int] = state.get("clawed", {})
        lines = []  # (component_id, [(source, net)])
        for index, line in enumerate(detail["lines"]):
            lines.append((line["component_id"], [(source, amount - clawed.get(f"{index}/{source}", 0))
                                                 for source, amount in line["funded_by"]]))
        cashback = r.cashback_won - sum(clawed.values())
        held = _held(detail, state, cashback, lines)
        if r.occurred_at_us < self.from_us and r.payment_id not in self.late:
            self._start(r, state, *held)
        else:
            self._in_range(r, detail, state, cashback, lines, held)

    def _start(self, r, state: dict, cashback: int, lines) -> None:
        """The month as of `from`: what the payment holds (`_held`), and its base."""
        key = (r.member_id, month_key(r.month))
        month = self.start_months.setdefault(key, [0, 0])
        if r.counts_toward_month:
            month[0] += r.base_won - state.get("base", 0)
        month[1] += cashback
        for component_id, parts in lines:
            self.start_components[(*key, component_id)] += sum(amount for _, amount in parts)

    def _in_range(self, r, detail: dict, state: dict, cashback: int, lines, held: tuple[int, list]) -> None:
        spent = detail["spent"]
        grants_done: dict[str, int] = state.get("grants", {})
        grants = grant_cashback = 0
        for program_id, amount in spent["grants"]:
            left = amount - grants_done.get(program_id, 0)
            grants += left
            if program_id in self.cashback_programs:
                grant_cashback += left
        c = self.cols
        for name, value in (("payment_id", r.payment_id), ("member_id", r.member_id),
                            ("member_district", r.member_district), ("merchant_id", r.merchant_id),
                            ("merchant_district", r.merchant_district), ("category", r.category),
                            ("annual_sales_won", r.annual_sales_won),
                            ("flags", [f for f in r.flags.split(",") if f]),
                            ("merchant_share_bp", r.merchant_share_bp), ("amount_won", r.amount_won),
                            ("occurred_at_us", r.occurred_at_us),
                            ("spent_charged_won", spent["charged"] - state.get("charged", 0)),
                            ("spent_points_won", spent["points"] - state.get("points", 0)),
                            ("spent_grants_won", grants), ("grant_cashback_won", grant_cashback),
                            ("recorded_cashback_won", cashback), ("held_cashback_won", held[0])):
            c[name].append(value)
        self.policy_ids[r.policy_id or ""] += 1
        self.refunded += r.refunded_won > 0
        for lines_, components, funders in ((lines, self.rec_components, self.rec_funders),
                                            (held[1], self.held_components, self.held_funders)):
            for component_id, parts in lines_:
                components[component_id] += sum(amount for _, amount in parts)
                for source, amount in parts:
                    funders[source] += amount

    def loaded(self) -> Loaded:
        int_cols = ("annual_sales_won", "merchant_share_bp", "amount_won", "occurred_at_us", "spent_charged_won",
                    "spent_points_won", "spent_grants_won", "grant_cashback_won", "recorded_cashback_won",
                    "held_cashback_won")
        schema = {name: pl.String for name in ("payment_id", "member_id", "member_district", "merchant_id",
                                               "merchant_district", "category")}
        schema |= {name: pl.Int64 for name in int_cols} | {"flags": pl.List(pl.String)}
        frame = pl.DataFrame({name: self.cols.get(name, []) for name in schema}, schema=schema)
        rows = pl.int_range(pl.len(), dtype=pl.UInt32).alias("row")
        recorded, held = (Costs(frame.select(rows, pl.col(column).alias("cashback_won")),
                                _frame(components, "component_id"), _frame(funders, "source"))
                          for column, components, funders in (
                              ("recorded_cashback_won", self.rec_components, self.rec_funders),
                              ("held_cashback_won", self.held_components, self.held_funders)))
        months = pl.DataFrame(
            [(m, k, e, cb) for (m, k), (e, cb) in self.start_months.items()],
            schema={"member_id": pl.String, "month_key": pl.Int32, "eligible_spend_won": pl.Int64,
                    "cashback_won": pl.Int64}, orient="row")
        components = pl.DataFrame(
            [(m, k, cid, v) for (m, k, cid), v in self.start_components.items()],
            schema={"member_id": pl.String, "month_key": pl.Int32, "component_id": pl.String,
                    "cashback_won": pl.Int64}, orient="row")
        return Loaded(frame.drop("recorded_cashback_won", "held_cashback_won"), MonthStart(months, components),
                      recorded, held, dict(self.policy_ids), self.refunded)


def _recorded_late(frames: list[pl.DataFrame], from_us: int) -> set[str]:
    """The payments before `from` (in its month) that the book recorded after the first
    of the range's payments of their member-month, or in its batch (`BOOK_ORDER`: a
    backdated payment): it paid them from the band position and cap room those left,
    so a plan re-evaluates them with the range, not as the month's start."""
    before = pl.col("occurred_at_us") < from_us
    pre = pl.concat([frame.filter(before).select("payment_id", "member_id", "recorded_at_us") for frame in frames])
    if pre.is_empty():  # `from` is a month's start
        return set()
    # Those rows are all of `from`'s month: the range's first of it, per member.
    in_month = (pl.col("occurred_at_us") >= from_us) & (pl.col("occurred_at_us") < _month_end_us(from_us))
    first = (pl.concat([frame.filter(in_month).select("member_id", "recorded_at_us") for frame in frames])
             .join(pre.select("member_id").unique(), on="member_id", how="semi")
             .group_by("member_id").agg(pl.col("recorded_at_us").min().alias("first_recorded_us")))
    # Those of the first's batch too: where in it each was paid, BOOK_ORDER tells.
    late = pre.join(first, on="member_id").filter(pl.col("recorded_at_us") >= pl.col("first_recorded_us"))
    return set(late["payment_id"].to_list())


def _held(detail: dict, state: dict, cashback: int, lines: list) -> tuple[int, list]:
    """What a payment holds now, as (cashback, [(component_id, [(source, won), ...]), ...]):
    its recorded `cashback` and `lines` net of its refunds' clawbacks, or, for one a posted
    correction re-based, its corrected parts less what refunds took back of them
    (`ledger.book.cashback_held`), as its member-month's counters and funders have it."""
    if "corrected" not in state:
        return cashback, lines
    from ledger.book import cashback_held

    by_component: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for (component_id, source), won in cashback_held(detail, state).items():
        by_component[component_id].append((source, won))
    return sum(won for parts in by_component.values() for _, won in parts), list(by_component.items())


def load_range(conn: Connection, from_us: int, to_us: int, *, payments_max: int = PAYMENTS_MAX,
               chunk_rows: int = READ_CHUNK_ROWS, recorded_late: bool = True,
               member_group: MemberGroup | None = None) -> Loaded:
    """The approved payments of [from, to) and, for the starting state, those earlier in
    `from`'s month (but those `_recorded_late`, read with the range); with the member's
    and merchant's facts as the registry had them when the book recorded each
    (`_fact_versions`); in the order the book recorded them (`BOOK_ORDER`); with
    `recorded_late=False` as a simulation reads it (`_read_compact`,
    each member's payments in the same order): the month's start all of its payments
    before `from`.

    Read in bulk and columnar, streamed in chunks (PostgreSQL: one COPY; SQLite: one
    cursor), and each chunk's JSON detail is taken apart with vectorised string
    operations instead of being parsed row by row, relying on its one writer
    (`Book._pay`: compact orjson, fixed key order):
    - spent: `"grants":[]` and `"points":0` are literal tests; points and charged of
      the other rows one regex, grant pairs another (both on those rows only);
    - lines: only their totals are needed (by component, by funder; per member-month
      before `from`), so each distinct `"lines":…` text is parsed once, given a small
      integer, and the payments carry that integer instead of the text;
    - refunded payments (a refund state to net out, ~3%), payments a posted
      correction re-based (their state's `corrected`: what they hold, `_held`) and any
      detail of another shape are kept whole and parsed one by one (`_refunded_rows`,
      the row reader's arithmetic in a tight loop).
    Only the chunk's text is alive at a time. Equal to `load_range_rows`
    (tests/test_simulate_read.py). With `member_group`, the payments and the member
    facts of that group's members only (`MemberGroup`; the merchants' whole)."""
    if not from_us < to_us:
        raise ValueError("the range needs from < to")
    p = s.payments
    query = (
        select(p.c.payment_id, p.c.member_id, p.c.merchant_id, p.c.amount_won, p.c.occurred_at_us, p.c.month,
               p.c.policy_id, p.c.base_won, cast(p.c.counts_toward_month, Integer).label("counts"),
               p.c.cashback_won, p.c.detail, p.c.refunded_won, p.c.refund_state, p.c.recorded_at_us)
        .where(p.c.status == "approved", p.c.occurred_at_us >= _month_start_us(from_us), p.c.occurred_at_us < to_us)
    )
    query = _of_group(conn, query, p.c.member_id, member_group)
    with _arrow_connection(conn) as arrow:  # one connection for the three reads
        # The registry's facts as each payment was recorded (`_fact_versions`), looked up
        # here rather than per row in the database.
        lookups = [_dated_facts(by, versions) for by, versions in zip(("member_id", "merchant_id"),
                                                                       _fact_versions(conn, arrow,
                                                                                      member_group=member_group))]

        def with_facts(frame: pl.DataFrame) -> pl.DataFrame:
            for dated in lookups:
                frame = dated(frame)
            return frame

        cashback_programs = _cashback_programs(conn)
        lines = _LineTexts()
        plain_parts, other_parts = [], []
        in_range = pl.col("occurred_at_us") >= from_us
        count = 0
        for chunk in read_frames(conn, query, READ_SCHEMA, chunk_rows, arrow):
            chunk = chunk.with_columns(pl.col("policy_id").fill_null(""), pl.col("refund_state").fill_null("{}"))
            chunk = chunk.with_columns(_plain().alias("plain"))
            count += chunk.filter(in_range).height
            if count > payments_max:
                raise _too_many(payments_max)
            other_parts.append(chunk.filter(~pl.col("plain")))
            plain = chunk.filter("plain").with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("idx"))
            plain = plain.join(_plain_spent(plain, cashback_programs), on="idx", how="left")
            plain = plain.with_columns(
                pl.col("detail").str.slice(pl.col("detail").str.find('"lines":', literal=True)).alias("lines"))
            plain_parts.append(lines.number(plain).drop("detail", "refund_state", "lines", "idx", "plain"))
            del chunk, plain
    plain = pl.concat(plain_parts) if plain_parts else None
    if not other_parts:  # no rows: the read yields no chunk at all
        other_parts.append(pl.DataFrame(schema={**READ_SCHEMA, "plain": pl.Boolean}))
    other = with_facts(pl.concat(other_parts)).sort(*RECORDED_ORDER)
    del plain_parts, other_parts
    if plain is None:
        plain = other.head(0).drop("detail", "refund_state", "plain").with_columns(
            *[pl.lit(0, pl.Int64).alias(c) for c in SPENT_COLUMNS], pl.lit(0, pl.Int32).alias("lines_id"))
    else:
        plain = with_facts(plain)
    late = _recorded_late([plain, other], from_us) if recorded_late else set()
    if late:  # payments before `from` the book paid after the range's first of their month
        in_range = in_range | pl.col("payment_id").is_in(sorted(late))

    reader = _refunded_rows(other, from_us, cashback_programs, late=late)  # refunded payments: one by one
    line_components, line_funders = lines.frames()
    # (One copy of the month's rows alive at a time: earlier rows reduced first.)
    key = pl.col("month").str.slice(0, 4).cast(pl.Int32) * 100 + pl.col("month").str.slice(5, 2).cast(pl.Int32)
    pre = plain.filter(~in_range).select("member_id", "month", "base_won", "counts", "cashback_won", "lines_id")
    pre = pre.with_columns(key.alias("month_key"))
    pre_months = pre.group_by("member_id", "month_key").agg(
        (pl.col("base_won") * pl.col("counts")).sum().alias("eligible_spend_won"), pl.col("cashback_won").sum())
    pre_components = (pre.select("member_id", "month_key", "lines_id").join(line_components, on="lines_id")
                      .group_by("member_id", "month_key", "component_id")
                      .agg(pl.col("amount_won").sum().alias("cashback_won")))
    del pre
    plain = plain.filter(in_range)
    rec_components, rec_funders = dict(reader.rec_components), dict(reader.rec_funders)
    held_components, held_funders = dict(reader.held_components), dict(reader.held_funders)
    counts = plain.group_by("lines_id").len()
    for key, table, intos in (("component_id", line_components, (rec_components, held_components)),
                              ("source", line_funders, (rec_funders, held_funders))):
        sums = counts.join(table, on="lines_id").group_by(key).agg((pl.col("amount_won") * pl.col("len")).sum())
        for name, amount in sums.iter_rows():
            for into in intos:  # a payment with no refund state holds what was recorded
                into[name] = into.get(name, 0) + int(amount)

    # The in-range rows: the plain ones vectorised, the others as the row reader made them.
    columns = ["payment_id", "member_id", "member_district", "merchant_id", "merchant_district", "category",
               "annual_sales_won", "flags", "merchant_share_bp", "amount_won", "occurred_at_us", "recorded_at_us"]
    policy_ids = dict(reader.policy_ids)
    for policy_id, n in plain.group_by("policy_id").len().iter_rows():
        policy_ids[policy_id] = policy_ids.get(policy_id, 0) + n
    refunded = reader.refunded + int((plain["refunded_won"] > 0).sum())
    plain_rows = plain.select(*columns, *SPENT_COLUMNS, pl.col("cashback_won").alias("recorded_cashback_won"),
                              pl.col("cashback_won").alias("held_cashback_won"))
    del plain
    other_rows = other.filter(in_range).select(columns).hstack(reader.spent)
    rows = pl.concat([plain_rows, other_rows.cast(plain_rows.schema)])
    del plain_rows
    rows = _batch_positions(conn, rows).sort(*BOOK_ORDER).drop("batch_txn")
    rows = rows.with_columns(pl.col("flags").str.split(",").list.eval(pl.element().filter(pl.element() != "")))
    payments = rows.select([c for c in columns if c not in ("flags", "recorded_at_us")] + SPENT_COLUMNS
                           + ["flags"])  # the row reader's order
    recorded, held = (Costs(rows.select(pl.int_range(pl.len(), dtype=pl.UInt32).alias("row"),
                                        pl.col(column).alias("cashback_won")),
                            _frame(components, "component_id"), _frame(funders, "source"))
                      for column, components, funders in (
                          ("recorded_cashback_won", rec_components, rec_funders),
                          ("held_cashback_won", held_components, held_funders)))
    del rows

    # The months' state as of `from`: plain earlier rows vectorised, plus the row reader's.
    months = pl.concat([
        pre_months, reader.start.months.select("member_id", "month_key", "eligible_spend_won", "cashback_won"),
    ]).group_by("member_id", "month_key").agg(pl.col("eligible_spend_won", "cashback_won").sum())
    components = pl.concat([
        pre_components, reader.start.components.select("member_id", "month_key", "component_id", "cashback_won"),
    ]).group_by("member_id", "month_key", "component_id").agg(pl.col("cashback_won").sum())
    return Loaded(payments, MonthStart(months.sort("member_id", "month_key"),
                                       components.sort("member_id", "month_key", "component_id")),
                  recorded, held, policy_ids, refunded, other.height)


SPENT_COLUMNS = ["spent_charged_won", "spent_points_won", "spent_grants_won", "grant_cashback_won"]

# ---------------------------------------------------------------- the registry's facts as each payment was recorded

FIRST_US = -(2 ** 63)  # a merchant's or member's first version: valid from the start of time


def _first_version(by: str) -> pl.Expr:
    """True on each entity's first row of its versions, which come sorted by `by` (the
    entity's id) and `valid_from_us` (`_fact_versions`)."""
    return (pl.col(by) != pl.col(by).shift(1)).fill_null(True)


def _entity_code(by: str) -> pl.Expr:
    """Each version's entity as an integer code, 0, 1, ... in the versions' order: the
    entity's position among the ids, as the payments' codes are made."""
    return (_first_version(by).cum_sum() - 1).cast(pl.UInt32)


def _fact_versions(conn: Connection, arrow=None, key: Callable | None = None, key_type: pl.DataType = pl.String,
                   *, member_group: MemberGroup | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The members' and merchants' fact versions (`member_facts`, `merchant_facts`,
    migration 0022), each frame sorted by id and `valid_from_us`, in the names the
    evaluator reads (MEMBER_SCHEMA, MERCHANT_SCHEMA), and with `key` (an id column's
    key, labelled "key", of `key_type`: `_facts`) that too. Each one's first version is valid from FIRST_US: a
    payment stamped before it (a clock behind the registry's) is judged by the earliest
    facts known. A row with no version at all (written around the registry, by a loader
    of its own) stands as its only version, as before 0022; `check_book` reports it.
    With `member_group`, that group's members only."""
    m, mc, mf, cf = s.members, s.merchants, s.member_facts, s.merchant_facts
    alone = sa_literal(0, BigInteger)  # (a first version: FIRST_US below)

    def keyed(column) -> list:
        return [] if key is None else [key(column)]

    members = _of_group(conn, select(mf.c.member_id, mf.c.valid_from_us, mf.c.district.label("member_district"),
                                     *keyed(mf.c.member_id)), mf.c.member_id, member_group).union_all(
        _of_group(conn, select(m.c.member_id, alone, m.c.district, *keyed(m.c.member_id))
                  .where(~select(mf.c.member_id).where(mf.c.member_id == m.c.member_id).exists()),
                  m.c.member_id, member_group))
    merchants = select(cf.c.merchant_id, cf.c.valid_from_us, cf.c.district.label("merchant_district"), cf.c.category,
                       cf.c.annual_sales_won, cf.c.flags, cf.c.merchant_share_bp, *keyed(cf.c.merchant_id)).union_all(
        select(mc.c.merchant_id, alone, mc.c.district, mc.c.category, mc.c.annual_sales_won, mc.c.flags,
               mc.c.merchant_share_bp, *keyed(mc.c.merchant_id))
        .where(~select(cf.c.merchant_id).where(cf.c.merchant_id == mc.c.merchant_id).exists()))
    keys = {} if key is None else {"key": key_type}
    out = []
    for stmt, by, schema in ((members, "member_id", MEMBER_SCHEMA), (merchants, "merchant_id", MERCHANT_SCHEMA)):
        frame = _read_all(conn, stmt, {by: schema[by], "valid_from_us": pl.Int64,
                                       **{k: v for k, v in schema.items() if k != by}, **keys}, arrow)
        frame = frame.sort(by, "valid_from_us")
        out.append(frame.with_columns(pl.when(_first_version(by)).then(pl.lit(FIRST_US, pl.Int64))
                                      .otherwise(pl.col("valid_from_us")).alias("valid_from_us")))
    members_v, merchants_v = out
    return members_v, merchants_v.with_columns(pl.col("flags").fill_null(""))


def _as_of(codes: pl.Series, at_us: pl.Series, version_codes: pl.Series, valid_from_us: pl.Series) -> pl.Series:
    """For each row (an entity's integer code, a time), the position of the entity's
    version in force then: the last with `valid_from_us` at or before the time (a
    payment recorded in the very microsecond of a registry write gets the new version),
    as a backward as-of join by entity would find it. Versions sorted by (code,
    valid_from_us), each code's first valid from FIRST_US; `codes` without nulls.
    Vectorised without sorting the rows, which stay in their order: each row's time is
    ranked among the versions' distinct times (a binary search into a small array), and
    (code, rank) packed into one integer is searched among the versions' own."""
    if version_codes.len() == 0:
        return pl.repeat(None, codes.len(), dtype=pl.UInt32, eager=True)
    times = valid_from_us.unique().sort()
    ranks = times.len()
    keys = version_codes.cast(pl.Int64) * ranks + times.search_sorted(valid_from_us, side="left").cast(pl.Int64)
    wanted = codes.cast(pl.Int64) * ranks + (times.search_sorted(at_us, side="right").cast(pl.Int64) - 1)
    return (keys.search_sorted(wanted, side="right").cast(pl.Int64) - 1).cast(pl.UInt32)


def _dated_facts(by: str, versions: pl.DataFrame) -> Callable[[pl.DataFrame], pl.DataFrame]:
    """What gives a frame (`by`, recorded_at_us, ...) its entity's facts as the book
    recorded each row (`_as_of`), dropping rows of an entity the registry does not know,
    as an inner join drops them; the versions' codes made once for the frames it takes."""
    if versions[by].n_unique() == versions.height:  # one version each: a plain join, as before 0022
        facts = versions.drop("valid_from_us")
        return lambda frame: frame.join(facts, on=by, how="inner", maintain_order="left")
    coded = versions.select(by, _entity_code(by).alias("_code"), _first_version(by).alias("_first"))
    code_of, version_codes = coded.filter("_first").drop("_first"), coded["_code"]
    facts = versions.drop(by, "valid_from_us")

    def dated(frame: pl.DataFrame) -> pl.DataFrame:
        frame = frame.join(code_of, on=by, how="inner", maintain_order="left")
        at = _as_of(frame["_code"], frame["recorded_at_us"], version_codes, versions["valid_from_us"])
        return frame.drop("_code").with_columns(facts[name].gather(at) for name in facts.columns)

    return dated


def _plain(*, any_state: bool = False) -> pl.Expr:
    """A payment with no refund state (any, with `any_state`) whose detail has the book's shape."""
    detail = pl.col("detail")
    return (((pl.col("refund_state") == "{}") | any_state) & detail.str.starts_with(DETAIL_PREFIX)
            & detail.str.contains('"spent":{"grants":[', literal=True)
            & detail.str.contains('},"lines":[', literal=True))


class _LineTexts:
    """Distinct `"lines":[…]}` texts, each parsed once and numbered."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.components: list[tuple[int, str, int]] = []
        self.funders: list[tuple[int, str, int]] = []
        self.entries: list[tuple[int, int, str, str]] = []  # lines_id, line index, component_id, source

    def number(self, frame: pl.DataFrame) -> pl.DataFrame:
        """`frame` with `lines_id` (Int32) for its `lines` text."""
        distinct = frame["lines"].unique()
        known = []
        for text in distinct:
            number = self.ids.get(text)
            if number is None:
                number = self.ids[text] = len(self.ids)
                self._parse(number, text)
            known.append(number)
        table = pl.DataFrame({"lines": distinct, "lines_id": pl.Series(known, dtype=pl.Int32)})
        return frame.join(table, on="lines", how="left", maintain_order="left")

    def _parse(self, number: int, text: str) -> None:
        per_component: dict[str, int] = defaultdict(int)
        per_source: dict[str, int] = defaultdict(int)
        for index, line in enumerate(orjson.loads(text[len('"lines":'):-1])):
            for source, amount in line["funded_by"]:
                per_component[line["component_id"]] += amount
                per_source[source] += amount
                self.entries.append((number, index, line["component_id"], source))
        self.components += [(number, k, v) for k, v in per_component.items()]
        self.funders += [(number, k, v) for k, v in per_source.items()]

    def numbers(self, texts: pl.Series) -> pl.Series:
        """`lines_id` (Int32) of each text, in order (looked up on the text column alone)."""
        return self.number(texts.to_frame("lines").select("lines"))["lines_id"]

    def entry_frame(self) -> pl.DataFrame:
        """(lines_id, index, source) -> component_id: one row per funded_by entry."""
        return pl.DataFrame(self.entries, schema={"lines_id": pl.Int32, "index": pl.Int64, "component_id": pl.String,
                                                  "source": pl.String}, orient="row")

    def frames(self) -> tuple[pl.DataFrame, pl.DataFrame]:
        """(lines_id, component_id, amount_won) with each line's funded total, and
        (lines_id, source, amount_won)."""
        return (pl.DataFrame(self.components, schema={"lines_id": pl.Int32, "component_id": pl.String,
                                                      "amount_won": pl.Int64}, orient="row"),
                pl.DataFrame(self.funders, schema={"lines_id": pl.Int32, "source": pl.String,
                                                   "amount_won": pl.Int64}, orient="row"))


# The order a member-month's payments are evaluated in when a plan or the preview
# re-evaluates the book (`load_range`, `load_range_rows`, `_in_book_order`;
# `evaluate_frame(..., as_given=True)`): the order the
# book recorded them, as it paid them their band room and cap room, whatever their
# times. A batch's payments share its `recorded_at_us` (taken with its members locked,
# so one member's batches are stamped in the order the book ran them); among one
# member's, the order the batch paid them is that of their payment transactions' ids
# (`batch_txn`, `_batch_positions`: allocated in the batch's order), read only for the
# payments that share a batch with another of their member's. By time, a backdated
# payment (recorded after a later one of its month, which had taken the band) was
# planned as if it had come first: a correction to 8% planned it -10,000, clamped at
# the 0 it held, and one to 7% then +35,000, the month at 85,000 where 7% gives at most
# 35,000 (tests/test_corrections.py). By payment id within an instant, "p-10" before
# "p-5", the month ended at 24,000 on 120,000 of eligible spend.
BOOK_ORDER = ("recorded_at_us", "batch_txn", "occurred_at_us", "payment_id")
RECORDED_ORDER = ("recorded_at_us", "occurred_at_us", "payment_id")  # before `batch_txn` is read


def _batch_positions(conn: Connection, rows: pl.DataFrame) -> pl.DataFrame:
    """`rows` (member_id, payment_id, recorded_at_us, ...) with `batch_txn`: the id of
    each payment's transaction where it shares its batch (`recorded_at_us`) with another
    payment of its member, else null. Read by member (`ix_ledger_txns_member`), 1,000
    members at a time."""
    shared = pl.len().over("member_id", "recorded_at_us") > 1
    tied = rows.filter(shared).select("member_id", "payment_id")
    found: list[tuple[str, int]] = []
    if not tied.is_empty():
        t = s.ledger_txns
        by_member = tied.group_by("member_id").agg("payment_id").sort("member_id")
        for i in range(0, by_member.height, 1_000):
            part = by_member.slice(i, 1_000)
            ids = [payment_id for group in part["payment_id"].to_list() for payment_id in group]
            for j in range(0, len(ids), 10_000):
                found += conn.execute(select(t.c.ref, t.c.txn_id).where(
                    t.c.member_id.in_(part["member_id"].to_list()), t.c.kind == "payment",
                    t.c.ref.in_(ids[j:j + 10_000]))).all()
    positions = pl.DataFrame(found, schema={"payment_id": pl.String, "batch_txn": pl.Int64}, orient="row")
    return rows.join(positions, on="payment_id", how="left", maintain_order="left")


DETAIL_PREFIX = '{"spend_order":'
READ_SCHEMA = {"payment_id": pl.String, "member_id": pl.String, "merchant_id": pl.String, "amount_won": pl.Int64,
               "occurred_at_us": pl.Int64, "month": pl.String, "policy_id": pl.String, "base_won": pl.Int64,
               "counts": pl.Int64, "cashback_won": pl.Int64, "detail": pl.String, "refunded_won": pl.Int64,
               "refund_state": pl.String, "recorded_at_us": pl.Int64}
MEMBER_SCHEMA = {"member_id": pl.String, "member_district": pl.String}
MERCHANT_SCHEMA = {"merchant_id": pl.String, "merchant_district": pl.String, "category": pl.String,
                   "annual_sales_won": pl.Int64, "flags": pl.String, "merchant_share_bp": pl.Int64}
SPENT = r'"spent":\{"grants":\[(.*?)\],"points":(\d+),"charged":(\d+)\}'
GRANT_PAIR = r'\["([^"]*)",(\d+)\]'


@dataclass
class _Refunded:
    """What the payments read one by one add: the in-range rows' spend columns (in the
    frame's order), totals, and the months' state before `from`."""

    spent: pl.DataFrame  # SPENT_COLUMNS, recorded_cashback_won, held_cashback_won
    start: MonthStart
    rec_components: dict[str, int]
    rec_funders: dict[str, int]
    held_components: dict[str, int]
    held_funders: dict[str, int]
    policy_ids: dict[str, int]
    refunded: int
    # held_funders per (source, month_key) of the in-range rows: the budget outlook's
    # "range held" (`budget_outlook`)
    held_funder_months: dict[tuple[str, int], int] = field(default_factory=dict)


def _refunded_rows(other: pl.DataFrame, from_us: int, cashback_programs: set[str], *,
                   member_type: pl.DataType = pl.String, late: set[str] = frozenset()) -> _Refunded:
    """`_Reader.add`'s arithmetic on the payments with a refund state (in the frame's
    order), in a tight loop over tuples: the same figures (tests/test_simulate_read.py).
    A payment a posted correction re-based has one (its `corrected`), so comes here: the
    months' start takes what it holds (`_held`). A payment before `from` is in the
    months' start unless it is one of `late` (`_recorded_late`)."""
    rec_components: dict[str, int] = defaultdict(int)
    rec_funders: dict[str, int] = defaultdict(int)
    held_components: dict[str, int] = defaultdict(int)
    held_funders: dict[str, int] = defaultdict(int)
    held_funder_months: dict[tuple[str, int], int] = defaultdict(int)
    policy_ids: dict[str, int] = defaultdict(int)
    start_months: dict[tuple[str, int], list[int]] = {}
    start_components: dict[tuple[str, int, str], int] = defaultdict(int)
    spent: list[tuple[int, int, int, int, int, int]] = []
    refunded = 0
    loads = orjson.loads
    names = ("member_id", "month", "occurred_at_us", "counts", "base_won", "cashback_won", "detail",
             "refund_state", "policy_id", "refunded_won", "payment_id")
    for member_id, month, occurred, counts, base, cashback_won, detail_text, state_text, policy_id, refunded_won, \
            payment_id in other.select(names).iter_rows():
        detail, state = loads(detail_text), loads(state_text or "{}")
        clawed: dict[str, int] = state.get("clawed", {})
        cashback = cashback_won - sum(clawed.values())
        lines = [(line["component_id"], [(source, amount - clawed.get(f"{index}/{source}", 0))
                                         for source, amount in line["funded_by"]])
                 for index, line in enumerate(detail["lines"])]
        held, held_lines = _held(detail, state, cashback, lines)
        if occurred < from_us and payment_id not in late:
            key = (member_id, month_key(month))
            row = start_months.setdefault(key, [0, 0])
            if counts:
                row[0] += base - state.get("base", 0)
            row[1] += held
            for component_id, parts in held_lines:
                start_components[(*key, component_id)] += sum(amount for _, amount in parts)
            continue
        s_ = detail["spent"]
        grants_done: dict[str, int] = state.get("grants", {})
        grants = grant_cashback = 0
        for program_id, amount in s_["grants"]:
            left = amount - grants_done.get(program_id, 0)
            grants += left
            if program_id in cashback_programs:
                grant_cashback += left
        spent.append((s_["charged"] - state.get("charged", 0), s_["points"] - state.get("points", 0), grants,
                      grant_cashback, cashback, held))
        policy_ids[policy_id or ""] += 1
        refunded += refunded_won > 0
        for lines_, components, funders in ((lines, rec_components, rec_funders),
                                            (held_lines, held_components, held_funders)):
            for component_id, parts in lines_:
                components[component_id] += sum(amount for _, amount in parts)
                for source, amount in parts:
                    funders[source] += amount
        _add_held_months(held_funder_months, month_key(month), held_lines)
    spent_frame = pl.DataFrame(spent, schema={**{c: pl.Int64 for c in SPENT_COLUMNS},
                                              "recorded_cashback_won": pl.Int64, "held_cashback_won": pl.Int64},
                               orient="row")
    months = pl.DataFrame([(m, k, e, c) for (m, k), (e, c) in start_months.items()],
                          schema={"member_id": member_type, "month_key": pl.Int32, "eligible_spend_won": pl.Int64,
                                  "cashback_won": pl.Int64}, orient="row")
    components = pl.DataFrame([(m, k, cid, v) for (m, k, cid), v in start_components.items()],
                              schema={"member_id": member_type, "month_key": pl.Int32, "component_id": pl.String,
                                      "cashback_won": pl.Int64}, orient="row")
    return _Refunded(spent_frame, MonthStart(months, components), dict(rec_components), dict(rec_funders),
                     dict(held_components), dict(held_funders), dict(policy_ids), refunded, dict(held_funder_months))


def _add_held_months(into: dict[tuple[str, int], int], month: int, held_lines: list) -> None:
    """A row-read payment's held lines added to the range's (source, month_key) sums."""
    for _, parts in held_lines:
        for source, amount in parts:
            into[(source, month)] += amount


def _plain_spent(simple: pl.DataFrame, cashback_programs: set[str]) -> pl.DataFrame:
    """idx, spent charged/points/grants and the grant money that earns, for payments with
    no refund. Most spent only charged money: then charged = amount (an approved
    payment's spend split sums to its amount: its ledger transaction balances)."""
    detail = pl.col("detail")
    only_charged = detail.str.contains('"spent":{"grants":[],"points":0,', literal=True)
    base = simple.select("idx", "amount_won", only_charged.alias("only_charged"))
    easy = base.filter("only_charged").select(
        "idx", pl.col("amount_won").alias("spent_charged_won"), pl.lit(0, pl.Int64).alias("spent_points_won"),
        pl.lit(0, pl.Int64).alias("spent_grants_won"), pl.lit(0, pl.Int64).alias("grant_cashback_won"))
    rest = simple.filter(~only_charged).select("idx", detail.str.extract_groups(SPENT).alias("g")).unnest("g")
    rest = rest.rename({rest.columns[1]: "grants", rest.columns[2]: "points", rest.columns[3]: "charged"})
    pairs = (rest.select("idx", pl.col("grants").str.extract_all(GRANT_PAIR).alias("pair")).explode("pair")
             .drop_nulls("pair").select(
                 "idx", pl.col("pair").str.extract(r'\["([^"]*)"', 1).alias("program_id"),
                 pl.col("pair").str.extract(r",(\d+)\]$", 1).cast(pl.Int64).alias("amount"))
             .group_by("idx").agg(pl.col("amount").sum().alias("spent_grants_won"),
                                  pl.col("amount").filter(pl.col("program_id").is_in(list(cashback_programs)))
                                  .sum().alias("grant_cashback_won")))
    rest = rest.join(pairs, on="idx", how="left").select(
        "idx", pl.col("charged").cast(pl.Int64).alias("spent_charged_won"),
        pl.col("points").cast(pl.Int64).alias("spent_points_won"),
        pl.col("spent_grants_won").fill_null(0), pl.col("grant_cashback_won").fill_null(0).cast(pl.Int64))
    return pl.concat([easy, rest.cast(easy.schema)])


def _read_all(conn: Connection, stmt: Select, schema: dict[str, pl.DataType], arrow=None) -> pl.DataFrame:
    parts = list(read_frames(conn, stmt, schema, READ_CHUNK_ROWS, arrow))
    return pl.concat(parts) if parts else pl.DataFrame(schema=schema)


@contextmanager
def _arrow_connection(conn: Connection) -> Iterator[object | None]:
    """One ADBC connection for a reader's statements read one after another (the driver
    reads the server's type catalog as it connects: ~50 ms, where psycopg takes ~4), with
    the engine's connect timeout, keepalives and tcp_user_timeout (`settlement.io.adbc_uri`;
    no statement timeout: a simulation's read is as long as its range); None where ADBC
    is not used (SQLite, or the driver not installed)."""
    if conn.dialect.name != "postgresql":
        yield None
        return
    try:
        from adbc_driver_postgresql import dbapi as adbc
    except ImportError:
        yield None
        return
    from settlement.io import adbc_uri

    with adbc.connect(adbc_uri(conn)) as aconn:
        yield aconn


def read_frames(conn: Connection, stmt: Select, schema: dict[str, pl.DataType],
                chunk_rows: int, arrow=None) -> Iterator[pl.DataFrame]:
    """`read_frame` in chunks of about `chunk_rows` rows, so that a large read never
    holds all its text at once. PostgreSQL: the COPY stream cut at line ends (the
    selected values must hold no newline: ids, numbers, compact JSON); SQLite: fetchmany.
    With ADBC, on `arrow` (`_arrow_connection`) when given, else on a connection opened
    for this read."""
    plain = {n: (pl.String if isinstance(t, (pl.Enum, pl.Categorical)) else t) for n, t in schema.items()}
    if conn.dialect.name != "postgresql":  # the driver's cursor: no per-row work in SQLAlchemy
        sql = str(stmt.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
        cursor = conn.connection.driver_connection.cursor()
        try:
            cursor.execute(sql)
            while rows := cursor.fetchmany(chunk_rows):
                yield pl.DataFrame(rows, schema=plain, orient="row").cast(schema)
        finally:
            cursor.close()
        return
    sql = str(stmt.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
    if arrow is None:
        with _arrow_connection(conn) as own:
            if own is not None:
                yield from read_frames(conn, stmt, schema, chunk_rows, own)
                return
    else:
        # ADBC: binary COPY straight into Arrow batches (C++), no text per value. A
        # connection other than `conn`, so its own snapshot: a simulation is an
        # estimate over recorded payments, and the facts are the versions as read then.
        with arrow.cursor() as cursor:
            cursor.execute(sql)
            batches, rows = [], 0
            for batch in cursor.fetch_record_batch():
                batches.append(batch)
                rows += batch.num_rows
                if rows >= chunk_rows:
                    yield _arrow_frame(batches, plain, schema)
                    batches, rows = [], 0
            if batches:
                yield _arrow_frame(batches, plain, schema)
        arrow.rollback()
        return
    raw = conn.connection.dbapi_connection

    def parse(data: bytes) -> pl.DataFrame:
        return pl.read_csv(io.BytesIO(data), has_header=False, new_columns=list(plain), schema=plain,
                           empty_string_is_null=False, null_values=[""]).cast(schema)

    pieces: list[bytes] = []
    lines = 0
    with raw.cursor() as cursor:
        with cursor.copy(f"COPY ({sql}) TO STDOUT WITH (FORMAT csv, HEADER false)") as copy:
            for piece in copy:
                piece = bytes(piece)
                pieces.append(piece)
                lines += piece.count(b"\n")
                if lines >= chunk_rows:
                    data = b"".join(pieces)
                    cut = data.rfind(b"\n") + 1
                    yield parse(data[:cut])
                    pieces, lines = [data[cut:]], 0
    data = b"".join(pieces)
    if data:
        yield parse(data)


def _arrow_frame(batches: list, plain: dict, schema: dict) -> pl.DataFrame:
    import pyarrow as pa

    frame = pl.from_arrow(pa.Table.from_batches(batches))
    return frame.rename(dict(zip(frame.columns, plain))).cast(plain).cast(schema)


def _frame(sums: dict[str, int], key: str) -> pl.DataFrame:
    return pl.DataFrame(list(sums.items()), schema={key: pl.String, "amount_won": pl.Int64}, orient="row")


def load_range_rows(conn: Connection, from_us: int, to_us: int, *, payments_max: int = PAYMENTS_MAX) -> Loaded:
    """`load_range` row by row in Python (each payment's JSON parsed): the reference
    the vectorised reader is tested against; ~36 µs per payment."""
    if not from_us < to_us:
        raise ValueError("the range needs from < to")
    from bisect import bisect_right
    from types import SimpleNamespace

    p = s.payments
    query = (
        select(p.c.payment_id, p.c.member_id, p.c.merchant_id, p.c.amount_won, p.c.occurred_at_us, p.c.month,
               p.c.policy_id, p.c.base_won, p.c.counts_toward_month, p.c.cashback_won, p.c.detail,
               p.c.refunded_won, p.c.refund_state, p.c.recorded_at_us)
        .where(p.c.status == "approved", p.c.occurred_at_us >= _month_start_us(from_us), p.c.occurred_at_us < to_us)
        .order_by(p.c.recorded_at_us, p.c.occurred_at_us, p.c.payment_id)  # RECORDED_ORDER
    )
    # Each entity's versions (valid_from, facts), looked up per payment by bisection.
    dated: list[dict[str, tuple[list[int], list[dict]]]] = []
    for frame, by in zip(_fact_versions(conn), ("member_id", "merchant_id")):
        by_entity: dict[str, tuple[list[int], list[dict]]] = {}
        for version in frame.iter_rows(named=True):
            times, facts = by_entity.setdefault(version.pop(by), ([], []))
            times.append(version.pop("valid_from_us"))
            facts.append(version)
        dated.append(by_entity)

    def facts_then(entity: tuple[list[int], list[dict]], at_us: int) -> dict:
        times, facts = entity
        return facts[bisect_right(times, at_us) - 1]

    rows = []
    for r in conn.execution_options(yield_per=FETCH_ROWS).execute(query):
        if r.member_id not in dated[0] or r.merchant_id not in dated[1]:
            continue  # not in the registry: as an inner join of it
        rows.append(SimpleNamespace(**r._mapping, **facts_then(dated[0][r.member_id], r.recorded_at_us),
                                    **facts_then(dated[1][r.merchant_id], r.recorded_at_us)))
        if len(rows) > payments_max:
            raise _too_many(payments_max)
    # One batch's payments of a member in the order the batch paid them (BOOK_ORDER).
    keyed = _batch_positions(conn, pl.DataFrame(
        [(r.member_id, r.payment_id, r.recorded_at_us) for r in rows],
        schema={"member_id": pl.String, "payment_id": pl.String, "recorded_at_us": pl.Int64}, orient="row"))
    batch_txn = dict(zip(keyed["payment_id"].to_list(), keyed["batch_txn"].to_list()))
    rows.sort(key=lambda r: (r.recorded_at_us, batch_txn[r.payment_id] or 0, r.occurred_at_us, r.payment_id))
    # The payments before `from` recorded with or after the range's first of their member-month.
    first: dict[tuple[str, str], int] = {}
    for r in rows:
        if r.occurred_at_us >= from_us:
            first.setdefault((r.member_id, r.month), r.recorded_at_us)  # rows come in recorded order
    late = {r.payment_id for r in rows if r.occurred_at_us < from_us
            and (r.member_id, r.month) in first and r.recorded_at_us >= first[(r.member_id, r.month)]}
    reader = _Reader(_cashback_programs(conn), from_us, late=late)
    for r in rows:
        reader.add(r)
    return reader.loaded()


# ---------------------------------------------------------------- the streamed read for simulate()

GROUP_ROWS = 4_000_000  # payments per member group evaluated at a time


@dataclass
class _Compact:
    """A range of the book, narrow: the in-range payments in (occurred_at, payment_id)
    order but each member's in the order the book paid them (`_in_book_order`), with
    integer member and merchant codes (positions in `members`/`merchants`),
    the spend split and what each holds; the months' state as of `from` keyed by
    member code; what the payments hold in total by component and funder, and the
    cashback recorded (`Loaded.held` and `Loaded.recorded`)."""

    # member, merchant (UInt32 codes), amount_won, occurred_at_us, SPENT_COLUMNS, held_cashback_won; and
    # member_version, merchant_version (UInt32 positions in `member_facts`/`merchant_facts`: the facts as the
    # book recorded the payment, `_as_of`) where some member or merchant has more than one version
    rows: pl.DataFrame
    start: MonthStart  # member_id = member code (Int64)
    members: pl.DataFrame  # member_id; code = position, in member_id order
    merchants: pl.DataFrame  # merchant_id; code = position, in merchant_id order
    member_facts: pl.DataFrame  # member, valid_from_us, member_district; by (code, valid_from_us)
    # merchant, valid_from_us, merchant_district, category, annual_sales_won, flags (list), merchant_share_bp
    merchant_facts: pl.DataFrame
    held_components: dict[str, int]
    held_funders: dict[str, int]
    recorded_won: int  # the in-range payments' cashback as recorded, net of refunds' clawbacks
    policy_ids: dict[str, int]
    refunded: int
    row_reader_payments: int
    # What the in-range payments hold per (source, month_key): `held_funders` by month,
    # for the budget outlook (`budget_outlook`).
    held_funder_months: dict[tuple[str, int], int] = field(default_factory=dict)
    # The members (codes) whose payments `rows` has in the order the book paid them,
    # not in time order (`_in_book_order`): their groups are evaluated `as_given`.
    reordered: pl.Series = field(default_factory=lambda: pl.Series("member", [], dtype=pl.UInt32))
    # The in-range payments the book declined for want of money (`insufficient_funds`),
    # counted as the same read passes them (the points feedback's `insufficient_payments`).
    insufficient: int = 0


def _facts(conn: Connection, hashed: bool) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Members and merchants in id order (a member's code is its position), each with
    the key the payments read carries for it: on PostgreSQL a 64-bit hash of the id
    (`hashtextextended`, computed by the server so the payments' ids never travel as
    text), else the id itself; and their fact versions (`_fact_versions`) by code, which
    the ids are read with (one read of each registry table)."""
    from sqlalchemy import func

    def key(column):
        return func.hashtextextended(column, 0).label("key") if hashed else column.label("key")

    with _arrow_connection(conn) as arrow:
        versions = _fact_versions(conn, arrow, key, pl.Int64 if hashed else pl.String)
    out = []
    for frame, by, code in zip(versions, ("member_id", "merchant_id"), ("member", "merchant")):
        frame = frame.with_columns(_entity_code(by).alias(code), _first_version(by).alias("first"))
        out.append((frame.filter("first").select(by, "key"),
                    frame.select(code, pl.exclude(code, by, "key", "first"))))
    (members, member_versions), (merchants, merchant_versions) = out
    merchant_versions = merchant_versions.with_columns(
        pl.col("flags").str.split(",").list.eval(pl.element().filter(pl.element() != "")))
    return members, merchants, member_versions, merchant_versions


def _read_compact(conn: Connection, from_us: int, to_us: int, *, payments_max: int = PAYMENTS_MAX,
                  chunk_rows: int = READ_CHUNK_ROWS) -> _Compact:
    """`load_range`'s reading, kept narrow as it streams: each chunk's ids become
    integer codes (PostgreSQL: joined on the server's 64-bit hash of the id, checked
    unique among the registry's ids, so the match is exact), its JSON detail is taken
    apart as `load_range` does, the rows before `from` are reduced to their member-month
    sums and the chunk's text is let go. What is left per in-range payment is ~10
    integers and its payment_id, which orders ties and is dropped once the rows are in
    order."""
    if not from_us < to_us:
        raise ValueError("the range needs from < to")
    hashed = conn.dialect.name == "postgresql"
    members, merchants, member_versions, merchant_versions = _facts(conn, hashed)
    if hashed and (members["key"].n_unique() < members.height or merchants["key"].n_unique() < merchants.height):
        hashed = False  # two ids share a hash: match on the ids themselves
        members, merchants, member_versions, merchant_versions = _facts(conn, hashed)
    member_keys = members.select("key", pl.int_range(pl.len(), dtype=pl.UInt32).alias("member"))
    merchant_keys = merchants.select("key", pl.int_range(pl.len(), dtype=pl.UInt32).alias("merchant"))
    members, merchants = members.drop("key"), merchants.drop("key")

    p = s.payments
    from sqlalchemy import func

    def key(column, name):
        return (func.hashtextextended(column, 0) if hashed else column).label(name)

    query = (
        select(p.c.payment_id, key(p.c.member_id, "member_key"), key(p.c.merchant_id, "merchant_key"),
               p.c.amount_won, p.c.occurred_at_us, p.c.month, p.c.policy_id, p.c.base_won,
               cast(p.c.counts_toward_month, Integer).label("counts"), p.c.cashback_won, p.c.detail,
               p.c.refunded_won, p.c.refund_state, p.c.recorded_at_us,
               cast(p.c.status == "approved", Integer).label("approved"))
        # The payments declined for want of money come along to be counted (a few rows on
        # the same pass over the heap; a query of their own would read the range again).
        .where(or_(p.c.status == "approved", p.c.decline_code == DECLINE_INSUFFICIENT_FUNDS),
               p.c.occurred_at_us >= _month_start_us(from_us), p.c.occurred_at_us < to_us)
    )
    key_type = pl.Int64 if hashed else pl.String
    schema = {name: dtype for name, dtype in READ_SCHEMA.items() if name not in ("member_id", "merchant_id")}
    schema = {"payment_id": pl.String, "member_key": key_type, "merchant_key": key_type, **schema,
              "approved": pl.Int64}
    cashback_programs = _cashback_programs(conn)
    lines = _LineTexts()
    in_range = pl.col("occurred_at_us") >= from_us
    month = pl.col("month").str.slice(0, 4).cast(pl.Int32) * 100 + pl.col("month").str.slice(5, 2).cast(pl.Int32)
    kept, others, pre_parts, clawed_pre = [], [], [], []
    clawed_components: dict[str, int] = defaultdict(int)
    clawed_funders: dict[str, int] = defaultdict(int)
    line_counts: dict[int, int] = defaultdict(int)
    line_month_counts: dict[tuple[int, int], int] = defaultdict(int)  # (lines_id, month_key): the outlook's
    clawed_months: list[pl.DataFrame] = []
    policy_ids: dict[str, int] = defaultdict(int)
    refunded = count = insufficient = 0
    for chunk in _read_side_by_side(conn, _heap_halves(conn, query), schema, chunk_rows):
        insufficient += chunk.filter(in_range & (pl.col("approved") == 0)).height
        chunk = chunk.filter(pl.col("approved") == 1).drop("approved")
        # Codes looked up on the key columns alone (a join of the chunk would copy its text).
        chunk = chunk.with_columns(_lookup(chunk["member_key"], member_keys, "member"),
                                   _lookup(chunk["merchant_key"], merchant_keys, "merchant"))
        chunk = chunk.drop("member_key", "merchant_key").drop_nulls(["member", "merchant"])
        chunk = chunk.with_columns(pl.col("policy_id").fill_null(""), pl.col("refund_state").fill_null("{}"))
        # The book's detail, with no refund state or one of the book's shape (the rest one by one).
        state = pl.col("refund_state")
        chunk = chunk.with_columns((_plain(any_state=True) & ((state == "{}") | (
            state.str.contains(REFUND_STATE) & ~state.str.contains("\\", literal=True)))).alias("plain"))
        count += chunk.filter(in_range).height
        if count > payments_max:
            raise _too_many(payments_max)
        others.append(chunk.filter(~pl.col("plain")).drop("plain"))
        plain = chunk.filter("plain").with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("idx"))
        del chunk
        plain = plain.with_columns(_spent_columns(plain, cashback_programs))
        plain = plain.with_columns(
            pl.col("detail").str.slice(pl.col("detail").str.find('"lines":', literal=True)).alias("lines"))
        plain = plain.with_columns(lines.numbers(plain["lines"]))
        plain, clawed = _net_of_refunds(plain, lines, cashback_programs)
        plain = plain.drop("detail", "refund_state", "lines", "idx", "plain")
        if clawed.height:  # what refunds clawed back, by line entry: off the totals and the months' start
            early = clawed.filter(~in_range)
            if early.height:
                clawed_pre.append(early.select("member", month.alias("month_key"), "component_id",
                                               (-pl.col("clawed")).alias("cashback_won")))
            later = clawed.filter(in_range)
            clawed_months.append(later.group_by("source", month.alias("month_key")).agg(pl.col("clawed").sum()))
            for key_name, into in (("component_id", clawed_components), ("source", clawed_funders)):
                for name, amount in later.group_by(key_name).agg(pl.col("clawed").sum()).iter_rows():
                    into[name] += int(amount)
        pre = plain.filter(~in_range)
        if pre.height:
            pre_parts.append(pre.group_by("member", month.alias("month_key"), "lines_id").agg(
                (pl.col("base_won") * pl.col("counts")).sum().alias("eligible_spend_won"),
                pl.col("cashback_won").sum(), pl.len().alias("n")))
        plain = plain.filter(in_range)
        for lines_id, n in plain.group_by("lines_id").len().iter_rows():
            line_counts[lines_id] += n
        for lines_id, key_, n in plain.group_by("lines_id", month.alias("month_key")).len().iter_rows():
            line_month_counts[(lines_id, key_)] += n
        for policy_id, n in plain.group_by("policy_id").len().iter_rows():
            policy_ids[policy_id] += n
        refunded += int((plain["refunded_won"] > 0).sum())
        kept.append(plain.select("member", "merchant", "payment_id", "amount_won", "occurred_at_us",
                                 "recorded_at_us", *SPENT_COLUMNS,
                                 pl.col("cashback_won").alias("held_cashback_won")))  # no correction: as recorded
        del plain, pre

    # Payments with a refund state (or a detail of another shape): one by one, in time order.
    other = pl.concat(others) if others else None
    del others
    if other is None or other.height == 0:
        other = pl.DataFrame(schema={**{n: d for n, d in schema.items() if not n.endswith("_key") and n != "approved"},
                                     "member": pl.UInt32, "merchant": pl.UInt32})
    other = other.sort("occurred_at_us", "payment_id")
    reader = _refunded_rows(other.with_columns(pl.col("member").cast(pl.Int64).alias("member_id")), from_us,
                            cashback_programs, member_type=pl.Int64)
    other_rows = other.filter(in_range).select("member", "merchant", "payment_id", "amount_won", "occurred_at_us",
                                               "recorded_at_us")
    other_rows = other_rows.hstack(reader.spent.drop("recorded_cashback_won"))
    corrected_won = int((reader.spent["recorded_cashback_won"] - reader.spent["held_cashback_won"]).sum())
    row_reader_payments = other.height
    del other
    rows = pl.concat([*kept, other_rows.cast(kept[0].schema) if kept else other_rows])
    del kept, other_rows
    rows, reordered = _in_book_order(conn, _in_time_order(rows), members["member_id"])
    # Each payment's facts as the book recorded it: a version's position per row, only
    # where some member or merchant has more than one (else the code is the position).
    for code, versions, entities in (("member", member_versions, members), ("merchant", merchant_versions, merchants)):
        if versions.height != entities.height:
            rows = rows.with_columns(_as_of(rows[code], rows["recorded_at_us"], versions[code],
                                            versions["valid_from_us"]).alias(f"{code}_version"))
    rows = rows.drop("payment_id", "recorded_at_us")

    # Totals held: each line text's sums times the payments that carry it (no correction
    # re-based those), and what the payments read one by one hold.
    line_components, line_funders = lines.frames()
    counts = pl.DataFrame(list(line_counts.items()), schema={"lines_id": pl.Int32, "len": pl.Int64}, orient="row")
    held_components, held_funders = dict(reader.held_components), dict(reader.held_funders)
    for key_name, table, into in (("component_id", line_components, held_components),
                                  ("source", line_funders, held_funders)):
        sums = counts.join(table, on="lines_id").group_by(key_name).agg((pl.col("amount_won") * pl.col("len")).sum())
        for name, amount in sums.iter_rows():
            into[name] = into.get(name, 0) + int(amount)
    for policy_id, n in reader.policy_ids.items():
        policy_ids[policy_id] += n
    for clawed_sums, into in ((clawed_components, held_components), (clawed_funders, held_funders)):
        for name, amount in clawed_sums.items():
            into[name] = into.get(name, 0) - amount

    # The months' state as of `from`.
    pre = (pl.concat(pre_parts) if pre_parts else
           pl.DataFrame(schema={"member": pl.UInt32, "month_key": pl.Int32, "lines_id": pl.Int32,
                                "eligible_spend_won": pl.Int64, "cashback_won": pl.Int64, "n": pl.UInt32}))
    del pre_parts
    pre = pre.with_columns(pl.col("member").cast(pl.Int64).alias("member_id"))
    months = pl.concat([
        pre.group_by("member_id", "month_key").agg(pl.col("eligible_spend_won", "cashback_won").sum()),
        reader.start.months.select("member_id", "month_key", "eligible_spend_won", "cashback_won"),
    ], how="vertical_relaxed").group_by("member_id", "month_key").agg(pl.col("eligible_spend_won", "cashback_won").sum())
    components = pl.concat([
        pre.join(line_components, on="lines_id").group_by("member_id", "month_key", "component_id")
        .agg((pl.col("amount_won") * pl.col("n")).sum().alias("cashback_won")),
        reader.start.components.select("member_id", "month_key", "component_id", "cashback_won"),
        *(part.select(pl.col("member").cast(pl.Int64).alias("member_id"), "month_key", "component_id",
                      "cashback_won") for part in clawed_pre),
    ], how="vertical_relaxed").group_by("member_id", "month_key", "component_id").agg(pl.col("cashback_won").sum())
    return _Compact(rows, MonthStart(months.sort("member_id", "month_key"),
                                     components.sort("member_id", "month_key", "component_id")),
                    members, merchants, member_versions, merchant_versions, held_components, held_funders,
                    int(rows["held_cashback_won"].sum()) + corrected_won, dict(policy_ids),
                    refunded + reader.refunded, row_reader_payments,
                    _held_funder_months(line_month_counts, line_funders, clawed_months, reader.held_funder_months),
                    reordered, insufficient)


def _held_funder_months(line_month_counts: dict[tuple[int, int], int], line_funders: pl.DataFrame,
                        clawed: list[pl.DataFrame], row_read: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
    """What the in-range payments hold per (source, month_key), as `held_funders` sums
    them per source: each line text's funders times the payments of the month that
    carry it, less what refunds clawed back, plus what the payments read one by one hold."""
    out: dict[tuple[str, int], int] = defaultdict(int, row_read)
    counts = pl.DataFrame([(lines_id, key, n) for (lines_id, key), n in line_month_counts.items()],
                          schema={"lines_id": pl.Int32, "month_key": pl.Int32, "len": pl.Int64}, orient="row")
    sums = (counts.join(line_funders, on="lines_id").group_by("source", "month_key")
            .agg((pl.col("amount_won") * pl.col("len")).sum()))
    for source, key, amount in sums.select("source", "month_key", "amount_won").iter_rows():
        out[(source, key)] += int(amount)
    for frame in clawed:
        for source, key, amount in frame.select("source", "month_key", "clawed").iter_rows():
            out[(source, key)] -= int(amount)
    return dict(out)


def _heap_halves(conn: Connection, query: Select) -> list[Select]:
    """PostgreSQL: the query over each half of the payments table's pages (`ctid`
    ranges: each backend reads its half of the heap once, and the planner still takes
    the occurred_at index for a short range); elsewhere the query itself."""
    if conn.dialect.name != "postgresql":
        return [query]
    from sqlalchemy import text

    pages = conn.exec_driver_sql(
        "SELECT pg_relation_size('payments') / current_setting('block_size')::int").scalar() or 0
    if pages < 2:
        return [query]
    mid = int(pages) // 2
    return [query.where(text(f"payments.ctid < '({mid},0)'::tid")),
            query.where(text(f"payments.ctid >= '({mid},0)'::tid"))]


def _read_side_by_side(conn: Connection, stmts: list[Select], schema: dict[str, pl.DataType],
                       chunk_rows: int) -> Iterator[pl.DataFrame]:
    """The chunks of several statements (`read_frames`), in no particular order. With
    ADBC on PostgreSQL each statement streams on its own connection in a thread, so the
    server produces rows (two backends) while this thread takes earlier chunks apart;
    at most two chunks per statement wait (a chunk holds ~400 MB of text at a million
    rows; with one per statement the 20M book's read took 57 s in a run against 48-51 s,
    noisy on the shared machine). Otherwise one statement after the other."""
    import queue
    import threading

    try:
        from adbc_driver_postgresql import dbapi as adbc  # noqa: F401
    except ImportError:
        adbc = None
    if conn.dialect.name != "postgresql" or adbc is None or len(stmts) < 2:
        for stmt in stmts:
            yield from read_frames(conn, stmt, schema, chunk_rows)
        return
    done = object()
    waiting: queue.Queue = queue.Queue(maxsize=2 * len(stmts))
    stop = threading.Event()

    def produce(stmt: Select) -> None:
        try:
            for frame in read_frames(conn, stmt, schema, chunk_rows):
                while not stop.is_set():
                    try:
                        waiting.put(frame, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            waiting.put(done)
        except BaseException as error:  # handed to the consumer, raised there
            waiting.put(error)

    threads = [threading.Thread(target=produce, args=(stmt,), daemon=True, name="simulate-read") for stmt in stmts]
    for thread in threads:
        thread.start()
    try:
        running = len(threads)
        while running:
            item = waiting.get()
            if item is done:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        stop.set()
        while any(thread.is_alive() for thread in threads):
            try:
                waiting.get(timeout=0.1)
            except queue.Empty:
                pass
        for thread in threads:
            thread.join()


def _lookup(keys: pl.Series, table: pl.DataFrame, name: str) -> pl.Series:
    """The code (`table`'s `name`) of each key, null where the key is unknown."""
    found = keys.to_frame("key").join(table, on="key", how="left", maintain_order="left")
    return found[name]


def _spent_columns(plain: pl.DataFrame, cashback_programs: set[str]) -> list[pl.Series]:
    """`_plain_spent`'s columns in `plain`'s row order, put in place by position (a
    join would copy the chunk's text)."""
    spent = _plain_spent(plain, cashback_programs)
    positions = spent["idx"].cast(pl.UInt32)
    return [pl.repeat(0, plain.height, dtype=pl.Int64, eager=True).scatter(positions, spent[name]).alias(name)
            for name in SPENT_COLUMNS]


REFUND_STATE = (r'^\{"charged":(\d+),"points":(\d+),"grants":\{([^{}]*)\},"base":(\d+),'
                r'"clawed":\{([^{}]*)\}\}$')


def _net_of_refunds(plain: pl.DataFrame, lines: _LineTexts,
                    cashback_programs: set[str]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The rows with a refund state netted as `_Reader.add` nets them, vectorised on
    the state's fixed shape (`ledger.book.plan_refund` writes it): spend columns less
    what refunds restored (each spent grant less its program's restored amount),
    cashback less everything clawed back, base less the refunded base. Returns the
    rows and the clawed amounts by line entry (member, occurred_at_us, month,
    component_id, source, clawed), matched to the line's funded_by entries as the row
    reader matches `index/source`."""
    stated = plain.filter(pl.col("refund_state") != "{}")
    if stated.height == 0:
        return plain, pl.DataFrame(
            schema={"member": pl.UInt32, "occurred_at_us": pl.Int64, "month": pl.String, "component_id": pl.String,
                    "source": pl.String, "clawed": pl.Int64})
    parts = stated.select("idx", "member", "occurred_at_us", "month", "lines_id", "detail",
                          pl.col("refund_state").str.extract_groups(REFUND_STATE).alias("g")).unnest("g")
    parts = parts.rename(dict(zip(parts.columns[6:], ("charged", "points", "grants", "base", "clawed"))))
    # Restored grant money per spent grant entry (the detail's pairs, with repeats).
    spent_pairs = (parts.select("idx", pl.col("detail").str.extract(SPENT, 1).str.extract_all(GRANT_PAIR).alias("p"))
                   .explode("p").drop_nulls("p")
                   .select("idx", pl.col("p").str.extract(r'\["([^"]*)"', 1).alias("program_id")))
    done_pairs = (parts.select("idx", pl.col("grants").str.extract_all(r'"[^"]*":\d+').alias("p")).explode("p")
                  .drop_nulls("p").select("idx", pl.col("p").str.extract(r'^"([^"]*)"', 1).alias("program_id"),
                                          pl.col("p").str.extract(r":(\d+)$", 1).cast(pl.Int64).alias("done")))
    restored = (spent_pairs.join(done_pairs, on=["idx", "program_id"])
                .group_by("idx").agg(pl.col("done").sum().alias("grants_done"),
                                     pl.col("done").filter(pl.col("program_id").is_in(sorted(cashback_programs)))
                                     .sum().alias("grant_cashback_done")))
    # Clawed per `index/source`, matched to the line entries it nets.
    clawed = (parts.select("idx", "member", "occurred_at_us", "month", "lines_id",
                           pl.col("clawed").str.extract_all(r'"\d+/[^"]*":\d+').alias("p")).explode("p")
              .drop_nulls("p").with_columns(
                  pl.col("p").str.extract(r'^"(\d+)/', 1).cast(pl.Int64).alias("index"),
                  pl.col("p").str.extract(r'^"\d+/([^"]*)"', 1).alias("source"),
                  pl.col("p").str.extract(r":(\d+)$", 1).cast(pl.Int64).alias("clawed"))
              .join(lines.entry_frame(), on=["lines_id", "index", "source"]))
    per_row = (parts.select("idx", pl.col("charged", "points", "base").cast(pl.Int64))
               .join(restored, on="idx", how="left")
               .join(clawed.group_by("idx").agg(pl.col("clawed").sum()), on="idx", how="left")
               .fill_null(0))
    positions = per_row["idx"].cast(pl.UInt32)

    def column(name: str) -> pl.Series:
        return pl.repeat(0, plain.height, dtype=pl.Int64, eager=True).scatter(positions, per_row[name])

    plain = plain.with_columns(
        pl.col("spent_charged_won") - column("charged"), pl.col("spent_points_won") - column("points"),
        pl.col("spent_grants_won") - column("grants_done"),
        pl.col("grant_cashback_won") - column("grant_cashback_done"),
        pl.col("cashback_won") - column("clawed"), column("base").alias("refunded_base"))
    # Before `from` only counted base adds to the month: base less the refunded base.
    plain = plain.with_columns(pl.col("base_won") - pl.col("refunded_base"))
    return plain.drop("refunded_base"), clawed.select("member", "occurred_at_us", "month", "component_id", "source",
                                                      "clawed")


def _in_time_order(rows: pl.DataFrame) -> pl.DataFrame:
    """Rows in (occurred_at_us, payment_id) order: a stable sort on the integer time,
    then only the rows that share a time with a neighbour ordered by payment_id (the
    book's rows come nearly in time order, and ties are rare), without sorting 20
    million strings."""
    rows = rows.sort("occurred_at_us", maintain_order=True)
    time = pl.col("occurred_at_us")
    tied = rows.select(((time == time.shift(1)) | (time == time.shift(-1))).fill_null(False)).to_series()
    if not tied.any():
        return rows
    positions = tied.arg_true()
    tied_rows = rows.select("occurred_at_us", "payment_id").gather(positions).with_columns(positions.alias("at"))
    order = pl.int_range(rows.height, dtype=pl.UInt32, eager=True).scatter(
        positions, tied_rows.sort("occurred_at_us", "payment_id")["at"].cast(pl.UInt32))
    return rows[order]


def _in_book_order(conn: Connection, rows: pl.DataFrame, member_ids: pl.Series) -> tuple[pl.DataFrame, pl.Series]:
    """`rows` (in time order: member codes, payment_id, occurred_at_us, recorded_at_us)
    with each member's payments in the order the book paid them (`BOOK_ORDER`), put in
    that member's own positions, so every other row keeps its place; and the codes of
    the members whose order that moved. The book judged a backdated payment (recorded
    after a later-dated one of its member) from the band room and cap room the payments
    recorded before it left, and a member's payments of one batch in the batch's order;
    evaluated in time order, the preview was not the book under the draft where a band
    or a cap binds (the preview fuzz: 14 of 30 books with backdated payments, off by 1
    to 476 won). Only the members whose times and recording disagree, or who have two
    payments in one batch, are sorted (and only those batches' places are read,
    `_batch_positions`); the rest cost one pass over the member and recording columns."""
    empty = pl.Series("member", [], dtype=pl.UInt32)
    if rows.height < 2:
        return rows, empty
    # Per member in time order: a payment recorded no later than the one before it.
    suspects = (rows.select("member", "recorded_at_us").group_by("member")
                .agg((pl.col("recorded_at_us").diff() <= 0).any().alias("suspect"))
                .filter("suspect")["member"])
    if suspects.is_empty():
        return rows, empty
    ours = (rows.select("member", "payment_id", "occurred_at_us", "recorded_at_us")
            .with_row_index("pos").filter(pl.col("member").is_in(suspects.implode())))
    ours = _batch_positions(conn, ours.with_columns(member_ids.gather(ours["member"]).alias("member_id")))
    slots = ours.sort("member", "pos")["pos"]
    paid = ours.sort("member", *BOOK_ORDER)["pos"]  # batch_txn is null only alone in its batch
    moved = slots != paid
    if not moved.any():
        return rows, empty
    order = pl.int_range(rows.height, dtype=pl.UInt32, eager=True).scatter(slots, paid)
    reordered = rows["member"].gather(slots.filter(moved)).unique().sort()
    return rows[order], reordered


def _group_payments(rows: pl.DataFrame, compact: _Compact) -> pl.DataFrame:
    """A member group's rows in `rules.simulate` form: the member's code as member_id,
    position as payment_id (the rows are in time order but a reordered member's, in the
    order the book paid them: `_in_book_order`), the facts gathered by the position of
    the version the book recorded each under (`_Compact.rows`), or by code."""
    m, mc = compact.member_facts, compact.merchant_facts
    member, merchant = rows["member"], rows["merchant"]
    member_at = rows["member_version"] if "member_version" in rows.columns else member
    merchant_at = rows["merchant_version"] if "merchant_version" in rows.columns else merchant
    return pl.DataFrame({
        "payment_id": pl.int_range(rows.height, dtype=pl.Int64, eager=True),
        "member_id": member.cast(pl.Int64),
        "member_district": m["member_district"].gather(member_at),
        "merchant_id": merchant.cast(pl.Int64),
        "merchant_district": mc["merchant_district"].gather(merchant_at),
        "category": mc["category"].gather(merchant_at),
        "annual_sales_won": mc["annual_sales_won"].gather(merchant_at),
        "flags": mc["flags"].gather(merchant_at),
        "merchant_share_bp": mc["merchant_share_bp"].gather(merchant_at),
        **{name: rows[name] for name in ("amount_won", "occurred_at_us", *SPENT_COLUMNS)},
    })


def _simulate_streamed(conn: Connection, policy: Policy, from_us: int, to_us: int,
                       actual_timeline: PolicyTimeline | None, *, member_differences_max: int, payments_max: int,
                       chunk_rows: int = READ_CHUNK_ROWS, group_rows: int = GROUP_ROWS,
                       timings: dict | None = None, funder_days: list[pl.DataFrame] | None = None,
                       actual_days: list[pl.DataFrame] | None = None) -> tuple[dict, _Compact, PointsFeedback]:
    """The report of `simulate`, with bounded memory: the range read narrow
    (`_read_compact`), then evaluated one member group at a time (members are
    independent: a member's month state never depends on another's) and each group's
    figures added up (`_Parts`). Equal to evaluating the whole range at once
    (tests/test_simulate_read.py, any chunk and group size). `funder_days`, when given,
    gets each group's simulated cashback by funder and day (`_simulated_funder_days`,
    for the budget outlook)."""
    import time

    timings = {} if timings is None else timings
    clock = time.perf_counter()
    compact = _read_compact(conn, from_us, to_us, payments_max=payments_max, chunk_rows=chunk_rows)
    timings["read s"] = round(time.perf_counter() - clock, 3)
    timings["evaluate s"] = timings["aggregate s"] = 0.0
    rows = compact.rows
    groups = max(1, -(-rows.height // group_rows))
    member_names = compact.members["member_id"]
    parts: list[_Parts] = []
    feedback = PointsFeedback()
    empty_costs = (pl.DataFrame(schema={"component_id": pl.String, "amount_won": pl.Int64}),
                   pl.DataFrame(schema={"source": pl.String, "amount_won": pl.Int64}))
    for group in range(groups):
        part = rows.filter(pl.col("member") % groups == group) if groups > 1 else rows
        in_group = (pl.col("member_id") % groups == group) if groups > 1 else pl.lit(True)
        start = MonthStart(compact.start.months.filter(in_group), compact.start.components.filter(in_group))
        # A group with a member whose payments the book paid out of their time order is
        # evaluated in the rows' order (each member-month's in the order the book paid it).
        as_given = bool((compact.reordered % groups == group).any()) if groups > 1 else not compact.reordered.is_empty()
        clock = time.perf_counter()
        payments = _group_payments(part, compact)
        if actual_timeline is None:
            actual = Costs(part.select(pl.int_range(pl.len(), dtype=pl.UInt32).alias("row"),
                                       pl.col("held_cashback_won").alias("cashback_won")), *empty_costs)
        else:
            evaluated = evaluate_frame(actual_timeline, payments, start, as_given=as_given)
            if actual_days is not None:
                actual_days.append(_simulated_funder_days(evaluated, part["occurred_at_us"]))
            actual = costs_of(evaluated)
            del evaluated
        # Each payment re-split by the points the member holds under the draft (paid as
        # cashback, spent before charged money) beside the actual side's, evaluated until
        # no split moves (settlement.points_model).
        simulated, fed = evaluate_with_points(policy, payments, start, _per_row(payments.height, actual),
                                              part["member"], actual_timeline, as_given=as_given)
        feedback.merge(fed)
        if funder_days is not None:
            funder_days.append(_simulated_funder_days(simulated, part["occurred_at_us"]))
        del payments, part
        timings["evaluate s"] += time.perf_counter() - clock
        clock = time.perf_counter()
        parts.append(_summary_parts(simulated, actual, member_differences_max=member_differences_max,
                                    member_names=member_names))
        del simulated, actual
        timings["aggregate s"] += time.perf_counter() - clock
    timings["groups"] = groups
    feedback.insufficient_payments = compact.insufficient
    if actual_timeline is None:  # what the payments hold by component and funder, once
        recorded = _Parts(0, 0, 0, 0, 0, empty_costs[0], _frame(compact.held_components, "component_id"),
                          empty_costs[1], _frame(compact.held_funders, "source"),
                          parts[0].districts.head(0), parts[0].tiers.head(0), 0, 0, 0, 0, 0, 0, parts[0].shown.head(0))
        parts.append(recorded)
    return _report(_merge_parts(parts, member_differences_max), member_differences_max), compact, feedback


# ---------------------------------------------------------------- the report


def _tier(sales: pl.Expr) -> pl.Expr:
    expr = pl.lit(TIERS[-1][0])
    for label, ceiling in reversed(TIERS[:-1]):
        expr = pl.when(sales <= ceiling).then(pl.lit(label)).otherwise(expr)
    return expr


def _side_by_side(simulated: pl.DataFrame, actual: pl.DataFrame, key: str) -> list[dict]:
    """Σ amount_won by key on both sides: [{key, simulated_won, actual_won, delta_won}]."""
    def sums(frame: pl.DataFrame, name: str) -> pl.DataFrame:
        return (frame.group_by(key).agg(pl.col("amount_won").sum().alias(name))
                .with_columns(pl.col(key).cast(pl.String)))
    both = sums(simulated, "simulated_won").join(sums(actual, "actual_won"), on=key, how="full", coalesce=True)
    both = both.with_columns(pl.col("simulated_won", "actual_won").fill_null(0).cast(pl.Int64))
    both = both.with_columns((pl.col("simulated_won") - pl.col("actual_won")).alias("delta_won")).sort(key)
    return both.to_dicts()


def _per_row(n: int, costs: Costs) -> pl.Series:
    return pl.repeat(0, n, dtype=pl.Int64, eager=True).scatter(costs.payments["row"], costs.payments["cashback_won"])


@dataclass
class _Parts:
    """The report's figures over a set of payments, in a form that adds up: the parts of
    disjoint member groups merge into the parts of their union (`_merge_parts`)."""

    count: int
    counted: int
    declined: int
    simulated_won: int
    actual_won: int
    sim_components: pl.DataFrame  # component_id, amount_won
    act_components: pl.DataFrame
    sim_funders: pl.DataFrame  # source, amount_won
    act_funders: pl.DataFrame
    districts: pl.DataFrame  # merchant_district, simulated_won, actual_won
    tiers: pl.DataFrame  # tier, simulated_won, actual_won
    with_payments: int
    affected: int
    gaining: int
    losing: int
    gained_won: int
    lost_won: int
    shown: pl.DataFrame  # member_id, simulated_won, actual_won, delta_won: the first changed members by id


def _summary_parts(simulated: Evaluation, actual: Costs, *, member_differences_max: int,
                   member_names: pl.Series | None = None) -> _Parts:
    """`summarise`'s figures before they are laid out. `member_names`: when the frame
    carried integer member codes, the member_id of each code."""
    sim = costs_of(simulated)
    p = simulated.payments
    actual_won = _per_row(p.height, actual).gather(p["row"])  # actual in the evaluation's row order
    rows = p.select("member_idx", "merchant_district", _tier(pl.col("annual_sales_won")).alias("tier"),
                    pl.col("cashback_won").alias("simulated_won")).with_columns(actual_won.alias("actual_won"))

    def by(key: str) -> pl.DataFrame:
        return (rows.group_by(key).agg(pl.col("simulated_won").sum(), pl.col("actual_won").sum())
                .with_columns(pl.col(key).cast(pl.String)))

    members = (rows.group_by("member_idx").agg(pl.col("simulated_won").sum(), pl.col("actual_won").sum())
               .with_columns((pl.col("simulated_won") - pl.col("actual_won")).alias("delta_won")))
    changed = members.filter(pl.col("delta_won") != 0)
    gaining, losing = changed.filter(pl.col("delta_won") > 0), changed.filter(pl.col("delta_won") < 0)
    names = simulated.members
    if member_names is not None:
        names = names.with_columns(member_names.gather(names["member_id"].cast(pl.UInt32)).alias("member_id"))
    shown = (changed.join(names, on="member_idx", how="left").sort("member_id").head(member_differences_max)
             .select(pl.col("member_id").cast(pl.String), "simulated_won", "actual_won", "delta_won"))
    totals = rows.select(pl.col("simulated_won").sum(), pl.col("actual_won").sum()).row(0, named=True)
    return _Parts(
        count=p.height, counted=int(p["counts_toward_month"].sum()), declined=int(p["declined"].sum()),
        simulated_won=int(totals["simulated_won"] or 0), actual_won=int(totals["actual_won"] or 0),
        sim_components=sim.by_component, act_components=actual.by_component,
        sim_funders=sim.by_funder, act_funders=actual.by_funder,
        districts=by("merchant_district"), tiers=by("tier"),
        with_payments=members.height, affected=changed.height, gaining=gaining.height, losing=losing.height,
        gained_won=int(gaining["delta_won"].sum()), lost_won=int(-losing["delta_won"].sum()), shown=shown)


def _merge_parts(parts: list[_Parts], member_differences_max: int) -> _Parts:
    def cat(name: str) -> pl.DataFrame:
        return pl.concat([getattr(p, name) for p in parts], how="vertical_relaxed")

    def total(name: str) -> int:
        return sum(getattr(p, name) for p in parts)

    return _Parts(
        **{name: total(name) for name in ("count", "counted", "declined", "simulated_won", "actual_won",
                                          "with_payments", "affected", "gaining", "losing", "gained_won",
                                          "lost_won")},
        **{name: cat(name) for name in ("sim_components", "act_components", "sim_funders", "act_funders",
                                        "districts", "tiers")},
        shown=cat("shown").sort("member_id").head(member_differences_max))


def _report(parts: _Parts, member_differences_max: int) -> dict:
    def by(frame: pl.DataFrame, key: str) -> list[dict]:
        both = (frame.group_by(key).agg(pl.col("simulated_won", "actual_won").sum().cast(pl.Int64))
                .with_columns((pl.col("simulated_won") - pl.col("actual_won")).alias("delta_won")).sort(key))
        return both.to_dicts()

    return {
        "payments": {"count": parts.count, "counted_toward_month": parts.counted,
                     "declined_by_policy": parts.declined},
        "totals": {"simulated_won": parts.simulated_won, "actual_won": parts.actual_won,
                   "delta_won": parts.simulated_won - parts.actual_won},
        "by_component": _side_by_side(parts.sim_components, parts.act_components, "component_id"),
        "by_funder": _side_by_side(parts.sim_funders, parts.act_funders, "source"),
        "by_merchant_district": by(parts.districts, "merchant_district"),
        "by_merchant_tier": by(parts.tiers, "tier"),
        "members": {
            "with_payments": parts.with_payments, "affected": parts.affected,
            "gaining": parts.gaining, "losing": parts.losing,
            "gained_won": parts.gained_won, "lost_won": parts.lost_won,
        },
        "member_differences": parts.shown.to_dicts(),
        "member_differences_truncated": parts.affected > member_differences_max,
        "budgets": BUDGET_NOTE,
    }


def summarise(simulated: Evaluation, actual: Costs, *, member_differences_max: int = MEMBER_DIFFERENCES_MAX) -> dict:
    """The report's figures: simulated vs actual in total, by component, funder,
    merchant district and merchant tier, and which members gain or lose (the first
    `member_differences_max` of them by member_id). `actual` is keyed by the same input
    rows as `simulated`."""
    return _report(_summary_parts(simulated, actual, member_differences_max=member_differences_max),
                   member_differences_max)


def _policy_ids(policy: Policy, from_us: int, to_us: int) -> list[str]:
    """The stacks simulated: the one applied, or a timeline's stacks in force in the range."""
    return list(dict.fromkeys(stack.policy_id for stack in _stacks(policy, from_us, to_us)))


def _stacks(policy: Policy, from_us: int, to_us: int) -> list[CompiledPolicy]:
    return [policy] if isinstance(policy, CompiledPolicy) else policy.in_force_between(from_us, to_us)


def _spend_order_note(policy: Policy, actual: Policy, from_us: int, to_us: int) -> list[str]:
    """A note when the simulated policies spend balances in another order than the ones
    in force did: every payment keeps the split recorded when it was made (the book
    cannot re-split spent money), so that part of the change is not in the figures."""
    def orders(p: Policy) -> list[str]:
        return list(dict.fromkeys(", ".join(stack.spend_order) for stack in _stacks(p, from_us, to_us)))

    simulated, in_force = orders(policy), orders(actual)
    if set(simulated) == set(in_force):
        return []
    return [f"spend_order: the simulated policy spends {' then '.join(f'[{o}]' for o in simulated)} where the "
            f"policies in force spent {' then '.join(f'[{o}]' for o in in_force)}; each payment keeps the split of "
            "grants, points and charged money recorded when it was made, so what the other order would change "
            "(which balance pays, the cashback earned on it under cashback_on, the points left for later payments) "
            "is not in these figures"]


# ---------------------------------------------------------------- the budget outlook


BUDGET_OUTLOOK_NOTE_ROWS = 5  # budgets the note names; the rest are counted


def _simulated_funder_days(simulated: Evaluation, occurred_at_us: pl.Series) -> pl.DataFrame:
    """source, day (the Seoul date as days since 1970), amount_won: a member group's
    simulated cashback by funder and day. `occurred_at_us` is the evaluated frame's,
    which the funding rows' `row` refers to."""
    funding = simulated.funding
    day = ((occurred_at_us + SEOUL_OFFSET_US) // US_PER_DAY).cast(pl.Int32)
    return (funding.select("source", day.gather(funding["row"]).alias("day"), "amount_won")
            .group_by("source", "day").agg(pl.col("amount_won").sum().cast(pl.Int64))
            .with_columns(pl.col("source").cast(pl.String)))


def _months_of(days: list[pl.DataFrame]) -> tuple[dict[str, list[tuple[dt.date, int, int]]],
                                                   dict[tuple[str, int], int]]:
    """Funder days (source, day, amount_won) as source -> [(date, month_key, won)] in day
    order, and their sums per (source, month_key)."""
    by_day: dict[str, list[tuple[dt.date, int, int]]] = defaultdict(list)
    by_month: dict[tuple[str, int], int] = defaultdict(int)
    frame = (pl.concat(days).group_by("source", "day").agg(pl.col("amount_won").sum()).sort("source", "day")
             if days else pl.DataFrame(schema={"source": pl.String, "day": pl.Int32, "amount_won": pl.Int64}))
    for source, day, amount in frame.iter_rows():
        date = dt.date.fromordinal(day + EPOCH_ORDINAL)
        key = date.year * 100 + date.month
        by_day[source].append((date, key, int(amount)))
        by_month[(source, key)] += int(amount)
    return by_day, by_month


def budget_outlook(conn: Connection, from_us: int, to_us: int, held: dict[tuple[str, int], int],
                   simulated_days: list[pl.DataFrame], actual_days: list[pl.DataFrame] | None = None) -> list[dict]:
    """Each funder budget (month and year periods, as `GET /v1/budgets` gives them) that
    [from, to) touches, with the range's cashback replaced by the draft's: `committed`
    as the book has it now, less what the range's payments hold for that source and
    period (`held`, per (source, month_key): what `committed` counts of them), plus
    what the simulation gives them (`simulated_days`: source, day, amount_won). Sources
    the range pays with no budget row are listed with `limit` null (not limited, as
    the book would create the row). `over_limit_won`: how far the draft would pass the
    limit (0 without one). `runs_out_on`: the first day of the range on which the
    period's other commitments plus the draft's cashback through that day pass the
    limit, counting the rest of the range's months (their payments outside the range)
    as spent before the range and a year's later months as after it; null when the
    limit is not passed within the range. Budgets are still not applied to the
    simulated payments: the book would cut or skip what a budget cannot cover.
    `actual_days` (beside an `actual_timeline`): the policies in force re-evaluated the
    same way, by funder and day; the draft's change is then measured against them
    (`range_actual_won`) rather than against what the payments hold, which the net
    payment model does not give back where a refund falls inside a month (a draft that
    changed nothing showed a budget over its limit: the preview fuzz)."""
    b = s.budgets
    keys = _month_keys(from_us, to_us)
    texts = [month_text(key) for key in keys]
    years = sorted({text[:4] for text in texts})
    touched = {*texts, *years}
    table: dict[tuple[str, str], tuple[int | None, int]] = {}
    for source, period, limit, committed in conn.execute(
            select(b.c.source, b.c.period, b.c.limit_won, b.c.committed_won)
            .where(sa_func.substr(b.c.period, 1, 4).in_(years))):
        table[(source, period)] = (limit, committed)
    sim_days, sim_months = _months_of(simulated_days)
    actual_months = held if actual_days is None else _months_of(actual_days)[1]
    periods = {key: (month_text(key), month_text(key)[:4]) for key in keys}
    rows = {row for row in table if row[1] in touched}
    for source, key in (*held, *sim_months, *actual_months):
        if key in periods:
            rows.update((source, period) for period in periods[key])
    out = []
    for source, period in sorted(rows):
        limit, committed = table.get((source, period), (None, 0))
        mine = [key for key in keys if period in periods[key]]
        held_won = sum(held.get((source, key), 0) for key in mine)
        simulated_won = sum(sim_months.get((source, key), 0) for key in mine)
        actual_won = sum(actual_months.get((source, key), 0) for key in mine)
        projected = committed - actual_won + simulated_won
        over = max(0, projected - limit) if limit is not None else 0
        runs_out_on = None
        if over:
            later = sum(c for (src, per), (_, c) in table.items()
                        if src == source and len(per) == 7 and per[:4] == period and month_key(per) > keys[-1])
            spent = committed - actual_won - later
            for date, key, amount in sim_days.get(source, ()):
                if key in mine:
                    spent += amount
                    if spent > limit:
                        runs_out_on = date.isoformat()
                        break
        out.append({"source": source, "period": period, "limit": limit, "committed": committed,
                    "range_held_won": held_won, "range_actual_won": actual_won, "range_simulated_won": simulated_won,
                    "simulated_committed": projected, "over_limit_won": over, "runs_out_on": runs_out_on})
    return out


# The answers that may hold a budget-cut line: both reasons (`budget_partial`,
# `budget_skip`) by one pattern, each answer's lines checked after.
BUDGET_REASON_LIKE = '%"reason":"budget%'


def _budget_cut_in_range(conn: Connection, from_us: int, to_us: int) -> int:
    """How many approved payments of [from, to) a budget cut or skipped a component of (a
    cashback line with reason `budget_partial` or `budget_skip` in their answer, as
    `_budget_short_in_range` finds them: one scan of the range's payment rows)."""
    from ledger.book import BUDGET_SHORT_REASONS

    p = s.payments
    found = 0
    for (response,) in conn.execute(select(p.c.response).where(
            p.c.status == "approved", p.c.occurred_at_us >= from_us, p.c.occurred_at_us < to_us,
            p.c.response.like(BUDGET_REASON_LIKE))):
        lines = orjson.loads(response)["cashback"]["components"]
        found += any(line.get("reason") in BUDGET_SHORT_REASONS for line in lines)
    return found


def _budget_cut_note(conn: Connection, from_us: int, to_us: int, outlook: list[dict]) -> list[str]:
    """Beside the policies in force re-evaluated: a note naming the limited budgets whose
    range the re-evaluation prices above what the payments hold, when budgets cut
    payments of the range. The re-evaluation applies no budget, so what a budget cut is
    in `range_actual_won` as if it had been committed, and `simulated_committed`
    (committed − range_actual_won + range_simulated_won) fell short by it: a 15% draft
    over a city budget spent to its 31,111 won limit showed 7,711 committed, within the
    limit, where the draft's 145,800 would pass it by 114,689 (budget audit). The note
    gives the draft measured against what the payments hold (committed − range_held_won
    + range_simulated_won), which is exact when no refund falls inside a month of the
    range and otherwise high (the net payment model, `budget_outlook`): the two bound it."""
    # The budgets the draft would pass measured that way (not only those at their limit
    # now: a skip leaves a budget short of it, having cut as surely).
    at_limit = [(row, held_basis) for row in outlook if row["limit"] is not None
                for held_basis in (row["committed"] - row["range_held_won"] + row["range_simulated_won"],)
                if row["range_actual_won"] > row["range_held_won"] and held_basis > row["limit"]]
    if not at_limit or not (cut := _budget_cut_in_range(conn, from_us, to_us)):
        return []
    named = "; ".join(
        f"{row['source']} {row['period']}: {held_basis:,} won committed with the draft, over its limit by "
        f"{held_basis - row['limit']:,} (against {row['simulated_committed']:,})"
        for row, held_basis in at_limit[:BUDGET_OUTLOOK_NOTE_ROWS])
    more = f"; and {len(at_limit) - BUDGET_OUTLOOK_NOTE_ROWS:,} more" if len(at_limit) > BUDGET_OUTLOOK_NOTE_ROWS \
        else ""
    return [f"budget outlook: budgets cut or skipped cashback of {cut:,} payment{'s' if cut > 1 else ''} in the "
            "range, which the policies in force re-evaluated (no budgets) price in full, so simulated_committed "
            "understates the draft where a budget cut; measured against what the payments hold "
            f"instead (exact unless a refund falls inside a month of the range, then high): {named}{more}"]


def _budget_outlook_note(outlook: list[dict]) -> list[str]:
    """A note naming the budgets the draft would take past their limit, if any."""
    over = [row for row in outlook if row["over_limit_won"] > 0]
    if not over:
        return []
    named = "; ".join(
        f"{row['source']} {row['period']} by {row['over_limit_won']:,} won (limit {row['limit']:,}, "
        f"{row['simulated_committed']:,} committed with the draft"
        + (f", runs out on {row['runs_out_on']}" if row["runs_out_on"] else "") + ")"
        for row in over[:BUDGET_OUTLOOK_NOTE_ROWS])
    more = f"; and {len(over) - BUDGET_OUTLOOK_NOTE_ROWS:,} more" if len(over) > BUDGET_OUTLOOK_NOTE_ROWS else ""
    return [f"budget outlook: with the draft's cashback in place of what the range's payments hold, {len(over):,} "
            f"budget{'s' if len(over) > 1 else ''} would pass {'their' if len(over) > 1 else 'its'} limit: "
            f"{named}{more}; the book would pay less than these figures there (a component's on_budget_short "
            "cuts or skips what its budget cannot cover); see budget_outlook"]


def simulate(conn_or_engine: Connection | Engine, policy: Policy, from_us: int, to_us: int,
             actual_timeline: PolicyTimeline | None = None, *,
             member_differences_max: int = MEMBER_DIFFERENCES_MAX, payments_max: int = PAYMENTS_MAX,
             **_tuning) -> dict:
    """Re-evaluate the recorded approved payments of [from, to) under `policy` (a stack
    applied to every payment, or a timeline) and report them beside what was actually
    paid (what the payments hold: as recorded, net of refunds' clawbacks, or as a posted
    correction re-based them), or beside `actual_timeline` re-evaluated. Read
    narrow and evaluated one member group at a time (`_simulate_streamed`); `_tuning`
    (chunk_rows, group_rows) is for tests and benchmarks."""
    funder_days: list[pl.DataFrame] = []
    actual_days: list[pl.DataFrame] | None = None if actual_timeline is None else []
    with _connection(conn_or_engine) as conn:
        report, compact, feedback = _simulate_streamed(conn, policy, from_us, to_us, actual_timeline,
                                             member_differences_max=member_differences_max,
                                             payments_max=payments_max, funder_days=funder_days,
                                             actual_days=actual_days, **_tuning)
        outlook = budget_outlook(conn, from_us, to_us, compact.held_funder_months, funder_days, actual_days)
        cut_note = [] if actual_timeline is None else _budget_cut_note(conn, from_us, to_us, outlook)
    if actual_timeline is None:
        basis = "held: payments' cashback and funders after refunds' clawbacks and posted corrections"
    else:
        basis = "actual_timeline re-evaluated the same way (no budgets, net payment model)"
    report = {
        "range": {"from": rfc3339(from_us), "to": rfc3339(to_us)},
        "policy_ids": _policy_ids(policy, from_us, to_us),
        "actual_basis": basis,
        "recorded": {"cashback_won": compact.recorded_won, "held_won": int(compact.rows["held_cashback_won"].sum()),
                     "policy_ids": compact.policy_ids, "refunded_payments": compact.refunded},
        **report,
        "points_feedback": feedback.report(),
        "budget_outlook": outlook,
        "notes": [
            *(_spend_order_note(policy, actual_timeline, from_us, to_us) if actual_timeline is not None else []),
            *feedback.note(),
            BUDGET_NOTE,
            *_budget_outlook_note(outlook),
            *cut_note,
            "refunds: each payment is re-evaluated on what is left of it after its refunds (net payment model)",
            "members' and merchants' facts are the registry's as each payment was recorded (fact versions since "
            "migration 0022; before it, as the registry stood at the upgrade)",
            "months start from the payments before `from` as they stand: their base and the cashback they hold "
            "after refunds and posted corrections",
        ],
    }
    log.info("simulate.done", policy_ids=report["policy_ids"], payments=report["payments"]["count"],
             simulated_won=report["totals"]["simulated_won"], actual_won=report["totals"]["actual_won"],
             members_affected=report["members"]["affected"])
    return report


def with_draft(timeline: PolicyTimeline, draft: CompiledPolicy, from_us: int, to_us: int) -> PolicyTimeline:
    """The timeline as it would be had `draft` been activated at `from` for the range:
    the draft replaces its layer's policies from `from` to `to` (other layers keep
    stacking on it), and what was in force at `to` resumes there."""
    kept = [p for p in timeline if p.layer != draft.layer or not from_us <= p.effective_from_us < to_us]
    resume = next((p for p in sorted(timeline, key=lambda p: -p.effective_from_us)
                   if p.layer == draft.layer and p.effective_from_us <= to_us), None)
    policies = [*kept, _at(draft, from_us)]
    if resume is not None and resume.effective_from_us != to_us:
        policies.append(_at(resume, to_us))
    return PolicyTimeline(policies)


def _at(policy: CompiledPolicy, start_us: int) -> CompiledPolicy:
    return replace(policy, effective_from_us=start_us)


# ---------------------------------------------------------------- corrections


@dataclass(frozen=True)
class CorrectionLine:
    member_id: str
    month: str
    delta_won: int  # > 0 extra cashback owed to the member, < 0 to claw back
    by_funder: dict[str, int]
    by_component: dict[str, int]
    # The line per payment: (payment_id, refunded_won the plan saw, ((component_id, funder,
    # won), ...), corrections that had re-based the payment then, the right policy's base:
    # (counts toward the month, (balances that earn cashback, ...))); their sums are
    # `by_funder` and `by_component`.
    payments: tuple[tuple[str, int, tuple[tuple[str, str, int], ...], int, tuple[bool, tuple[str, ...]]], ...] = ()


@dataclass(frozen=True)
class CorrectionPlan:
    lines: list[CorrectionLine]  # member-months that change, by member then month
    wrong_won: int
    right_won: int
    recorded_won: int  # the payments' cashback as recorded, net of refunds' clawbacks
    recorded_mismatch_payments: int  # payments where the wrong policy re-evaluated ≠ what they hold
    payments: int
    # payments of the range (and the rest of its month) an earlier correction had
    # re-based: those the plan touches are planned from what they hold (right − held)
    payments_already_corrected: int = 0
    held_won: int = 0  # what the payments hold now: recorded_won after posted corrections


PLAN_READS_MAX = 3  # a refund of a corrected payment between the plan's two reads: read again


def _signed(frame: pl.DataFrame, key: str, sign: int, owners: pl.DataFrame) -> pl.DataFrame:
    return (frame.select("row", pl.col(key).cast(pl.String), (pl.col("amount_won") * sign).alias("amount_won"))
            .join(owners, on="row", how="left"))


def _deltas(right: Evaluation, wrong: Evaluation, key: str, table: str) -> dict[tuple[str, int], dict[str, int]]:
    """Σ right − Σ wrong per (member, month, key), both joined to the rows' owners."""
    owners = right.payments.select("row", "member_idx", "month_key")
    both = pl.concat([_signed(getattr(right, table), key, 1, owners), _signed(getattr(wrong, table), key, -1, owners)])
    sums = (both.group_by("member_idx", "month_key", key).agg(pl.col("amount_won").sum())
            .filter(pl.col("amount_won") != 0).join(right.members, on="member_idx", how="left")
            .sort("member_id", "month_key", key))
    out: dict[tuple[str, int], dict[str, int]] = defaultdict(dict)
    for member_id, month, name, amount in sums.select("member_id", "month_key", key, "amount_won").iter_rows():
        out[(member_id, month)][name] = amount
    return out


def _signed_funding(evaluation: Evaluation, sign: int) -> pl.DataFrame:
    return evaluation.funding.select(pl.col("row").cast(pl.Int64), pl.col("component_id").cast(pl.String),
                                     pl.col("source").cast(pl.String), pl.col("amount_won") * sign)


def _based(evaluation: Evaluation, suffix: str) -> pl.DataFrame:
    return evaluation.payments.select(pl.col("row").cast(pl.Int64), pl.col("counts_toward_month").alias(f"counts{suffix}"),
                                      pl.col("base_won").alias(f"base{suffix}"))


def _differences(right: Evaluation, other: Evaluation) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """(right − other per (row, component, funder) where not 0, both bases per row, the
    rows whose cashback, counting or base the two give differently)."""
    sums = (pl.concat([_signed_funding(right, 1), _signed_funding(other, -1)])
            .group_by("row", "component_id", "source").agg(pl.col("amount_won").sum())
            .filter(pl.col("amount_won") != 0))
    bases = _based(right, "").join(_based(other, "_other"), on="row")
    rebased = bases.filter((pl.col("counts") != pl.col("counts_other")) | (pl.col("base") != pl.col("base_other")))
    return sums, bases, pl.concat([sums.select("row"), rebased.select("row")]).unique()


def _payment_deltas(right: Evaluation, wrong: Evaluation, payments: pl.DataFrame,
                    cashback_on: Callable[[str, int, int], tuple[str, ...]], also: pl.Series
                    ) -> dict[tuple[str, int], list[tuple[str, int, tuple[tuple[str, str, int], ...], tuple]]]:
    """Right − wrong per payment by (component, funder), grouped by member-month: what
    posting a line re-bases each payment on (`ledger.book.correct_payment`). With each
    payment the amount its refunds had given back when it was read (its spend columns
    are net of them), so posting can tell the refunds made since, and the right
    policy's base of it: (counts toward the month, base of what is left, the balances
    it earns cashback on: `cashback_on(member_id, month_key, occurred_at_us)`). A
    payment whose base or counting the two policies give differently is one too,
    whatever its cashback (its parts may be none), and so is each row of `also`."""
    sums, bases, touched = _differences(right, wrong)
    touched = pl.concat([touched, also.cast(pl.Int64).to_frame("row")]).unique()
    owners = (right.payments.select(pl.col("row").cast(pl.Int64), "member_idx", "month_key")
              .join(right.members, on="member_idx", how="left"))
    ids = payments.select(pl.int_range(pl.len(), dtype=pl.Int64).alias("row"), "payment_id", "occurred_at_us",
                          (pl.col("amount_won") - pl.col("spent_charged_won") - pl.col("spent_points_won")
                           - pl.col("spent_grants_won")).alias("refunded_won"))
    rows = (touched.join(sums, on="row", how="left").join(bases, on="row").join(owners, on="row", how="left")
            .join(ids, on="row", how="left").sort("member_id", "month_key", "payment_id", "component_id", "source"))
    out: dict[tuple[str, int], list] = defaultdict(list)
    last = None
    for member_id, month, payment_id, refunded, at_us, counts, base, component_id, source, amount in rows.select(
            "member_id", "month_key", "payment_id", "refunded_won", "occurred_at_us", "counts", "base",
            "component_id", "source", "amount_won").iter_rows():
        if last != (member_id, month, payment_id):
            last = (member_id, month, payment_id)
            base = (counts, base, cashback_on(member_id, month, at_us))
            out[(member_id, month)].append((payment_id, refunded, [], base))
        if component_id is not None:
            out[(member_id, month)][-1][2].append((component_id, source, amount))
    return {key: [(p, r, tuple(parts), b) for p, r, parts, b in entries] for key, entries in out.items()}


def _budget_kept(right: dict[tuple[str, str], int], granted: dict[str, dict[str, int]]
                 ) -> dict[tuple[str, str], int]:
    """What a correction plans a payment to hold per (component, funder): what the right
    policy gives it, except on a component a budget cut or skipped when the payment was
    made (`granted`: what the answer's lines paid each of its funders then, less what
    the payment's refunds clawed back of it), where each funder is given no more. A
    correction mends a policy, not a budget that ran short, and the plan's two
    evaluations know no budget: planned right −
    wrong, a 2% district top-up skipped whole was paid 1,000 of it by a correction to 3%
    (neither policy's amount: 3,000, or 0 skipped; `skip` pays a component whole or not
    at all), a cut to 1% took back 1,000 it never held, and a 10% payment whose city
    share was cut to its 3,000 budget lost 4,000 under a cut to 6%, where the book under
    it pays national 2,400 and city 3,000 (the money audit and the review of
    2026-12-06i). Against what was granted, not what the payment holds now, so
    corrected down and back it is what it was. Which funder's budget was short the
    answer does not say, so a raise is not paid on such a component to any of its
    funders (docs/design.md, Corrections)."""
    if not granted:
        return right
    out = {key: amount for key, amount in right.items() if key[0] not in granted}
    for component_id, paid in granted.items():
        for (c, source), amount in right.items():
            if c == component_id and min(amount, paid.get(source, 0)):
                out[(c, source)] = min(amount, paid.get(source, 0))
    return out


def _cashback_on(policy: Policy, at_us: int) -> tuple[str, ...]:
    """The balances that earn cashback under the policy in force at `at_us`."""
    stack = policy if isinstance(policy, CompiledPolicy) else policy.in_force(at_us)
    return tuple(sorted(stack.cashback_on)) if stack is not None else ()


def _held_select(*extra) -> Select:
    """payment_id, `extra`, and the columns `_held_row` reads, of the payments."""
    p = s.payments
    return select(p.c.payment_id, *extra, p.c.refunded_won, p.c.detail, p.c.refund_state, p.c.base_won,
                  p.c.counts_toward_month)


def _corrected_in_range(conn: Connection, from_us: int, to_us: int,
                        member_group: MemberGroup | None = None) -> dict[str, tuple]:
    """The approved payments of [from, to) (of `member_group`'s members) that a posted
    correction re-based, each as `_held_row` has it."""
    p = s.payments
    rows = conn.execute(_of_group(conn, _held_select()
                                  .where(p.c.status == "approved", p.c.occurred_at_us >= from_us,
                                         p.c.occurred_at_us < to_us, p.c.refund_state.like('%"corrected":%')),
                                  p.c.member_id, member_group))
    found = {}
    for payment_id, refunded, detail, refund_state, base, counts in rows:
        state = orjson.loads(refund_state)
        if "corrected" in state:
            found[payment_id] = _held_row(refunded, detail, state, base, counts)
    return found


def _paid_after_corrections(conn: Connection, from_us: int, to_us: int,
                            member_group: MemberGroup | None = None) -> dict[str, tuple]:
    """The approved payments of [the start of `from`'s month, to) that no correction
    re-based, recorded since a correction whose range covers their time was planned
    (`approved_corrections`' `planned_us`, its proposal: a backdated payment into a
    month already corrected, or one recorded while the correction waited for its
    approval, in a member-month it has no line for, which nothing refuses): the book
    paid them by the policies activated, not the month as corrected, so they hold other
    than that gives them, and are planned from what they hold, as a re-based payment is.
    (Counted from when the correction took effect instead, a payment recorded between
    its proposal and its posting was planned right - wrong by the next correction: 9,000
    kept where 6% gives 6,000, `tests/test_corrections.py`.) One recorded at the plan's
    instant may or may not be in it: planned from what it holds too, which for a payment
    the correction left as it was is what the month as corrected gives it. Each as
    `_held_row` has it; of `member_group`'s members, with one."""
    approved = approved_corrections(conn, *months_spanned(from_us, to_us))
    if not approved:
        return {}
    p = s.payments
    found: dict[str, tuple] = {}
    # One read: those recorded since the first correction was planned (few: backdated,
    # or recorded while a correction waited for its approval).
    for payment_id, occurred, recorded, refunded, detail, refund_state, base, counts in conn.execute(_of_group(
            conn, _held_select(p.c.occurred_at_us, p.c.recorded_at_us)
            .where(p.c.status == "approved", p.c.occurred_at_us >= _month_start_us(from_us),
                   p.c.occurred_at_us < to_us, p.c.recorded_at_us >= min(a.planned_us for a in approved),
                   ~p.c.refund_state.like('%"corrected":%')), p.c.member_id, member_group)):
        if any(a.prior.from_us <= occurred < a.prior.to_us and recorded >= a.planned_us for a in approved):
            found[payment_id] = _held_row(refunded, detail, orjson.loads(refund_state), base, counts)
    return found


def _held_row(refunded: int, detail: str, state: dict, base: int, counts: bool) -> tuple:
    """A payment as a plan takes it from what it holds: (refunded_won, how many
    corrections re-based it, what it holds now per (component, funder), after its
    refunds: `ledger.book.cashback_held`, its base now: (counts toward the month, base
    left after its refunds))."""
    from ledger.book import cashback_held, corrections_of

    return (refunded, corrections_of(state), cashback_held(orjson.loads(detail), state),
            (bool(counts), base - state.get("base", 0) if counts else 0))


def _recorded_after(payments: pl.DataFrame, first: set[str]) -> set[str]:
    """The payments of `payments` (in `BOOK_ORDER`) recorded after one of `first` in its
    member-month: the book paid them from the band position and cap room that one left
    as the policies activated gave it, not as the month as corrected does, so they hold
    other than that gives them too (a 10억 shop's payment after a 40억 shop's that a
    correction to a 50억 ceiling counts)."""
    marked = payments.select("payment_id", "member_id", month_key_of(pl.col("occurred_at_us")).alias("month"),
                             pl.col("payment_id").is_in(sorted(first)).cast(pl.Int8).alias("first"))
    after = marked.with_columns(pl.col("first").cum_max().over("member_id", "month").alias("after"))
    return set(after.filter((pl.col("after") == 1) & (pl.col("first") == 0))["payment_id"].to_list())


def _held_of(conn: Connection, payment_ids: set[str]) -> dict[str, tuple]:
    """`_held_row` of each of `payment_ids` that no correction re-based."""
    p, ids, found = s.payments, sorted(payment_ids), {}
    for i in range(0, len(ids), 10_000):
        for payment_id, refunded, detail, refund_state, base, counts in conn.execute(
                _held_select().where(p.c.payment_id.in_(ids[i:i + 10_000]), ~p.c.refund_state.like('%"corrected":%'))):
            found[payment_id] = _held_row(refunded, detail, orjson.loads(refund_state), base, counts)
    return found


def _budget_short_in_range(conn: Connection, payments: pl.DataFrame, corrected: dict[str, tuple],
                           member_group: MemberGroup | None = None
                           ) -> tuple[dict[str, tuple], dict[str, dict[str, dict[str, int]]]]:
    """The payments of `payments` (the range read) that a budget cut or skipped a
    component of (a cashback line with reason `budget_partial` or `budget_skip` in the
    answer the payment was given: the detail's lines do not keep it): `_held_row` of
    those no correction re-based (the others are in `corrected`), and of each, what the
    answer paid each funder of each component so cut (its lines' `funded_by`, summed
    over its bands: what the budgets granted then). Found by the answers' text (`LIKE`,
    as `_corrected_in_range` finds the corrected), so a range with none costs one scan
    of its payment rows (of `member_group`'s members, with one: `payments` is theirs)."""
    from ledger.book import BUDGET_SHORT_REASONS

    p = s.payments
    ids = set(payments["payment_id"].to_list())
    if not ids:
        return {}, {}
    first = int(payments["occurred_at_us"].min())
    last = int(payments["occurred_at_us"].max())
    held: dict[str, tuple] = {}
    granted: dict[str, dict[str, dict[str, int]]] = {}
    rows = conn.execute(_of_group(conn, _held_select(p.c.response).where(
        p.c.status == "approved", p.c.occurred_at_us >= first, p.c.occurred_at_us <= last,
        p.c.response.like(BUDGET_REASON_LIKE)),  # each line checked below
        p.c.member_id, member_group))
    for payment_id, response, refunded, detail, refund_state, base, counts in rows:
        if payment_id not in ids:
            continue
        lines = orjson.loads(response)["cashback"]["components"]
        cut = {line["component"] for line in lines if line.get("reason") in BUDGET_SHORT_REASONS}
        if not cut:
            continue
        paid: dict[str, dict[str, int]] = {component_id: {} for component_id in cut}
        for line in lines:
            if line["component"] in cut:
                for source, amount in line["funded_by"].items():
                    paid[line["component"]][source] = paid[line["component"]].get(source, 0) + amount
        state = orjson.loads(refund_state)
        refunded_base = state.get("base", 0)
        if refunded_base and base:
            # Of what is left after its refunds, as the right policy is evaluated on what
            # is left: less what the refunds' clawback formula took of the whole (a half
            # refunded payment, corrected to 11%, was given its city share of the whole).
            for by_source in paid.values():
                for source, amount in by_source.items():
                    by_source[source] = amount - amount * refunded_base // base
        granted[payment_id] = paid
        if payment_id not in corrected:
            held[payment_id] = _held_row(refunded, detail, state, base, counts)
    return held, granted


@dataclass(frozen=True)
class PriorCorrection:
    """A correction posted for a member-month: its right policy over its range."""

    right_policy_id: str
    from_us: int
    to_us: int


# The (as corrected so far, right) timelines of a member-month whose corrections are
# these, in the order they took effect (`ledger.corrections` builds them).
PriorTimelines = Callable[[tuple[PriorCorrection, ...]], tuple[Policy, Policy]]


def _month_keys(from_us: int, to_us: int) -> list[int]:
    first, last = local_date(from_us), local_date(to_us - 1)
    keys, (year, month) = [], (first.year, first.month)
    while (year, month) <= (last.year, last.month):
        keys.append(year * 100 + month)
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return keys


def _month_bounds(key: int) -> tuple[int, int]:
    year, month = divmod(key, 100)
    return (local_midnight_us(dt.date(year, month, 1)),
            local_midnight_us(dt.date(year + month // 12, month % 12 + 1, 1)))


@dataclass(frozen=True)
class _Approved:
    correction_id: str
    prior: PriorCorrection
    at_us: int  # when it took effect: its first line's posting, else its approval
    planned_us: int  # when it was planned (its proposal's time, taken before the plan read the book)


def approved_corrections(conn: Connection, from_us: int, to_us: int) -> list[_Approved]:
    """The corrections approved (their lines posted, or refused) whose range overlaps
    [from, to), in the order they took effect. One whose lines were all refused at first
    takes its place when a retry posts one; no other correction over its months can
    have taken effect in between (its retry would be refused, `ledger.corrections.
    _refuse_if_superseded`), so its place among them stays."""
    c, l = s.corrections, s.correction_lines
    first = (select(sa_func.min(l.c.posted_at_us)).where(l.c.correction_id == c.c.correction_id)
             .scalar_subquery())
    at = sa_func.coalesce(first, c.c.updated_at_us)
    return [_Approved(correction_id, PriorCorrection(right, start, end), at_us, planned_us)
            for correction_id, right, start, end, at_us, planned_us in conn.execute(
                select(c.c.correction_id, c.c.right_policy_id, c.c.from_us, c.c.to_us, at, c.c.created_at_us)
                .where(c.c.status.in_(("approved", "posted")), c.c.from_us < to_us, c.c.to_us > from_us)
                .order_by(at, c.c.correction_id))]


def _posted_corrections(conn: Connection, from_us: int, to_us: int, member_group: MemberGroup | None = None
                        ) -> tuple[dict[tuple[str, int], tuple[PriorCorrection, ...]],
                                   dict[int, tuple[PriorCorrection, ...]]]:
    """The corrections in each member-month's timeline as corrected, for the months
    [from, to) touches: every approved correction whose range overlaps the month
    (one that had nothing to post for the member-month left it as its right policy
    has it), but not one whose line for it did not post (refused: the member-month
    is as it was), in the order they took effect (`approved_corrections`). Returns
    (the member-months where a line of one of them did not post, of `member_group`'s
    members with one, the rest by month)."""
    months = _month_keys(from_us, to_us)
    approved = approved_corrections(conn, *months_spanned(from_us, to_us))
    by_month = {key: [a for a in approved if a.prior.from_us < _month_bounds(key)[1]
                      and a.prior.to_us > _month_bounds(key)[0]] for key in months}
    defaults = {key: tuple(a.prior for a in found) for key, found in by_month.items() if found}
    refused: dict[tuple[str, int], set[str]] = defaultdict(set)  # member-month -> corrections whose line did not post
    ids = [a.correction_id for a in approved]
    l = s.correction_lines
    for i in range(0, len(ids), 1_000):
        for member_id, month, correction_id in conn.execute(_of_group(
                conn, select(l.c.member_id, l.c.month, l.c.correction_id)
                .where(l.c.correction_id.in_(ids[i:i + 1_000]), l.c.month.in_([month_text(k) for k in months]),
                       l.c.response.is_(None)), l.c.member_id, member_group)):
            refused[(member_id, month_key(month))].add(correction_id)
    specific = {(member_id, key): tuple(a.prior for a in by_month.get(key, ()) if a.correction_id not in out)
                for (member_id, key), out in refused.items()}
    return specific, defaults


def _right_parts(right: Evaluation, payments: pl.DataFrame, payment_ids: set[str]
                 ) -> dict[str, dict[tuple[str, str], int]]:
    """What the right policy gives each of `payment_ids`, per (component, funder)."""
    ids = (payments.select(pl.int_range(pl.len(), dtype=pl.Int64).alias("row"), "payment_id")
           .filter(pl.col("payment_id").is_in(sorted(payment_ids))))
    funding = (right.funding.select(pl.col("row").cast(pl.Int64), pl.col("component_id").cast(pl.String),
                                    pl.col("source").cast(pl.String), "amount_won")
               .join(ids, on="row").group_by("payment_id", "component_id", "source").agg(pl.col("amount_won").sum()))
    out: dict[str, dict[tuple[str, str], int]] = defaultdict(dict)
    for payment_id, component_id, source, amount in funding.iter_rows():
        out[payment_id][(component_id, source)] = amount
    return out


def _read_for_plan(conn_or_engine: Connection | Engine, from_us: int, to_us: int, payments_max: int, *,
                   member_group: MemberGroup | None = None
                   ) -> tuple[Loaded, dict[str, tuple], tuple[dict, dict], dict[str, tuple],
                              tuple[dict[str, tuple], dict[str, dict[str, dict[str, int]]]]]:
    """The range (`load_range`), its corrected payments (`_corrected_in_range`), its
    member-months' posted corrections (`_posted_corrections`), its payments recorded
    since a correction over them was planned (`_paid_after_corrections`) and those a
    budget cut or skipped a component of (`_budget_short_in_range`). Not one snapshot
    (PostgreSQL reads the range on a connection of its own): a refund of a corrected
    payment between them would pair a right policy evaluated on more of the payment with
    what it holds after the refund, so then all are read again. (A line posted between
    them re-based payments the plan saw before it: posting refuses those lines,
    `payment_corrected_since_planned`.) With `member_group`, every read is of that
    group's members alone, and so is the check and the read again: what it pairs is
    one payment's, so one group's reads agreeing is all the plan of the group needs."""
    from ledger.errors import Conflict

    for _ in range(PLAN_READS_MAX):
        with _connection(conn_or_engine) as conn:
            loaded = load_range(conn, from_us, to_us, payments_max=payments_max, member_group=member_group)
            # From the month's start: a payment before `from` recorded late is re-evaluated.
            corrected = _corrected_in_range(conn, _month_start_us(from_us), to_us, member_group)
            posted = _posted_corrections(conn, from_us, to_us, member_group)
            paid_after = _paid_after_corrections(conn, from_us, to_us, member_group)
            if corrected or paid_after:
                read = set(loaded.payments.filter(pl.col("payment_id").is_in(sorted({*corrected, *paid_after})))
                           ["payment_id"].to_list())
                corrected = {payment_id: row for payment_id, row in corrected.items() if payment_id in read}
                paid_after = {payment_id: row for payment_id, row in paid_after.items() if payment_id in read}
            if paid_after:  # and those of their member-months the book recorded after them
                paid_after |= _held_of(conn, _recorded_after(loaded.payments, set(paid_after)) - set(corrected))
            short = _budget_short_in_range(conn, loaded.payments, corrected, member_group)
        held_read = {**short[0], **paid_after, **corrected}
        if not held_read:
            return loaded, corrected, posted, paid_after, short
        seen = (loaded.payments.filter(pl.col("payment_id").is_in(sorted(held_read)))
                .select("payment_id", (pl.col("amount_won") - pl.col("spent_charged_won") - pl.col("spent_points_won")
                                       - pl.col("spent_grants_won")).alias("refunded_won")))
        if all(held_read[payment_id][0] == refunded for payment_id, refunded in seen.iter_rows()):
            return loaded, corrected, posted, paid_after, short
    raise Conflict("corrected payments of the range were refunded while the correction was planned; propose it again")


def _row_keys(payments: pl.DataFrame, posted: tuple[dict[tuple[str, int], tuple[PriorCorrection, ...]],
                                                   dict[int, tuple[PriorCorrection, ...]]]
              ) -> tuple[pl.Series, list[tuple[PriorCorrection, ...]]]:
    """Each row's index into the distinct histories of corrections (`_posted_corrections`)
    of its member-month (0: none)."""
    specific, defaults = posted
    histories = [(), *sorted({*specific.values(), *defaults.values()} - {()}, key=repr)]
    if len(histories) == 1:
        return pl.repeat(0, payments.height, dtype=pl.UInt32, eager=True), histories
    index = {history: i for i, history in enumerate(histories)}
    own = pl.DataFrame({"member_id": [m for m, _ in specific], "month_key": [k for _, k in specific],
                        "key": [index[h] for h in specific.values()]},
                       schema={"member_id": pl.String, "month_key": pl.Int32, "key": pl.UInt32})
    by_month = pl.DataFrame({"month_key": list(defaults), "month_default": [index[h] for h in defaults.values()]},
                            schema={"month_key": pl.Int32, "month_default": pl.UInt32})
    rows = payments.select(pl.col("member_id").cast(pl.String),
                           month_key_of(pl.col("occurred_at_us")).alias("month_key"))
    keyed = (rows.join(own, on=["member_id", "month_key"], how="left", maintain_order="left")
             .join(by_month, on="month_key", how="left", maintain_order="left"))
    return keyed.select(pl.coalesce("key", "month_default", pl.lit(0, pl.UInt32)))["key"], histories


def _strings(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.with_columns(pl.col(name).cast(pl.String) for name, dtype in frame.schema.items()
                              if isinstance(dtype, (pl.Enum, pl.Categorical)))


def _evaluate_keyed(policies: dict[int, Policy], keys: pl.Series, payments: pl.DataFrame, start: MonthStart
                    ) -> Evaluation:
    """The rows of each key evaluated under its own policy (a member-month's rows all have
    one key, so each month runs whole), as one evaluation over the rows of `policies`'
    keys: rows are the input positions, members numbered anew, enums as strings."""
    present = set(keys.unique().to_list())
    if present <= {0} and 0 in policies:
        return evaluate_frame(policies[0], payments, start, as_given=True)
    parts = []
    for key in sorted(set(policies) & present):
        rows = keys.eq(key).arg_true().cast(pl.UInt32)
        evaluation = evaluate_frame(policies[key], payments[rows], start, as_given=True)
        parts.append((rows, evaluation))
    members = pl.concat([e.members["member_id"].cast(pl.String) for _, e in parts]).unique(maintain_order=True)
    number = {member_id: i for i, member_id in enumerate(members.to_list())}

    def placed(frame: pl.DataFrame, rows: pl.Series, evaluation: Evaluation) -> pl.DataFrame:
        frame = _strings(frame).with_columns(rows.gather(frame["row"].cast(pl.Int64)).alias("row"))
        if "member_idx" in frame.columns:
            local = evaluation.members
            frame = frame.with_columns(pl.col("member_idx").replace_strict(
                local["member_idx"], [number[m] for m in local["member_id"].cast(pl.String).to_list()],
                return_dtype=pl.UInt32))
        return frame

    def joined(table: str) -> pl.DataFrame:
        frames = [placed(getattr(e, table), rows, e) for rows, e in parts]
        return pl.concat(frames, how="vertical_relaxed").sort("row", maintain_order=True)

    return Evaluation(payments=joined("payments"),
                      members=pl.DataFrame({"member_idx": pl.Series(range(len(number)), dtype=pl.UInt32),
                                            "member_id": members}),
                      lines=joined("lines"), funding=joined("funding"))


# Payments a correction's plan reads at a time (the range's, from its first month's
# start): one member group's (`correction_plan`). Peak memory follows it: ~2.2 GiB at
# 1,000,000, ~4 GiB at 2,000,000, about as fast (docs/performance.md, Simulation).
PLAN_GROUP_ROWS = 1_000_000
# Payments a correction's plan may change: its lines keep a row per payment changed, all
# groups' together, ~0.9 GiB per million (docs/performance.md, Simulation).
PLAN_PAYMENTS_CHANGED_MAX = 4_000_000


def correction_plan(conn_or_engine: Connection | Engine, wrong: Policy, right: Policy, from_us: int, to_us: int, *,
                    payments_max: int = PAYMENTS_MAX, rest_of_month: bool = False,
                    timelines: PriorTimelines | None = None, group_rows: int | None = None,
                    payments_changed_max: int | None = None) -> CorrectionPlan:
    """Each member-month's over- or under-payment over [from, to), and the same per
    payment by component and funder (`CorrectionLine.payments`).

    Each member-month is evaluated under the timeline as its corrections left it (the
    wrong side) and under the right policy drafted over the range on top of it:
    `timelines(history)` gives both; without `timelines`, `wrong` and `right` serve every
    member-month, corrections left out. The payments the plan touches are those whose
    cashback, base or counting toward the month the two give differently, and those a
    correction re-based whose base is not the right policy's. A payment no correction
    has re-based gets right − wrong; one a posted correction re-based, or recorded since
    a correction over it was planned, gets right − what it holds now (its cashback after
    that correction and its refunds), so no payment is planned past what the right
    policy gives it. Each payment carries how many
    corrections had re-based it, which posting checks, and the right policy's base,
    which posting puts it on (`ledger.book.correct_payment`).

    `rest_of_month`: the payments after `to` in its month are re-evaluated too, both
    policies being timelines that resume what was in force at `to` (`with_draft`):
    they differ there only where the range moved their place in the month's bands or
    caps (a payment the right policy counts takes band room a later one was paid for).

    Read and evaluated one member group at a time (`MemberGroup`: every read of the
    plan has the group's members only), of about `group_rows` payments each
    (PLAN_GROUP_ROWS), the payments read counted first (`payments_at_most`, up to
    `payments_max`), so what the plan holds at once is a group's, not the range's.
    Member-months are independent in the plan: each one's payments, month start,
    history of corrections (`_posted_corrections`: per member-month, or per month) and
    held payments are its own, and no budget is evaluated; so the plan is the groups'
    plans merged (`_merged`), equal to the plan read whole (tests/test_corrections_groups.py).
    `payments_max` bounds the range's payments over all groups, as read whole. The
    lines are kept whole, a row per payment changed: more than `payments_changed_max`
    (PLAN_PAYMENTS_CHANGED_MAX) of them is `CorrectionTooLarge`, found at the group
    that passes it."""
    if rest_of_month:
        to_us = _month_end_us(to_us)
    group_rows = PLAN_GROUP_ROWS if group_rows is None else group_rows
    changed_max = PLAN_PAYMENTS_CHANGED_MAX if payments_changed_max is None else payments_changed_max
    if group_rows < 1:
        raise ValueError("a member group holds at least one payment")
    with _connection(conn_or_engine) as conn:
        read = payments_at_most(conn, _month_start_us(from_us), to_us, payments_max)
    groups = max(1, -(-read // group_rows))
    plans, left, changed = [], payments_max, 0
    for group in range(groups):
        member_group = MemberGroup(group, groups) if groups > 1 else None
        try:
            plan, in_range = _plan_of_group(conn_or_engine, wrong, right, from_us, to_us, left, timelines,
                                            member_group)
        except RangeTooLarge:  # found past the groups before: the bound over all of them
            raise _too_many(payments_max) from None
        left -= in_range
        changed += sum(len(line.payments) for line in plan.lines)
        if changed > changed_max:
            raise CorrectionTooLarge(f"the correction changes more than {changed_max:,} payments, more than a "
                                     "proposal holds; nothing was proposed: propose it over a shorter range",
                                     payments_changed_max=changed_max)
        plans.append(plan)
    plan = _merged(plans)
    if plan.recorded_mismatch_payments:
        log.warning("correction.recorded_mismatch", payments=plan.recorded_mismatch_payments, groups=groups,
                    hint="the wrong policy re-evaluated differs from what the payments hold (budgets, refunds, "
                         "order, corrections)")
    return plan


def _merged(plans: list[CorrectionPlan]) -> CorrectionPlan:
    """Disjoint member groups' plans as one: their lines by member then month (as each
    group's are, `sorted` on (member_id, month key); "YYYY-MM" sorts as its key), and
    every other field, a count or a sum over its group's payments, summed."""
    if len(plans) == 1:
        return plans[0]
    lines = sorted((line for plan in plans for line in plan.lines), key=lambda line: (line.member_id, line.month))
    sums = {f.name: sum(getattr(plan, f.name) for plan in plans) for f in fields(CorrectionPlan) if f.name != "lines"}
    return CorrectionPlan(lines, **sums)


def _plan_of_group(conn_or_engine: Connection | Engine, wrong: Policy, right: Policy, from_us: int, to_us: int,
                   payments_max: int, timelines: PriorTimelines | None, member_group: MemberGroup | None
                   ) -> tuple[CorrectionPlan, int]:
    """`correction_plan` of one member group (all members: None), and how many of its
    payments are of [from, to) (those `payments_max` bounds)."""
    loaded, corrected, posted, paid_after, (short_held, short) = _read_for_plan(
        conn_or_engine, from_us, to_us, payments_max, member_group=member_group)
    # Planned from what they hold: those a correction re-based, those recorded since a
    # correction over them was planned (paid by the policies activated, not as corrected),
    # and those a budget cut or skipped a component of (neither policy evaluated here
    # knows what the budget left them).
    held_now = {**short_held, **paid_after, **corrected}
    if timelines is None:
        posted, timelines = ({}, {}), lambda history: (wrong, right)
    keys, histories = _row_keys(loaded.payments, posted)
    chosen = [timelines(history) for history in histories]  # per key: (as corrected, right)
    wrong_ev = _evaluate_keyed({k: c[0] for k, c in enumerate(chosen)}, keys, loaded.payments, loaded.start)
    right_ev = _evaluate_keyed({k: c[1] for k, c in enumerate(chosen)}, keys, loaded.payments, loaded.start)
    # A corrected payment whose base is not the right policy's (a correction posted
    # before migration 0017 left it as it was) is re-based even where its cashback stays.
    now = pl.DataFrame([(payment_id, *row[3]) for payment_id, row in held_now.items()],
                       schema={"payment_id": pl.String, "counts_now": pl.Boolean, "base_now": pl.Int64}, orient="row")
    rows = (loaded.payments.select(pl.int_range(pl.len(), dtype=pl.Int64).alias("row"), "payment_id")
            .join(now, on="payment_id").join(_based(right_ev, ""), on="row"))
    rebase = rows.filter((pl.col("counts") != pl.col("counts_now")) | (pl.col("base") != pl.col("base_now"))
                         | pl.col("payment_id").is_in(sorted(paid_after)))["row"]
    funders = _deltas(right_ev, wrong_ev, "source", "funding")
    components = _deltas(right_ev, wrong_ev, "component_id", "lines")
    history_index = {history: i for i, history in enumerate(histories)}
    specific, defaults = posted

    def cashback_on(member_id: str, month: int, at_us: int) -> tuple[str, ...]:
        history = specific.get((member_id, month), defaults.get(month, ()))
        return _cashback_on(chosen[history_index[history]][1], at_us)

    per_payment = _payment_deltas(right_ev, wrong_ev, loaded.payments, cashback_on, rebase)
    for member_id, month in sorted(set(funders) | set(components) | set(per_payment)):
        by_funder, by_component = funders.get((member_id, month), {}), components.get((member_id, month), {})
        payments = per_payment.get((member_id, month), ())
        for key, totals in ((1, by_funder), (0, by_component)):
            sums: dict[str, int] = defaultdict(int)
            for _, _, parts, _ in payments:
                for part in parts:
                    sums[part[key]] += part[2]
            # A line's cashback is split among its funders to the won, so both sums agree.
            assert {k: v for k, v in sums.items() if v} == totals, (member_id, month, totals, dict(sums))
    again = {payment_id for entries in per_payment.values() for payment_id, _, _, _ in entries} & set(held_now)
    rights = _right_parts(right_ev, loaded.payments, again) if again else {}
    lines = []
    # A member-month whose payments change while its sums do not (cashback moved between
    # its payments, or only their base) is a line too: it posts nothing and re-bases the
    # payments.
    for member_id, month in sorted(per_payment):
        payments = []
        for payment_id, refunded, parts, (counts, base, cashback_on_) in per_payment[(member_id, month)]:
            seen = 0
            if payment_id in again:
                # The right policy gives it other than the month as corrected: planned from
                # what it holds (which is what that gave it, less what its refunds since
                # clawed back by the contract's formula; a payment the right policy gives
                # what the month as corrected does is not touched, so re-rating what is
                # left, which could differ by a band, a cap or a won, plans nothing).
                _, seen, held, now = held_now[payment_id]
                granted = short.get(payment_id, {})
                target = _budget_kept(rights.get(payment_id, {}), granted)
                planned = tuple((c, f, target.get((c, f), 0) - held.get((c, f), 0))
                                for c, f in sorted({*target, *held}) if target.get((c, f), 0) != held.get((c, f), 0))
                if payment_id in short_held and payment_id not in paid_after:
                    # Read only for its cut components (no correction re-based it): those
                    # from what it holds, the others right − wrong as any payment's (from
                    # what it holds they moved by a band's room or a won neither policy
                    # changes; the fuzz of 2026-12-06i).
                    planned = tuple(sorted([*(part for part in parts if part[0] not in granted),
                                            *(part for part in planned if part[0] in granted)]))
                parts = planned
                if not parts and now == (counts, base):  # it holds what the right policy gives already
                    continue
            payments.append((payment_id, refunded, parts, seen, (counts, cashback_on_)))
        if not payments:
            continue
        by_funder: dict[str, int] = defaultdict(int)
        by_component: dict[str, int] = defaultdict(int)
        for _, _, parts, _, _ in payments:
            for component_id, source, amount in parts:
                by_funder[source] += amount
                by_component[component_id] += amount
        by_funder = {k: v for k, v in sorted(by_funder.items()) if v}
        by_component = {k: v for k, v in sorted(by_component.items()) if v}
        lines.append(CorrectionLine(member_id, month_text(month), sum(by_funder.values()), by_funder, by_component,
                                    tuple(payments)))
    n = loaded.payments.height
    mismatch = int((_per_row(n, costs_of(wrong_ev)) != _per_row(n, loaded.held)).sum())
    in_range = loaded.payments.filter(pl.col("occurred_at_us") >= from_us).height
    return CorrectionPlan(lines, int(wrong_ev.payments["cashback_won"].sum()),
                          int(right_ev.payments["cashback_won"].sum()),
                          int(loaded.recorded.payments["cashback_won"].sum()), mismatch, n, len(corrected),
                          int(loaded.held.payments["cashback_won"].sum())), in_range


def corrections(conn_or_engine: Connection | Engine, wrong: Policy, right: Policy, from_us: int,
                to_us: int) -> list[tuple[str, int, dict[str, int]]]:
    """Per member over [from, to): (member_id, delta_won, by_funder), as the plan has it
    (`correction_plan`: right − wrong, or right − held for a payment already corrected),
    for every member whose cashback or its funders change; by member_id."""
    per_member: dict[str, tuple[int, dict[str, int]]] = {}
    for line in correction_plan(conn_or_engine, wrong, right, from_us, to_us).lines:
        delta, by_funder = per_member.get(line.member_id, (0, {}))
        for source, amount in line.by_funder.items():
            by_funder[source] = by_funder.get(source, 0) + amount
        per_member[line.member_id] = (delta + line.delta_won, by_funder)
    return [(member_id, delta, {k: v for k, v in sorted(by_funder.items()) if v})
            for member_id, (delta, by_funder) in sorted(per_member.items())]
