"""The dynamic router: each token's MLP width, picked from its hidden state and the budget.

The dynamic router picks each token's MLP width from its hidden state and the budget. Training uses
the nested structure: a soft choice is a per-neuron mask (sum of the probabilities of the widths that
include the neuron). Inference groups tokens by width and runs each group on the prefix weights, so
the skipped compute is really skipped. Heads come from the static answer. After training, a logit
shift toward narrow widths is calibrated per budget on calibration text, so hard routing meets each
budget in expectation. A layer whose calibrated choice is (almost) always one width serves that width
without routing (`DynamicMLP.fixed`): no router matmul, the same prefix compute.

The model weights are not tuned with the router: `flextron train` (sandwich distillation) tunes them
before, and the router is trained on the weights it will serve.
"""

from __future__ import annotations

import random
from operator import itemgetter

import torch
import torch.nn.functional as F
from torch import nn

from flextron.errors import FlextronError
from flextron.latency_table import PENALTY_LINEAR, LatencyTable, over_budget_penalty
from flextron.progress import progress
from flextron.spec import SubnetConfig
from flextron.static_router import anneal


class DynamicMLP(nn.Module):
    """Wraps a gated MLP (gate/up/down ElasticLinears + act_fn): per token, a router picks the width."""

    def __init__(self, mlp: nn.Module, adapter, widths: tuple[int, ...], hidden_size: int):
        super().__init__()
        self.mlp, self.widths = mlp, tuple(widths)
        self.gate, self.up, self.down = (getattr(mlp, n) for n in (adapter.gate, adapter.up, adapter.down))
        self.router = nn.Linear(hidden_size + 1, len(widths))
        nn.init.zeros_(self.router.weight)
        with torch.no_grad():
            self.router.bias.copy_(torch.linspace(-1, 1, len(widths)))  # start leaning to wide
        self.budget = 1.0
        self.tau = 1.0
        self.shift = 0.0  # calibrated per budget: subtracted in proportion to width rank (> 0 leans narrow)
        self.soft = False  # training: soft nested mask; inference: grouped prefix compute
        self.fixed: int | None = None  # serving: a width index every token takes, so no routing is done
        self._tokens = 0  # tokens of the last forward (for a fixed layer's accounting)
        self._probs: torch.Tensor | None = None
        self.last_choice: torch.Tensor | None = None
        seg = torch.tensor([self.widths[0]] + [b - a for a, b in zip(self.widths, self.widths[1:])])
        self.register_buffer("seg", seg, persistent=False)
        self.register_buffer("rank", torch.linspace(0, 1, len(widths)), persistent=False)

    def prefix(self, x, width: int):
        """The MLP on the first `width` neurons only (their weights are a prefix: no copy)."""
        h = self.mlp.act_fn(F.linear(x, self.gate.weight[:width])) * F.linear(x, self.up.weight[:width])
        return F.linear(h, self.down.weight[:, :width])

    def logits(self, x):
        """Router logits from the hidden state and the budget: the budget's column and the calibrated
        shift fold into one bias, so a decode step costs a single small matmul per layer."""
        w = self.router.weight
        bias = self.router.bias + self.budget * w[:, -1]
        if self.shift:
            bias = bias - self.shift * self.rank
        return F.linear(x, w[:, :-1], bias.to(x.dtype))

    @property
    def last_probs(self) -> torch.Tensor | None:
        """Per-token choice probabilities of the last forward (one-hot under hard routing)."""
        if self._probs is None and self.last_choice is not None:
            self._probs = F.one_hot(self.last_choice, len(self.widths)).float()
        if self._probs is None and self.fixed is not None and self._tokens:
            self._probs = F.one_hot(torch.full((self._tokens,), self.fixed, device=self.seg.device),
                                    len(self.widths)).float()
        return self._probs

    def forward(self, x):
        if self.fixed is not None and not self.soft:  # a constant layer: its width, no router
            self.last_choice, self._probs, self._tokens = None, None, x.numel() // x.shape[-1]
            return self.prefix(x, self.widths[self.fixed])
        z = self.logits(x)
        if self.soft:
            p = F.gumbel_softmax(z.float(), tau=self.tau, dim=-1)
            self._probs, self.last_choice = p, None
            keep = p.flip(-1).cumsum(-1).flip(-1)  # segment k is kept by every width index >= k
            mask = keep.repeat_interleave(self.seg, dim=-1).to(x.dtype)
            h = self.mlp.act_fn(F.linear(x, self.gate.weight)) * F.linear(x, self.up.weight)
            return F.linear(h * mask, self.down.weight)
        choice = z.argmax(-1)
        self.last_choice, self._probs = choice, None
        if choice.numel() == 1:  # one token (batch-1 decode): no grouping, just its prefix
            return self.prefix(x, self.widths[int(choice)])
        flat, cflat = x.reshape(-1, x.shape[-1]), choice.reshape(-1)
        out = torch.empty_like(flat)
        for k in cflat.unique().tolist():  # tokens grouped by width: each group runs the prefix weights only
            idx = (cflat == k).nonzero().squeeze(-1)
            out.index_copy_(0, idx, self.prefix(flat.index_select(0, idx), self.widths[k]))
        return out.view_as(x)


class DynamicRouting:
    """Installs DynamicMLPs into an ElasticModel's layers (and removes them)."""

    def __init__(self, elastic):
        self.elastic = elastic
        spec, ad = elastic.spec, elastic.adapter
        self.modules: list[DynamicMLP] = []
        for l, layer in enumerate(ad.layers(elastic.model)):
            mlp = ad.mlp_of(layer)
            dtype = next(mlp.parameters()).dtype
            self.modules.append(DynamicMLP(mlp, ad, spec.mlp_widths[l], spec.hidden_size).to(elastic.device, dtype))
        self._orig = [ad.mlp_of(layer) for layer in ad.layers(elastic.model)]

    def parameters(self):
        return [p for m in self.modules for p in m.router.parameters()]

    def install(self):
        ad = self.elastic.adapter
        for layer, m in zip(ad.layers(self.elastic.model), self.modules):
            setattr(layer, ad.mlp, m)

    def remove(self):
        ad = self.elastic.adapter
        for layer, m in zip(ad.layers(self.elastic.model), self._orig):
            setattr(layer, ad.mlp, m)

    def set(self, budget: float, soft: bool, tau: float = 1.0, shift: float = 0.0, fixed: dict | None = None):
        """Route at `budget` (soft while training, at temperature `tau`) with logit `shift`; the layers
        in `fixed` ({layer: width index}) serve that width without routing."""
        fixed = {int(k): int(v) for k, v in (fixed or {}).items()}
        for l, m in enumerate(self.modules):
            m.budget, m.soft, m.tau, m.shift, m.fixed = budget, soft, tau, shift, fixed.get(l)

    def choice_shares(self) -> list[list[float]]:
        """Per layer, the share of the last forward's tokens that took each width."""
        return [m.last_probs.reshape(-1, len(m.widths)).mean(0).tolist() for m in self.modules]

    def expected_mlp(self, table: LatencyTable) -> torch.Tensor:
        """Expected MLP latency (table units) of the last forward: per layer, mean over tokens of sum_c p_c T[l, c]."""
        return sum((m.last_probs.reshape(-1, len(m.widths)).mean(0) * table.mlp[l].to(m.last_probs.device)).sum()
                   for l, m in enumerate(self.modules))

    def expected_frac(self, table: LatencyTable, heads) -> torch.Tensor:
        """Expected latency fraction of the last forward: fixed part, attention at the static `heads`,
        and the routed MLP widths' expectation."""
        spec = self.elastic.spec
        attn = sum(float(table.attn[l, spec.head_counts[l].index(h)]) for l, h in enumerate(heads))
        return (table.fixed + attn + self.expected_mlp(table)) / table.full

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{l}.{k}": v.detach().cpu().contiguous()
                for l, m in enumerate(self.modules) for k, v in m.router.state_dict().items()}

    def load_state_dict(self, sd: dict) -> None:
        for l, m in enumerate(self.modules):
            m.router.load_state_dict({k.split(".", 1)[1]: v for k, v in sd.items() if k.split(".", 1)[0] == str(l)})


def dynamic_step(elastic, routing: DynamicRouting, teacher, ids, table: LatencyTable, static_heads, t: float,
                 tau: float, latency_weight: float, distill_weight: float = 0.9,
                 penalty_linear: float = PENALTY_LINEAR):
    """One soft forward at budget t with heads from the static router; returns (loss, expected fraction)."""
    from flextron.train import distill_loss

    with torch.no_grad():
        t_logits = teacher(input_ids=ids, use_cache=False).logits
    cfg = SubnetConfig(elastic.spec.full().mlp_width, static_heads)
    routing.set(t, soft=True, tau=tau)
    with elastic.use(cfg):
        s_logits = elastic(input_ids=ids, use_cache=False).logits
    lm = distill_loss(s_logits, t_logits, ids, distill_weight, 1.0)
    e = routing.expected_frac(table, static_heads)
    return lm + over_budget_penalty(e, t, latency_weight, penalty_linear), float(e.detach())


class DynamicTrainer:
    """Trains the installed dynamic router by distillation from a frozen `teacher` (the original model):
    every step draws a budget uniformly over the table's range from `seed`'s stream and takes the
    next `batch_size` windows of `windows` (wrapping around); `heads_for(t)` gives the static heads at
    budget t. The model stays frozen."""

    def __init__(self, elastic, routing: DynamicRouting, teacher, windows: torch.Tensor, table: LatencyTable,
                 heads_for, *, batch_size: int, latency_weight: float, seed: int,
                 penalty_linear: float = PENALTY_LINEAR):
        self.elastic, self.routing, self.teacher, self.windows = elastic, routing, teacher, windows
        self.table, self.heads_for = table, heads_for
        self.batch_size, self.latency_weight, self.penalty_linear = batch_size, latency_weight, penalty_linear
        self.rng = random.Random(seed)
        self.batches_used = 0

    def train_router(self, steps: int, lr: float) -> list[dict]:
        """`steps` Adam steps on the router alone (the model frozen), the Gumbel temperature annealed
        from 1.0 to 0.2; returns their history."""
        opt = torch.optim.Adam(self.routing.parameters(), lr=lr)
        return self._steps(steps, opt, lambda s: anneal(s, steps, 1.0, 0.2), "dynamic router")

    def _steps(self, n: int, optimizer, tau, desc: str) -> list[dict]:
        """`n` optimizer steps at temperature `tau(step)`."""
        hist = []
        for step in progress(range(n), desc=desc):
            t = self.rng.uniform(self.table.smallest_frac, 1.0)
            i0 = (self.batches_used * self.batch_size) % len(self.windows)
            self.batches_used += 1
            ids = self.windows[i0: i0 + self.batch_size].to(self.elastic.device)
            loss, e = dynamic_step(self.elastic, self.routing, self.teacher, ids, self.table, self.heads_for(t), t,
                                   tau(step), self.latency_weight, penalty_linear=self.penalty_linear)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            hist.append({"step": step, "budget_frac": round(t, 4), "loss": float(loss.detach()),
                         "expected_frac": round(e, 4)})
        return hist


@torch.no_grad()
def dynamic_eval(elastic, routing: DynamicRouting, windows, heads, t: float, table: LatencyTable, batch_size: int = 8,
                 shift: float = 0.0, fixed: dict | None = None) -> dict:
    """Loss on `windows` with hard per-token routing (grouped compute) at budget t, logit `shift` and
    `fixed` layers; the expected latency fraction of that routing, and per layer the share of tokens
    that took each width."""
    from flextron.evaluate import mean_loss

    routing.set(t, soft=False, shift=shift, fixed=fixed)
    fracs: list[float] = []
    shares, tokens = [], []

    def record():
        fracs.append(float(routing.expected_frac(table, heads)))
        shares.append(routing.choice_shares())
        tokens.append(routing.modules[0].last_probs.reshape(-1, len(routing.modules[0].widths)).shape[0])

    loss = mean_loss(elastic, SubnetConfig(elastic.spec.full().mlp_width, tuple(heads)), windows, batch_size,
                     after_batch=record)
    w = torch.tensor(tokens, dtype=torch.float64)
    mean_shares = (torch.tensor(shares, dtype=torch.float64) * w[:, None, None]).sum(0) / w.sum()
    return {"loss": loss, "expected_frac": float((torch.tensor(fracs, dtype=torch.float64) * w).sum() / w.sum()),
            "shares": mean_shares.tolist()}


def constant_layers(shares: list[list[float]], fix_share: float) -> dict[int, int]:
    """{layer: width index} of the layers where one width took at least `fix_share` of the tokens."""
    if fix_share > 1:
        return {}
    return {l: int(max(range(len(s)), key=s.__getitem__)) for l, s in enumerate(shares) if max(s) >= fix_share - 1e-9}


CALIB_ITERS, CALIB_MAX_SHIFT = 14, 32.0  # bisection steps of a budget's logit shift, and its largest value


def calibrate_dynamic(elastic, routing: DynamicRouting, windows, table: LatencyTable, heads_for, fracs, *,
                      iters: int = CALIB_ITERS, bound: float = CALIB_MAX_SHIFT, fix_share: float = 1.0,
                      desc: str = "calibrate dynamic router") -> list[dict]:
    """Per budget fraction t, the logit shift that makes hard routing's expected latency fraction on
    `windows` (calibration text) meet t: a bisection, since a larger shift only moves tokens to narrower
    widths. A budget the narrowest widths cannot meet gets the largest shift (and says so). Layers
    where one width took at least `fix_share` of the calibration tokens are then served at that width
    without routing (`fixed_layers`); the point's `expected_frac` is that served form's."""
    def expected(t: float, heads, shift: float) -> float:
        return dynamic_eval(elastic, routing, windows, heads, t, table, batch_size=4, shift=shift)["expected_frac"]

    out = []
    for t in progress(fracs, desc=desc):
        heads = heads_for(t)
        lo, hi = -bound, bound
        if expected(t, heads, lo) <= t:  # even leaning wide fits
            hi = lo
        elif expected(t, heads, hi) > t:  # cannot fit: narrowest routing
            lo = hi
        for _ in range(iters if lo < hi else 0):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if expected(t, heads, mid) <= t else (mid, hi)
        routed = dynamic_eval(elastic, routing, windows, heads, t, table, batch_size=4, shift=hi)
        fixed = constant_layers(routed["shares"], fix_share)
        e = (dynamic_eval(elastic, routing, windows, heads, t, table, batch_size=4, shift=hi, fixed=fixed)
             if fixed else routed)["expected_frac"]
        out.append({"router_frac": round(float(t), 4), "heads": list(heads), "shift": round(hi, 4),
                    "fixed_layers": {str(l): k for l, k in fixed.items()},
                    "expected_frac": round(e, 4), "meets": e <= t + 1e-6})
    routing.set(1.0, soft=False)
    return out


def calibrated_point(calibration: list[dict], t: float) -> dict:
    """The calibrated budget point that serves budget fraction t: the largest one not above t (its
    heads, shift and router budget input), so the expected latency never exceeds t. Below every
    calibrated budget nothing is served within it: a FlextronError names the smallest one (serving the
    smallest point there would quietly exceed the budget)."""
    frac = itemgetter("router_frac")
    fits = [c for c in calibration if frac(c) <= t + 1e-9]
    if not fits:
        low = min(calibration, key=frac)
        raise FlextronError(
            f"budget fraction {t:.4g} of the latency table's full model is below the routers' smallest calibrated "
            f"budget ({frac(low):.4g}, {low.get('budget_ms', float('nan')):.4g} ms): nothing they serve fits it; "
            "ask for a larger budget, or re-run `flextron route` (it calibrates from the smallest feasible one)")
    return max(fits, key=frac)
