"""The latency table the routers train against, and the penalty on latency over budget.

The latency table of a regime is the latency model's `[layers, choices]` table (measured on the
device). Only when the regime was never profiled is an analytic FLOPs/bytes table used, and then its
source says "analytic" everywhere it shows. This module takes latency as plain tensors and a duck-typed
latency model, never the profiler itself; `search/route.py` (the `flextron route` stage) wires it in.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from flextron.spec import Regime, SubnetConfig

ANALYTIC_SOURCE = "analytic (FLOPs/bytes model; this regime was not profiled)"


@dataclass(frozen=True, eq=False)
class LatencyTable:
    """Per-layer, per-choice latency of one regime: a config costs `fixed` plus, in every layer, the
    `attn` entry of its head count and the `mlp` entry of its MLP width (choices in the spec's order)."""

    attn: torch.Tensor  #: [layers, head-count choices], float32, in `unit`
    mlp: torch.Tensor  #: [layers, MLP-width choices], float32, in `unit`
    #: what every config pays besides its entries: LM head, host overhead (the analytic table's entries
    #: are costs above the narrowest choice, so its `fixed` is the smallest config's whole cost)
    fixed: float
    source: str  #: where the costs come from: "measured (DEVICE)" or "analytic (...)"
    unit: str  #: "ms" for a measured table, "relative" for an analytic one
    regime: str  #: the full regime key the costs belong to

    @property
    def full(self) -> float:
        """The full model's cost (every layer at its last, widest choice)."""
        return self.fixed + float(self.attn[:, -1].sum() + self.mlp[:, -1].sum())

    @property
    def smallest_frac(self) -> float:
        """The least any config costs, as a fraction of `full`."""
        least = self.fixed + float(self.attn.min(-1).values.sum() + self.mlp.min(-1).values.sum())
        return least / self.full

    @classmethod
    def from_model(cls, model, spec, regime_key: str, device_name: str,
                   full_ms: float | None = None) -> "LatencyTable":
        """The table of a fitted latency model: `model.layer_table_ms(spec)` gives `attn_ms` and
        `mlp_ms` ([layers, choices]) and `fixed_ms`, the costs the model itself predicts with. With
        `full_ms` (the full model's measured step, the one reference budgets are fractions of), every
        cost is scaled so the full model costs exactly that: a router input t is then t of the measured
        step, as in search, verify and the lookup (the model's own prediction of it differs by its error)."""
        layer_ms = model.layer_table_ms(spec)
        attn, mlp, fixed = layer_ms["attn_ms"].float(), layer_ms["mlp_ms"].float(), float(layer_ms["fixed_ms"])
        if full_ms is not None:
            scale = float(full_ms) / (fixed + float(attn[:, -1].sum() + mlp[:, -1].sum()))
            attn, mlp, fixed = attn * scale, mlp * scale, fixed * scale
        return cls(attn, mlp, fixed, source=f"measured ({device_name})", unit="ms", regime=regime_key)

    @classmethod
    def analytic(cls, spec, regime_key: str) -> "LatencyTable":
        """Relative costs for a regime that was never profiled, from `SubnetConfig`'s own cost model:
        bytes moved (weights, KV cache, activations) for decode, which streams the weights for a few
        tokens, and FLOPs for prefill, which is bound by its GEMMs. Both are sums over layers, so each
        entry is what that choice adds over the layer's narrowest one and `fixed` is the smallest
        config's whole cost: `fixed` plus a config's entries is exactly that config's cost."""
        r = Regime.parse(regime_key)
        cost = SubnetConfig.bytes_moved if r.phase == "decode" else SubnetConfig.flops
        smallest = spec.smallest()
        fixed = cost(smallest, spec, r)

        def added(field: str, layer: int, choice: int) -> float:
            """The cost of the smallest config with one layer's `field` set to `choice`, less its own."""
            values = list(getattr(smallest, field))
            values[layer] = choice
            return cost(replace(smallest, **{field: tuple(values)}), spec, r) - fixed

        attn = torch.tensor([[added("heads", l, h) for h in hs] for l, hs in enumerate(spec.head_counts)])
        mlp = torch.tensor([[added("mlp_width", l, w) for w in ws] for l, ws in enumerate(spec.mlp_widths)])
        return cls(attn, mlp, fixed, source=ANALYTIC_SOURCE, unit="relative", regime=r.key)


def expected_latency(table: LatencyTable, p_mlp: torch.Tensor, p_attn: torch.Tensor) -> torch.Tensor:
    """Expected latency as a fraction of the full model's, from choice probabilities [..., L, C]."""
    e = table.fixed + (p_mlp * table.mlp).sum((-1, -2)) + (p_attn * table.attn).sum((-1, -2))
    return e / table.full


PENALTY_LINEAR = 0.1  # the penalty's linear term: a gradient at the budget itself, where r^2 has none


def over_budget_penalty(e: torch.Tensor, t, weight: float, linear: float = PENALTY_LINEAR) -> torch.Tensor:
    """weight * (r^2 + linear * r) with r the relative overshoot of expected latency fraction e over budget t."""
    over = F.relu(e / t - 1)
    return weight * (over ** 2 + linear * over)
