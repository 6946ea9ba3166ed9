"""Vectorised cashback evaluation on polars: `rules.evaluate.evaluate_payment`'s cashback
arithmetic for a whole range of recorded payments at once, for simulation and corrections.

Pure: frames in, frames out; no session, no clock. The reference semantics stay in
`rules.evaluate`; this module must give the same base, lines and funders, won for won,
for every approved payment (tests/test_simulate.py proves it with Hypothesis). What it
does not do, and why:
- Budgets are not applied: a simulation reports what a policy would cost without
  limits (an unlimited `BudgetView`). `on_budget_short` therefore never acts.
- Declines are not re-decided except by category: the payments are recorded approved
  ones and keep their recorded spend split. A payment at a category the simulated
  policy declines outright is counted in `declined` and earns nothing (base 0, does not
  count toward the month), as the pure evaluator's decline would.

How the sequential rules become column arithmetic (the design, on paper first):
- Rows are sorted by (member, occurred_at, payment_id), or with `as_given` by (member,
  month, position in the frame), so each member-month is a contiguous run. The
  member's monthly eligible spend before a payment is the month's starting spend plus
  an exclusive running sum of the bases in the run (`_before`): a cumulative sum minus
  its value at the run's first row, with no hashing.
- Bands: a component's variant is the first whose conditions hold (a when/then chain);
  band slot j of that variant earns floor(overlap([start, end), band) × rate / 10000).
- Caps: cumulative sums of non-negative amounts are monotone, so the clipped amount of
  a line is min(S + cum_raw_incl, cap) − min(S + cum_raw_excl, cap), where S is what the
  month had earned before. Component caps first (per component, over its lines in
  payment then band order), then the total cap over all lines in (payment, component,
  band) order, exactly the order `rules.evaluate._cashback` decrements its rooms in.
  (`_cashback` counts a component's *paid* amounts toward its room; once the total cap
  has bound nothing more is paid, so the two sums differ only where they no longer
  matter. With `explain=True` the rooms are recomputed from the paid amounts, the
  reasons derived as the pure evaluator derives them, and the closed form asserted.)
- Funders: `split_floor` over the funding shares with `$merchant_district` and
  `$member_district` resolved per row (equal resolved names merge their shares, first
  occurrence first), the remainder to the resolved `remainder_to`.
- A timeline is cut into the intervals of its stacks; each interval is evaluated with
  one stack and the member-month state (spend, cashback, capped components' cashback)
  carried into the next. With `as_given` a run can go back to an earlier interval (a
  backdated payment the book paid after later ones): then the rows are evaluated in
  passes, (times its run went back before the row, interval), in that order (`_passes`).

Speed and memory (benchmarks/simulate_month.py: 20 million payments in 24–29 s, peak
RSS 6.5 GiB on 2 cores): members are grouped by an integer code (a hash pass) rather than
by sorting string ids; the rows are gathered by that permutation straight from the
input, narrow columns only; member-months are evaluated in chunks of about
`CHUNK_ROWS_MAX` rows cut at run boundaries (runs are independent given the state), so
the working columns of one chunk, not of the month, are alive at a time; working
columns are dropped as soon as they are used.

Input (`PAYMENT_COLUMNS`): one row per approved payment, with the member's and the
merchant's facts joined on, and the spend split as it stands (net of refunds, see
`settlement.simulate`). Output rows refer to their input row by `row` (input position).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import polars as pl

from rules.compiled import CompiledComponent, CompiledConditions, CompiledPolicy, PolicyTimeline
from rules.document import BP_WHOLE, DISTRICTS, FIXED_FUNDERS
from rules.facts import WEEKDAYS

US_PER_DAY = 86_400_000_000
SEOUL_OFFSET_US = 9 * 3_600_000_000
EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()
ROWS_MAX = 2**32 - 1  # `row` is UInt32

FUNDER = pl.Enum(list(FIXED_FUNDERS))  # every name a resolved funder can have (districts included)
assert set(DISTRICTS) <= set(FIXED_FUNDERS)
REASON = pl.Enum(["", "component_cap", "total_cap"])
NO_POLICY = ""

MONEY = (pl.Int64, pl.Int32, pl.UInt32, pl.UInt64)
PAYMENT_COLUMNS: dict[str, tuple] = {
    "payment_id": (),
    "member_id": (),
    "member_district": (),
    "merchant_id": (),
    "merchant_district": (),
    "category": (),
    "annual_sales_won": MONEY,
    "flags": (),  # list[str]
    "merchant_share_bp": MONEY,
    "amount_won": MONEY,
    "occurred_at_us": MONEY,
    "spent_charged_won": MONEY,
    "spent_points_won": MONEY,
    "spent_grants_won": MONEY,
    "grant_cashback_won": MONEY,  # the part of spent_grants_won from programs with cashback_on_spend
}


def month_key(month: str) -> int:
    """'2025-09' -> 202509, the integer month the frames carry."""
    year, number = month.split("-")
    return int(year) * 100 + int(number)


def month_text(key: int) -> str:
    return f"{key // 100:04d}-{key % 100:02d}"


def day_number(day: dt.date) -> int:
    """Days since 1970-01-01 (the frames' `day`: the Seoul-local date of occurred_at)."""
    return day.toordinal() - EPOCH_ORDINAL


@dataclass(frozen=True)
class MonthStart:
    """Each member-month's state before the first evaluated payment.

    months: member_id, month_key (Int32 yyyymm), eligible_spend_won, cashback_won
    components: member_id, month_key, component_id (String), cashback_won
    A member-month that is absent starts at zero."""

    months: pl.DataFrame
    components: pl.DataFrame

    @classmethod
    def empty(cls) -> "MonthStart":
        return cls(
            pl.DataFrame(schema={"member_id": pl.String, "month_key": pl.Int32,
                                 "eligible_spend_won": pl.Int64, "cashback_won": pl.Int64}),
            pl.DataFrame(schema={"member_id": pl.String, "month_key": pl.Int32,
                                 "component_id": pl.String, "cashback_won": pl.Int64}),
        )


@dataclass(frozen=True)
class Evaluation:
    """payments: one row per input payment: row (input position), member_idx, month_key,
      merchant_district, annual_sales_won, policy_id, declined,
      counts_toward_month, base_won, cashback_won.
    members: member_idx -> member_id (the payments frame carries the small integer only).
    lines: one row per cashback line: row, component_id, rule, band (1-based), rate_bp,
      base_won, amount_won (and `reason` with explain=True).
    funding: one row per (line, funder) with amount > 0: row, component_id, band,
      entry (position in the line's funded_by), source, amount_won."""

    payments: pl.DataFrame
    members: pl.DataFrame
    lines: pl.DataFrame
    funding: pl.DataFrame


# ---------------------------------------------------------------- conditions as expressions


def _in(column: str, values) -> pl.Expr:
    values = sorted(values)
    return pl.col(column).is_in(values) if values else pl.lit(False)


def condition_expr(c: CompiledConditions) -> pl.Expr:
    """`CompiledConditions.holds` over the frame's columns: all given conditions (AND)."""
    parts: list[pl.Expr] = []
    if c.sales_max_won is not None:
        parts.append(pl.col("annual_sales_won") <= c.sales_max_won)
    if c.sales_min_won is not None:
        parts.append(pl.col("annual_sales_won") > c.sales_min_won)
    if c.categories_include is not None:
        parts.append(_in("category", c.categories_include))
    if c.categories_exclude is not None:
        parts.append(~_in("category", c.categories_exclude))
    if c.merchant_districts is not None:
        parts.append(_in("merchant_district", c.merchant_districts))
    if c.merchant_districts_exclude is not None:
        parts.append(~_in("merchant_district", c.merchant_districts_exclude))
    if c.member_districts is not None:
        parts.append(_in("member_district", c.member_districts))
    if c.same_district is not None:
        same = pl.col("merchant_district") == pl.col("member_district")
        parts.append(same if c.same_district else ~same)
    for flag in sorted(c.flags_all or ()):
        parts.append(pl.col("flags").list.contains(flag))
    for flag in sorted(c.flags_none or ()):
        parts.append(~pl.col("flags").list.contains(flag))
    if c.date_from is not None:
        parts.append(pl.col("day") >= day_number(c.date_from))
    if c.date_until is not None:
        parts.append(pl.col("day") <= day_number(c.date_until))
    if c.weekdays is not None:
        parts.append(_in("weekday", {WEEKDAYS.index(w) for w in c.weekdays}))
    if not parts:
        return pl.lit(True)
    return pl.all_horizontal(parts)


def _first_match(conditions: list[CompiledConditions]) -> pl.Expr:
    """Index of the first conditions that hold (UInt8), null when none does."""
    expr = None
    for index in reversed(range(len(conditions))):
        value = pl.lit(index, pl.UInt8)
        if expr is None:
            expr = pl.when(condition_expr(conditions[index])).then(value)
        else:
            expr = pl.when(condition_expr(conditions[index])).then(value).otherwise(expr)
    return expr


# ---------------------------------------------------------------- running sums over member-month runs


def _before(x: pl.Expr, first: str = "mm_first") -> pl.Expr:
    """Exclusive running sum of `x` within each contiguous member-month run."""
    before = x.cum_sum() - x
    return before - pl.when(pl.col(first)).then(before).forward_fill()


def _clip_cum(before_incl_excl: tuple[pl.Expr, pl.Expr], cap: int) -> pl.Expr:
    incl, excl = before_incl_excl
    return pl.min_horizontal(incl, pl.lit(cap, pl.Int64)) - pl.min_horizontal(excl, pl.lit(cap, pl.Int64))


# ---------------------------------------------------------------- the frame


def _member_code(dtype: pl.DataType) -> pl.Expr:
    """An integer per member: a hash pass, not a string sort (sorting 20 million string
    ids was half the evaluation's time)."""
    if dtype.is_integer():
        return pl.col("member_id").cast(pl.Int64)
    return pl.col("member_id").cast(pl.String).cast(pl.Categorical).to_physical().cast(pl.Int64)


def _in_time_order(payments: pl.DataFrame) -> bool:
    time = pl.col("occurred_at_us")
    return bool(payments.select((time >= time.shift(1)).fill_null(True).all()).item())


def _check(payments: pl.DataFrame) -> None:
    missing = [name for name in PAYMENT_COLUMNS if name not in payments.columns]
    if missing:
        raise ValueError(f"payments frame lacks columns {missing}")
    for name, dtypes in PAYMENT_COLUMNS.items():
        if dtypes and payments.schema[name] not in dtypes:
            raise ValueError(f"column {name} must be an integer (won, bp or µs), not {payments.schema[name]}")
    if payments.height > ROWS_MAX:
        raise ValueError(f"at most {ROWS_MAX} payments per evaluation")
    nulls = [name for name, count in payments.select(list(PAYMENT_COLUMNS)).null_count().row(0, named=True).items()
             if count]
    if nulls:
        raise ValueError(f"payments frame has nulls in {nulls}")


def month_key_of(at_us: pl.Expr) -> pl.Expr:
    """The Seoul month (yyyymm, Int32: the frames' `month_key`) of a µs instant."""
    date = ((at_us + SEOUL_OFFSET_US) // US_PER_DAY).cast(pl.Int32).cast(pl.Date)
    return date.dt.year().cast(pl.Int32) * 100 + date.dt.month().cast(pl.Int32)


def prepare(payments: pl.DataFrame, *, as_given: bool = False) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Check the input; keep only what evaluation reads (narrow types: categories,
    enums, ints), in member-month runs ordered by occurred_at (`as_given`: in the
    frame's order); derive day, month and weekday. Returns (frame, members: member_idx
    -> member_id)."""
    _check(payments)
    codes = payments.select(_member_code(payments.schema["member_id"]))["member_id"]
    if as_given:
        # Each member-month's payments in the order given: the order the book paid them
        # their band room and cap (settlement.simulate.BOOK_ORDER: a backdated payment
        # after those recorded before it), whatever their times.
        keys = [pl.lit(codes), month_key_of(pl.col("occurred_at_us")), pl.int_range(pl.len(), dtype=pl.UInt32)]
    elif _in_time_order(payments):
        # Each member's payments in time order: the input already comes so, and its
        # position is the tie-break.
        keys = [pl.lit(codes), pl.int_range(pl.len(), dtype=pl.UInt32)]
    else:
        keys = [pl.lit(codes), pl.col("occurred_at_us"), pl.col("payment_id")]
    order = payments.select(pl.arg_sort_by(keys).alias("order"))["order"]
    # Gathered straight from the input, one narrow column at a time (no unsorted copy).
    df = payments.select(
        pl.lit(order).cast(pl.UInt32).alias("row"),
        pl.lit(codes).gather(order).alias("member_code"),
        *(expr.gather(order) for expr in (
            pl.col("category").cast(pl.Categorical), pl.col("flags"),
            pl.col("member_district").cast(pl.String).cast(FUNDER),
            pl.col("merchant_district").cast(pl.String).cast(FUNDER),
            # merchant_id and amount_won are not read: the base comes from the spend split.
            *(pl.col(name).cast(pl.Int64) for name, dtypes in PAYMENT_COLUMNS.items()
              if dtypes and name != "amount_won"),
        )),
    )
    del codes, order
    df = df.with_columns(((pl.col("occurred_at_us") + SEOUL_OFFSET_US) // US_PER_DAY).cast(pl.Int32).alias("day"))
    date = pl.col("day").cast(pl.Date)
    df = df.with_columns(
        (date.dt.year().cast(pl.Int32) * 100 + date.dt.month().cast(pl.Int32)).alias("month_key"),
        ((pl.col("day") + 3) % 7).cast(pl.Int8).alias("weekday"),  # 1970-01-01 was a Thursday (3)
        (pl.col("member_code") != pl.col("member_code").shift(1)).fill_null(True).alias("member_first"),
    )
    month_first = pl.col("month_key") != pl.col("month_key").shift(1)
    df = df.with_columns(
        (pl.col("member_first").cum_sum() - 1).cast(pl.UInt32).alias("member_idx"),
        (pl.col("member_first") | month_first.fill_null(True)).alias("mm_first"),
    ).with_columns((pl.col("mm_first").cum_sum() - 1).cast(pl.UInt32).alias("mm"))
    firsts = df.filter(pl.col("member_first"))
    members = pl.DataFrame({"member_idx": firsts["member_idx"],
                            "member_id": payments["member_id"].gather(firsts["row"])})
    return df.drop("member_code", "member_first"), members


@dataclass
class _State:
    """Member-month state per `mm` (dense run index), carried between policy intervals."""

    eligible_spend_won: pl.Series
    cashback_won: pl.Series
    components: dict[str, pl.Series]  # only components that some policy caps

    def add(self, mm: pl.Series, column: str, values: pl.Series) -> None:
        target = getattr(self, column) if column in ("eligible_spend_won", "cashback_won") else self.components[column]
        updated = target.scatter(mm, target.gather(mm) + values)
        if column in ("eligible_spend_won", "cashback_won"):
            setattr(self, column, updated)
        else:
            self.components[column] = updated


def _initial_state(df: pl.DataFrame, members: pl.DataFrame, start: MonthStart | None, capped: set[str]) -> _State:
    runs = (df.filter(pl.col("mm_first")).select("mm", "member_idx", "month_key")
            .join(members, on="member_idx", how="left").drop("member_idx"))
    if start is None:
        start = MonthStart.empty()
    member_dtype = members.schema["member_id"]
    keys = ["member_id", "month_key"]
    months = (start.months.select(pl.col("member_id").cast(member_dtype), pl.col("month_key").cast(pl.Int32),
                                  "eligible_spend_won", "cashback_won")
              .group_by(keys).agg(pl.col("eligible_spend_won").sum(), pl.col("cashback_won").sum()))
    joined = runs.join(months, on=keys, how="left").sort("mm")
    assert joined.height == runs.height and joined["mm"].equals(pl.Series("mm", range(runs.height), pl.UInt32))
    state = _State(joined["eligible_spend_won"].fill_null(0).cast(pl.Int64),
                   joined["cashback_won"].fill_null(0).cast(pl.Int64), {})
    comps = start.components.select(pl.col("member_id").cast(member_dtype), pl.col("month_key").cast(pl.Int32),
                                    pl.col("component_id").cast(pl.String), "cashback_won")
    for component_id in sorted(capped):
        one = (comps.filter(pl.col("component_id") == component_id).drop("component_id")
               .group_by(keys).agg(pl.col("cashback_won").sum()))
        got = runs.join(one, on=keys, how="left").sort("mm")
        assert got.height == runs.height
        state.components[component_id] = got["cashback_won"].fill_null(0).cast(pl.Int64)
    return state


# ---------------------------------------------------------------- one policy over one interval


def _band_slots(component: CompiledComponent) -> int:
    return max(len(v.bands) for v in component.variants)


def _by_variant(vidx: pl.Expr, values: list[pl.Expr | None], default: pl.Expr) -> pl.Expr:
    expr = default
    for index in reversed(range(len(values))):
        if values[index] is not None:
            expr = pl.when(vidx == index).then(values[index]).otherwise(expr)
    return expr


def _band_columns(ci: int, component: CompiledComponent) -> list[pl.Expr]:
    """Per band slot j: base in band `b{ci}_{j}` and rate `r{ci}_{j}` (0 where no line)."""
    vidx = pl.col(f"v{ci}")
    out = []
    for j in range(_band_slots(component)):
        bases, rates = [], []
        for variant in component.variants:
            if j >= len(variant.bands):
                bases.append(None)
                rates.append(None)
                continue
            band = variant.bands[j]
            lower = pl.max_horizontal(pl.col("start"), pl.lit(band.lower_won, pl.Int64))
            upper = pl.col("end") if band.upper_won is None else \
                pl.min_horizontal(pl.col("end"), pl.lit(band.upper_won, pl.Int64))
            bases.append((upper - lower).clip(lower_bound=0))
            rates.append(pl.col("merchant_share_bp") if band.rate_from_merchant_share
                         else pl.lit(band.rate_bp, pl.Int64))
        zero = pl.lit(0, pl.Int64)
        out.append(_by_variant(vidx, bases, zero).alias(f"b{ci}_{j}"))
        out.append(_by_variant(vidx, rates, zero).alias(f"r{ci}_{j}"))
    return out


def _slots(policy: CompiledPolicy) -> list[tuple[int, int]]:
    """(component index, band slot) in the order `_cashback` visits lines."""
    return [(ci, j) for ci, c in enumerate(policy.components) for j in range(_band_slots(c))]


def _with_gathered(df: pl.DataFrame, state: _State, names: list[str]) -> pl.DataFrame:
    mm = df["mm"]
    cols = []
    for name in names:
        source = getattr(state, name) if name in ("eligible_spend_won", "cashback_won") else state.components[name]
        cols.append(source.gather(mm).alias(f"s:{name}"))
    return df.with_columns(cols) if cols else df


def _amounts(df: pl.DataFrame, policy: CompiledPolicy, state: _State) -> pl.DataFrame:
    """raw, component-capped and paid amount per slot: `raw{ci}_{j}`, `p{ci}_{j}`."""
    slots = _slots(policy)
    df = df.with_columns(
        (pl.col(f"b{ci}_{j}") * pl.col(f"r{ci}_{j}") // BP_WHOLE).alias(f"raw{ci}_{j}") for ci, j in slots)
    capped = [(ci, c) for ci, c in enumerate(policy.components) if c.monthly_cashback_cap_won is not None]
    df = _with_gathered(df, state, [c.component_id for _, c in capped]
                        + (["cashback_won"] if policy.monthly_cashback_cap_won is not None else []))
    clipped: dict[tuple[int, int], pl.Expr] = {(ci, j): pl.col(f"raw{ci}_{j}") for ci, j in slots}
    for ci, component in capped:
        own = [j for c, j in slots if c == ci]
        before = pl.col(f"s:{component.component_id}") + _before(pl.sum_horizontal(pl.col(f"raw{ci}_{j}") for j in own))
        prefix = before
        for j in own:
            incl = prefix + pl.col(f"raw{ci}_{j}")
            clipped[(ci, j)] = _clip_cum((incl, prefix), component.monthly_cashback_cap_won)
            prefix = incl
    df = df.with_columns(expr.alias(f"c{ci}_{j}") for (ci, j), expr in clipped.items())
    cap = policy.monthly_cashback_cap_won
    if cap is None:
        return df.with_columns(pl.col(f"c{ci}_{j}").alias(f"p{ci}_{j}") for ci, j in slots)
    prefix = pl.col("s:cashback_won") + _before(pl.sum_horizontal(pl.col(f"c{ci}_{j}") for ci, j in slots))
    paid = []
    for ci, j in slots:
        incl = prefix + pl.col(f"c{ci}_{j}")
        paid.append(_clip_cum((incl, prefix), cap).alias(f"p{ci}_{j}"))
        prefix = incl
    return df.with_columns(paid)


def _reasons(df: pl.DataFrame, policy: CompiledPolicy) -> pl.DataFrame:
    """The pure evaluator's rooms recomputed from the paid amounts: each line's reason,
    and the closed form checked against the sequential rule min(raw, room, total room)."""
    slots = _slots(policy)
    rooms: dict[tuple[int, int], pl.Expr] = {}
    for ci, component in enumerate(policy.components):
        own = [j for c, j in slots if c == ci]
        cap = component.monthly_cashback_cap_won
        if cap is None:
            continue
        prefix = pl.col(f"s:{component.component_id}") + _before(pl.sum_horizontal(pl.col(f"p{ci}_{j}") for j in own))
        for j in own:
            rooms[(ci, j)] = (pl.lit(cap, pl.Int64) - prefix).clip(lower_bound=0)
            prefix = prefix + pl.col(f"p{ci}_{j}")
    cap = policy.monthly_cashback_cap_won
    total_prefix = None
    if cap is not None:
        total_prefix = pl.col("s:cashback_won") + _before(pl.sum_horizontal(pl.col(f"p{ci}_{j}") for ci, j in slots))
    exprs, checks = [], []
    for ci, j in slots:
        raw, paid = pl.col(f"raw{ci}_{j}"), pl.col(f"p{ci}_{j}")
        room = rooms.get((ci, j))
        by_component = raw if room is None else pl.min_horizontal(raw, room)
        component_cut = pl.lit(False) if room is None else raw > room
        if total_prefix is None:
            total_cut, expected = pl.lit(False), by_component
        else:
            total_room = (pl.lit(cap, pl.Int64) - total_prefix).clip(lower_bound=0)
            total_cut, expected = by_component > total_room, pl.min_horizontal(by_component, total_room)
            total_prefix = total_prefix + paid
        exprs.append(pl.when(total_cut).then(pl.lit("total_cap")).when(component_cut).then(pl.lit("component_cap"))
                     .otherwise(pl.lit("")).cast(REASON).alias(f"why{ci}_{j}"))
        checks.append((expected == paid).all().alias(f"ok{ci}_{j}"))
    if checks:
        ok = df.select(checks).row(0)
        assert all(ok), "closed-form caps disagree with the sequential rooms"
    return df.with_columns(exprs)


def _funder_name(source: str) -> pl.Expr:
    if source == "$merchant_district":
        return pl.col("merchant_district")
    if source == "$member_district":
        return pl.col("member_district")
    return pl.lit(source, FUNDER)


def _split(component: CompiledComponent, paid: pl.Expr) -> list[tuple[pl.Expr, pl.Expr]]:
    """`split_floor` of `paid` by the component's shares, placeholders resolved per row:
    [(source name, part)] per funding entry; an entry whose resolved name repeats an
    earlier one's gets 0 (its share is merged into the first)."""
    names = [_funder_name(source) for source, _ in component.funding]
    remainder_name = _funder_name(component.remainder_to)
    merged, duplicate = [], []
    for e, (_, bp) in enumerate(component.funding):
        share = pl.sum_horizontal(
            pl.when(names[other] == names[e]).then(pl.lit(other_bp, pl.Int64)).otherwise(pl.lit(0, pl.Int64))
            for other, (_, other_bp) in enumerate(component.funding))
        merged.append(share)
        dup = pl.any_horizontal([names[other] == names[e] for other in range(e)]) if e else pl.lit(False)
        duplicate.append(dup)
    floors = [pl.when(duplicate[e]).then(pl.lit(0, pl.Int64)).otherwise(paid * merged[e] // component.funding_whole)
              for e in range(len(names))]
    remainder = paid - pl.sum_horizontal(floors)
    out = []
    for e, name in enumerate(names):
        takes_rest = (name == remainder_name) & ~duplicate[e]
        out.append((name, floors[e] + pl.when(takes_rest).then(remainder).otherwise(pl.lit(0, pl.Int64))))
    return out


SPENT = ("spent_charged_won", "spent_points_won", "spent_grants_won", "grant_cashback_won")
CONDITION_INPUTS = ("category", "flags", "day", "weekday")


def _base(policy: CompiledPolicy) -> pl.Expr:
    """`rules.evaluate._base` on the recorded split: the balances that earn cashback."""
    on = policy.cashback_on
    base = pl.col("spent_grants_won") if "grants" in on else pl.col("grant_cashback_won")
    if "charged" in on:
        base = base + pl.col("spent_charged_won")
    if "points" in on:
        base = base + pl.col("spent_points_won")
    return base


def _evaluate_interval(df: pl.DataFrame, policy: CompiledPolicy, state: _State, *, explain: bool,
                       component_enum: pl.Enum, rule_enum: pl.Enum) -> tuple[pl.DataFrame, list, list]:
    """One stack over the rows it is in force for. Returns the rows with base, counts,
    declined, cashback and the paid amount per slot `p{ci}_{j}`; the lines; the funders.
    Columns are dropped as soon as they are used: at 20 million rows each Int64 column
    is 160 MB."""
    declined = _in("category", policy.declined_categories)
    counts = ~declined & condition_expr(policy.eligibility)
    # Runs restart where this interval's rows of a member-month start.
    run_first = (pl.col("mm") != pl.col("mm").shift(1)).fill_null(True)
    df = df.with_columns(declined.alias("declined"), counts.alias("counts_toward_month"), run_first.alias("mm_first"))
    df = df.with_columns(pl.when(pl.col("counts_toward_month")).then(_base(policy)).otherwise(0).cast(pl.Int64)
                         .alias("base_won")).drop(SPENT)
    df = _with_gathered(df, state, ["eligible_spend_won"])
    df = df.with_columns((pl.col("s:eligible_spend_won") + _before(pl.col("base_won"))).alias("start"))
    df = df.with_columns((pl.col("start") + pl.col("base_won")).alias("end")).drop("s:eligible_spend_won")
    components = policy.components
    # A payment that earns no base earns no line: the variant is left null.
    df = df.with_columns(pl.when(pl.col("base_won") > 0).then(_first_match([v.when for v in c.variants]))
                         .alias(f"v{ci}") for ci, c in enumerate(components)).drop(CONDITION_INPUTS)
    df = df.with_columns(expr for ci, c in enumerate(components) for expr in _band_columns(ci, c))
    df = df.drop("start", "end", "merchant_share_bp")
    df = _amounts(df, policy, state)
    if explain:
        df = _reasons(df, policy)
    slots = _slots(policy)
    df = df.drop([f"{kind}{ci}_{j}" for ci, j in slots for kind in ("raw", "c")] if not explain else [])
    df = df.with_columns(pl.sum_horizontal([pl.col(f"p{ci}_{j}") for ci, j in slots] or [pl.lit(0, pl.Int64)])
                         .cast(pl.Int64).alias("cashback_won"))
    lines, funding = [], []
    for ci, j in slots:
        line, funded = _slot_frames(df, components[ci], ci, j, explain=explain, component_enum=component_enum,
                                    rule_enum=rule_enum)
        lines.append(line)
        funding += funded
    return df, lines, funding


def _slot_frames(df: pl.DataFrame, component: CompiledComponent, ci: int, j: int, *, explain: bool,
                 component_enum: pl.Enum, rule_enum: pl.Enum) -> tuple[pl.DataFrame, list[pl.DataFrame]]:
    """The lines of one (component, band slot), and their funders, from narrow columns."""
    b, r, v, paid = f"b{ci}_{j}", f"r{ci}_{j}", f"v{ci}", f"p{ci}_{j}"
    narrow = df.select("row", v, b, r, paid, "merchant_district", "member_district",
                       *([f"why{ci}_{j}"] if explain else [])).filter((pl.col(b) > 0) & (pl.col(r) > 0))
    component_id = pl.lit(component.component_id).cast(component_enum).alias("component_id")
    band = pl.lit(j + 1, pl.UInt8).alias("band")
    rules = [pl.lit(variant.rule) for variant in component.variants]
    line = narrow.select(
        "row", component_id,
        _by_variant(pl.col(v), rules, pl.lit(None, pl.String)).cast(rule_enum).alias("rule"),
        band, pl.col(r).cast(pl.Int32).alias("rate_bp"), pl.col(b).alias("base_won"),
        pl.col(paid).alias("amount_won"),
        *([pl.col(f"why{ci}_{j}").alias("reason")] if explain else []),
    )
    earning = narrow.filter(pl.col(paid) > 0)
    funded = []
    for entry, (name, part) in enumerate(_split(component, pl.col(paid))):
        funded.append(earning.select("row", component_id, band, pl.lit(entry, pl.UInt8).alias("entry"),
                                     name.alias("source"), part.alias("amount_won"))
                      .filter(pl.col("amount_won") > 0))
    return line, funded


def _contribute(df: pl.DataFrame, policy: CompiledPolicy, state: _State) -> None:
    """Add an interval's spend and cashback to the member-month state for the next."""
    slots = _slots(policy)
    aggs = [pl.col("base_won").sum().alias("eligible_spend_won"), pl.col("cashback_won").sum()]
    for ci, component in enumerate(policy.components):
        if component.component_id in state.components:
            aggs.append(pl.sum_horizontal(pl.col(f"p{ci}_{j}") for c, j in slots if c == ci).sum()
                        .alias(component.component_id))
    sums = df.group_by("mm").agg(aggs)
    for name in sums.columns[1:]:
        state.add(sums["mm"], name, sums[name].cast(pl.Int64))


# ---------------------------------------------------------------- entry point


def _intervals(policy: CompiledPolicy | PolicyTimeline) -> tuple[list[int], list[CompiledPolicy | None]]:
    if isinstance(policy, CompiledPolicy):
        return [-(2**62)], [policy]  # a single policy applies to every payment given
    starts = sorted({p.effective_from_us for p in policy})
    return starts, [policy.in_force(start) for start in starts]


PAYMENT_OUTPUT = ("row", "member_idx", "month_key", "merchant_district", "annual_sales_won", "policy_id",
                  "declined", "counts_toward_month", "base_won", "cashback_won")


CHUNK_ROWS_MAX = 4_000_000


def _chunks(df: pl.DataFrame, rows_max: int) -> list[pl.DataFrame]:
    """Zero-copy slices of about `rows_max` rows, cut where a member-month run starts
    (runs are independent given the state), so that the working columns of one chunk,
    not of the whole month, are alive at a time."""
    assert rows_max > 0
    mm = df["mm"]
    cuts, position = [0], 0
    while position + rows_max < df.height:
        # The first row of the run that holds row position + rows_max, unless that run
        # began at the current cut (a run longer than rows_max stays whole).
        cut = int(mm.search_sorted(mm[position + rows_max], side="left"))
        if cut <= position:
            cut = int(mm.search_sorted(mm[position + rows_max], side="right"))
        if cut >= df.height:
            break
        cuts.append(cut)
        position = cut
    cuts.append(df.height)
    return [df.slice(a, b - a) for a, b in zip(cuts, cuts[1:]) if b > a]


def evaluate_frame(policy: CompiledPolicy | PolicyTimeline, payments: pl.DataFrame,
                   start: MonthStart | None = None, *, explain: bool = False,
                   chunk_rows_max: int = CHUNK_ROWS_MAX, as_given: bool = False) -> Evaluation:
    """Evaluate every payment of the frame under `policy` (one stack for all payments)
    or a timeline (the stack in force at each payment's occurred_at), each member-month
    starting from `start`, its payments in time order (by payment_id within an instant,
    or the frame's order where it comes in time order), or with `as_given` in the
    frame's order (as the book paid them). `explain` adds each line's reason and checks
    the caps' closed form against the sequential rooms (slower; for tests and small
    ranges). Member-months are evaluated in chunks of about `chunk_rows_max` rows."""
    starts, stacks = _intervals(policy)
    present = [s for s in stacks if s is not None]
    enums = _Enums(
        component=pl.Enum(sorted({c.component_id for s in present for c in s.components})),
        rule=pl.Enum(sorted({v.rule for s in present for c in s.components for v in c.variants})),
        policy=pl.Enum(sorted({NO_POLICY, *(s.policy_id for s in present)})),
    )
    capped = {c.component_id for s in present for c in s.components if c.monthly_cashback_cap_won is not None}
    df, members = prepare(payments, as_given=as_given)
    state = _initial_state(df, members, start, capped)
    chunks = _chunks(df, chunk_rows_max)
    del df
    outputs, lines, funding = [], [], []
    while chunks:
        out, part_lines, part_funding = _evaluate_chunk(chunks.pop(0), starts, stacks, state, enums, explain=explain)
        outputs += out
        lines += part_lines
        funding += part_funding
    return Evaluation(
        payments=pl.concat(outputs) if outputs else _empty_payments(enums.policy),
        members=members,
        lines=pl.concat(lines) if lines else _empty_lines(enums.component, enums.rule, explain),
        funding=pl.concat(funding) if funding else _empty_funding(enums.component),
    )


@dataclass(frozen=True)
class _Enums:
    component: pl.Enum
    rule: pl.Enum
    policy: pl.Enum


def _passes(df: pl.DataFrame, interval: pl.Series) -> pl.Series | None:
    """Each row's pass when a member-month's rows go back to an earlier policy interval
    (rows in the order the book paid them, a backdated payment after later ones): how
    many times its run went back before it; None when none does (rows in time order).
    Within one pass a run's intervals never go back, so its rows of one (pass, interval)
    are contiguous, and passes in (pass, interval) order take each run's rows in order."""
    same_run = df["mm"] == df["mm"].shift(1)
    back = ((interval < interval.shift(1)) & same_run).fill_null(False)
    if not back.any():
        return None
    frame = pl.DataFrame({"back": back.cast(pl.UInt32), "first": ~same_run.fill_null(False)})
    return frame.select(_before(pl.col("back"), "first") + pl.col("back"))["back"]


def _evaluate_chunk(df: pl.DataFrame, starts: list[int], stacks: list[CompiledPolicy | None], state: _State,
                    enums: _Enums, *, explain: bool) -> tuple[list, list, list]:
    """The policy intervals of one chunk, the month state carried: in time order, or, where
    a member-month's rows go back to an earlier interval, in passes (`_passes`)."""
    interval = (pl.Series(starts, dtype=pl.Int64).search_sorted(df["occurred_at_us"], side="right")
                .cast(pl.Int32) - 1)
    passes = _passes(df, interval)
    if passes is None:
        keys = sorted((0, index) for index in set(interval.unique().to_list()))
    else:
        keys = sorted(set(zip(passes.to_list(), interval.to_list())))
    if len(keys) == 1:
        parts = [(keys[0][1], df)]
    else:
        df = df.with_columns(interval.alias("interval"),
                             (passes if passes is not None else pl.repeat(0, df.height, dtype=pl.UInt32, eager=True))
                             .alias("pass"))
        parts = [(index, df.filter((pl.col("pass") == number) & (pl.col("interval") == index))
                  .drop("interval", "pass")) for number, index in keys]
    del df, interval, passes  # the parts hold the rows; each is let go once evaluated
    outputs, lines, funding = [], [], []
    while parts:
        index = parts[0][0]
        stack = stacks[index] if index >= 0 else None
        if stack is None:
            outputs.append(_no_policy(parts.pop(0)[1], enums.policy))
            continue
        # Handed over without a reference kept here, so that the columns the interval
        # drops as it goes are freed.
        done, part_lines, part_funding = _evaluate_interval(
            parts.pop(0)[1], stack, state, explain=explain, component_enum=enums.component, rule_enum=enums.rule)
        if parts:
            _contribute(done, stack, state)
        outputs.append(done.with_columns(pl.lit(stack.policy_id).cast(enums.policy).alias("policy_id"))
                       .select(PAYMENT_OUTPUT))
        lines += part_lines
        funding += part_funding
    return outputs, lines, funding


def _no_policy(part: pl.DataFrame, policy_enum: pl.Enum) -> pl.DataFrame:
    return part.with_columns(
        pl.lit(NO_POLICY).cast(policy_enum).alias("policy_id"), pl.lit(True).alias("declined"),
        pl.lit(False).alias("counts_toward_month"), pl.lit(0, pl.Int64).alias("base_won"),
        pl.lit(0, pl.Int64).alias("cashback_won"),
    ).select(PAYMENT_OUTPUT)


def _empty_payments(policy_enum: pl.Enum) -> pl.DataFrame:
    return pl.DataFrame(schema={
        "row": pl.UInt32, "member_idx": pl.UInt32, "month_key": pl.Int32, "merchant_district": FUNDER,
        "annual_sales_won": pl.Int64, "policy_id": policy_enum, "declined": pl.Boolean,
        "counts_toward_month": pl.Boolean, "base_won": pl.Int64, "cashback_won": pl.Int64})


def _empty_lines(component_enum: pl.Enum, rule_enum: pl.Enum, explain: bool) -> pl.DataFrame:
    schema = {"row": pl.UInt32, "component_id": component_enum, "rule": rule_enum, "band": pl.UInt8,
              "rate_bp": pl.Int32, "base_won": pl.Int64, "amount_won": pl.Int64}
    if explain:
        schema["reason"] = REASON
    return pl.DataFrame(schema=schema)


def _empty_funding(component_enum: pl.Enum) -> pl.DataFrame:
    return pl.DataFrame(schema={"row": pl.UInt32, "component_id": component_enum, "band": pl.UInt8,
                                "entry": pl.UInt8, "source": FUNDER, "amount_won": pl.Int64})

