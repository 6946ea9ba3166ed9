"""Settlement configuration: fee schedules, payout cycle, watermark lag, reconciliation tolerance.

Values marked (?) in docs/settlement.md are defaults chosen here, not confirmed facts.
Every field can be set from the environment with the prefix EUM_SETTLEMENT_ (fee
schedules as JSON: `EUM_SETTLEMENT_FEE_SCHEDULES='[{"from_date": "2000-01-01", "tiers":
[{"sales_max_won": 300000000, "fee_bp": 25}, ...]}, {"from_date": "2023-01-01", ...}]'`;
`EUM_SETTLEMENT_FEE_TIERS='[{"sales_max_won": 500000000, "fee_bp": 0}, ...]'` replaces the
tiers of the latest schedule alone).
"""

from __future__ import annotations

import datetime as dt
from functools import lru_cache

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from eum.settings import PG_TIMEOUT_MS_MAX

BP_WHOLE = 10_000
# A reconciliation's tolerance: up to settlement.reconcile.AMOUNT_WON_MAX (not imported here:
# it loads polars), for the setting as for `--tolerance-won` and the API's `tolerance_won`
TOLERANCE_WON_MAX = 10**12
FIRST_BUSINESS_DATE = dt.date(2000, 1, 1)  # the book's span starts here: every date needs a fee table


class FeeTier(BaseModel):
    """Merchants whose annual sales are <= sales_max_won (None: no upper end) pay fee_bp."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    sales_max_won: int | None = Field(None, ge=0)
    fee_bp: int = Field(ge=0, le=BP_WHOLE)


def check_tiers(tiers: tuple[FeeTier, ...]) -> tuple[FeeTier, ...]:
    if not tiers:
        raise ValueError("at least one fee tier is needed")
    bounds = [t.sales_max_won for t in tiers]
    if bounds[-1] is not None:
        raise ValueError("the last fee tier must be open-ended (sales_max_won: null)")
    finite = [b for b in bounds[:-1]]
    if any(b is None for b in finite) or finite != sorted(set(finite)):
        raise ValueError("fee tiers must rise strictly by sales_max_won")
    return tiers


class FeeSchedule(BaseModel):
    """The fee tiers of business dates from `from_date` on, until the next schedule's."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    from_date: dt.date
    tiers: tuple[FeeTier, ...]

    @field_validator("tiers")
    @classmethod
    def _tiers(cls, tiers: tuple[FeeTier, ...]) -> tuple[FeeTier, ...]:
        return check_tiers(tiers)


# 2023–: 0% up to 5억, 0.55% for 5–10억 (DOMAIN.md). Above 10억 (?): 1.10% to 30억, 1.50% beyond.
DEFAULT_FEE_TIERS: tuple[FeeTier, ...] = (
    FeeTier(sales_max_won=500_000_000, fee_bp=0),
    FeeTier(sales_max_won=1_000_000_000, fee_bp=55),
    FeeTier(sales_max_won=3_000_000_000, fee_bp=110),
    FeeTier(sales_max_won=None, fee_bp=150),
)
# Before 2023: 0.25% up to 3억, 0.85% for 3–5억, 1% for 5–10억 (DOMAIN.md, "earlier"; from
# when is not given (?): every date before 2023). Above 10억 (?): as the 2023 table.
EARLIER_FEE_TIERS: tuple[FeeTier, ...] = (
    FeeTier(sales_max_won=300_000_000, fee_bp=25),
    FeeTier(sales_max_won=500_000_000, fee_bp=85),
    FeeTier(sales_max_won=1_000_000_000, fee_bp=100),
    FeeTier(sales_max_won=3_000_000_000, fee_bp=110),
    FeeTier(sales_max_won=None, fee_bp=150),
)
DEFAULT_FEE_SCHEDULES: tuple[FeeSchedule, ...] = (
    FeeSchedule(from_date=FIRST_BUSINESS_DATE, tiers=EARLIER_FEE_TIERS),
    FeeSchedule(from_date=dt.date(2023, 1, 1), tiers=DEFAULT_FEE_TIERS),
)


class SettlementConfig(BaseSettings):
    # The service's .env too (eum.settings): fee tiers put there were silently the defaults.
    model_config = SettingsConfigDict(env_prefix="EUM_SETTLEMENT_", env_file=".env", extra="ignore", frozen=True)

    # A business date's merchant fees are its schedule's: the latest from_date at or before it.
    fee_schedules: tuple[FeeSchedule, ...] = DEFAULT_FEE_SCHEDULES
    # The latest schedule's tiers (the 2023 table by default), replaced: the setting from
    # before fees were dated, which set the one table of every date.
    fee_tiers: tuple[FeeTier, ...] | None = None
    # Payout on D+N business days (?: the card network's cycle is commonly D+1 or D+2).
    payout_lag_business_days: int = Field(2, ge=0, le=30)
    holiday_country: str = "KR"
    # Events recorded within this lag before a run are left to the next run: it absorbs
    # clock skew between the app servers that stamp `recorded_at_us` and the database (?).
    watermark_lag_us: int = Field(2_000_000, ge=0, le=3_600_000_000)
    # A settlement reads a whole day: it gets its own statement timeout.
    statement_timeout_ms: int = Field(600_000, ge=1_000, le=PG_TIMEOUT_MS_MAX)
    # past 64 bits the reconciliation was a TypeError (a traceback, a 500) (operations audit)
    reconcile_tolerance_won: int = Field(0, ge=0, le=TOLERANCE_WON_MAX)
    clearing_file_bytes_max: int = Field(512 * 1024 * 1024, ge=1024)
    clearing_errors_listed_max: int = Field(50, ge=1, le=10_000)

    @field_validator("fee_tiers")
    @classmethod
    def _tiers(cls, tiers: tuple[FeeTier, ...] | None) -> tuple[FeeTier, ...] | None:
        return None if tiers is None else check_tiers(tiers)

    @field_validator("fee_schedules")
    @classmethod
    def _schedules(cls, schedules: tuple[FeeSchedule, ...]) -> tuple[FeeSchedule, ...]:
        if not schedules or schedules[0].from_date > FIRST_BUSINESS_DATE:
            raise ValueError(f"the first fee schedule must start by {FIRST_BUSINESS_DATE} (every business date "
                             "needs its fees)")
        starts = [schedule.from_date for schedule in schedules]
        if starts != sorted(set(starts)):
            raise ValueError("fee schedules must be in order of from_date, one per date")
        return schedules

    @property
    def schedules(self) -> tuple[FeeSchedule, ...]:
        """The fee schedules in force: `fee_schedules`, the latest one's tiers `fee_tiers` when set."""
        if self.fee_tiers is None:
            return self.fee_schedules
        latest = self.fee_schedules[-1]
        return (*self.fee_schedules[:-1], FeeSchedule(from_date=latest.from_date, tiers=self.fee_tiers))

    @field_validator("holiday_country")
    @classmethod
    def _country(cls, country: str) -> str:
        """A country the `holidays` library has (settlement.calendar): an unknown one had
        passed, and every settlement then failed on it."""
        import holidays

        try:
            holidays.country_holidays(country)
        except NotImplementedError:
            raise ValueError(f"{country!r} is not a country the holidays library knows (an ISO code, e.g. KR)"
                             ) from None
        return country


@lru_cache(maxsize=1)
def get_config() -> SettlementConfig:
    return SettlementConfig()
