"""Budget: one latency target, resolved the same way everywhere.

A budget is given in ms or as a fraction of one reference, the full model's median step measured in
the same session, for one regime and at one quantile of the per-step latency (p50 by default; p90
or p99 for serving SLOs). Search, the routers, verify, the lookup and the report all resolve it
here against the profile's measured full step (the routers' latency table is scaled so the full
model costs exactly that step), so "0.8x" means the same number of ms in each of them, and every
artifact holding a budget records its `reference_full_ms` and `budget_frac`; verify's rows keep the
searched budget and record their own session's full step beside it (`measured_full_ms`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from flextron.errors import FlextronError

QUANTILES = {"p50": 0.50, "p90": 0.90, "p99": 0.99}


def check_quantile(quantile: str) -> str:
    if quantile not in QUANTILES:
        raise FlextronError(f"--quantile must be one of {list(QUANTILES)}, got {quantile!r}")
    return quantile


@dataclass(frozen=True)
class Budget:
    """`budget_ms` or `budget_frac` (or both, once resolved against `reference_full_ms`).

    A fraction above 1 simply means the full model fits; a fraction or ms of 0 or less is refused.
    """

    regime: str
    budget_ms: float | None = None
    budget_frac: float | None = None
    quantile: str = "p50"
    reference_full_ms: float | None = None

    def __post_init__(self):
        check_quantile(self.quantile)
        if self.budget_ms is None and self.budget_frac is None:
            raise FlextronError("a budget needs ms (--budget-ms) or a fraction of the full model (--budget-frac)")
        for name in ("budget_ms", "budget_frac", "reference_full_ms"):
            v = getattr(self, name)
            if v is not None and (
                isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0
            ):
                raise FlextronError(f"--{name.replace('_', '-')} must be a positive finite number, got {v!r}")
            if v is not None:
                object.__setattr__(self, name, float(v))

    @classmethod
    def from_ms(cls, regime: str, ms: float, quantile: str = "p50") -> "Budget":
        return cls(regime, budget_ms=ms, quantile=quantile)

    @classmethod
    def from_frac(cls, regime: str, frac: float, quantile: str = "p50") -> "Budget":
        return cls(regime, budget_frac=frac, quantile=quantile)

    def resolve(self, reference_full_ms: float) -> "Budget":
        """This budget with both ms and fraction, against the full model's median `reference_full_ms`."""
        ref = float(reference_full_ms)
        if not math.isfinite(ref) or ref <= 0:
            raise FlextronError(f"the full model's reference latency must be positive, got {ref}")
        # Not rounded: a rounded fraction of a tiny budget is 0 (refused as "not positive" instead of
        # naming the feasible range), and a rounded ms is not the ms that was asked for.
        if self.budget_frac is not None and self.budget_ms is None:
            return Budget(self.regime, self.budget_frac * ref, self.budget_frac, self.quantile, ref)
        if self.budget_ms is not None and self.budget_frac is None:
            return Budget(self.regime, self.budget_ms, self.budget_ms / ref, self.quantile, ref)
        return Budget(self.regime, self.budget_ms, self.budget_frac, self.quantile, ref)

    def to_dict(self) -> dict:
        return asdict(self)
