"""Settlement configuration: fee tiers, payout cycle, watermark lag, reconciliation tolerance.

Values marked (?) in docs/settlement.md are defaults chosen here, not confirmed facts.
Every field can be set from the environment with the prefix EUM_SETTLEMENT_ (fee tiers
as JSON: `EUM_SETTLEMENT_FEE_TIERS='[{"sales_max_won": 500000000, "fee_bp": 0}, ...]'`).
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

BP_WHOLE = 10_000


class FeeTier(BaseModel):
    """Merchants whose annual sales are <= sales_max_won (None: no upper end) pay fee_bp."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    sales_max_won: int | None = Field(None, ge=0)
    fee_bp: int = Field(ge=0, le=BP_WHOLE)


# 2023–: 0% up to 5억, 0.55% for 5–10억 (DOMAIN.md). Above 10억 (?): 1.10% to 30억, 1.50% beyond.
DEFAULT_FEE_TIERS: tuple[FeeTier, ...] = (
    FeeTier(sales_max_won=500_000_000, fee_bp=0),
    FeeTier(sales_max_won=1_000_000_000, fee_bp=55),
    FeeTier(sales_max_won=3_000_000_000, fee_bp=110),
    FeeTier(sales_max_won=None, fee_bp=150),
)


class SettlementConfig(BaseSettings):
    # The service's .env too (eum.settings): fee tiers put there were silently the defaults.
    model_config = SettingsConfigDict(env_prefix="EUM_SETTLEMENT_", env_file=".env", extra="ignore", frozen=True)

    fee_tiers: tuple[FeeTier, ...] = DEFAULT_FEE_TIERS
    # Payout on D+N business days (?: the card network's cycle is commonly D+1 or D+2).
    payout_lag_business_days: int = Field(2, ge=0, le=30)
    holiday_country: str = "KR"
    # Events recorded within this lag before a run are left to the next run: it absorbs
    # clock skew between the app servers that stamp `recorded_at_us` and the database (?).
    watermark_lag_us: int = Field(2_000_000, ge=0, le=3_600_000_000)
    # A settlement reads a whole day: it gets its own statement timeout.
    statement_timeout_ms: int = Field(600_000, ge=1_000)
    reconcile_tolerance_won: int = Field(0, ge=0)
    clearing_file_bytes_max: int = Field(512 * 1024 * 1024, ge=1024)
    clearing_errors_listed_max: int = Field(50, ge=1, le=10_000)

    @field_validator("fee_tiers")
    @classmethod
    def _tiers(cls, tiers: tuple[FeeTier, ...]) -> tuple[FeeTier, ...]:
        if not tiers:
            raise ValueError("at least one fee tier is needed")
        bounds = [t.sales_max_won for t in tiers]
        if bounds[-1] is not None:
            raise ValueError("the last fee tier must be open-ended (sales_max_won: null)")
        finite = [b for b in bounds[:-1]]
        if any(b is None for b in finite) or finite != sorted(set(finite)):
            raise ValueError("fee tiers must rise strictly by sales_max_won")
        return tiers


@lru_cache(maxsize=1)
def get_config() -> SettlementConfig:
    return SettlementConfig()
