"""The static router: a budget in, one width choice per layer out.

The static router maps a budget (fraction of the full model's latency) to per-layer logits over MLP
widths and head counts. Training uses Gumbel-softmax with an annealed temperature; the loss is the
surrogate's predicted loss plus a penalty on expected latency over budget. At inference it is
deterministic (argmax) and answers any budget in range; the answer is shrunk greedily while the
latency model predicts it over budget, and widened while budget is left (`answer_static`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flextron.latency_table import PENALTY_LINEAR, LatencyTable, expected_latency, over_budget_penalty
from flextron.spec import SubnetConfig
from flextron.surrogate import Surrogate, surrogate_losses

STATIC_HIDDEN = 64  # units of each of the static router's two hidden layers


class StaticRouter(nn.Module):
    """budget fraction -> per-layer logits over MLP widths and head counts."""

    def __init__(self, n_layers: int, n_mlp: int, n_attn: int, hidden: int = STATIC_HIDDEN):
        super().__init__()
        self.shape = (n_layers, n_mlp, n_attn)
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, n_layers * (n_mlp + n_attn)))

    def forward(self, t: torch.Tensor):
        L, W, H = self.shape
        z = self.net(t.view(-1, 1))
        return z[:, : L * W].view(-1, L, W), z[:, L * W:].view(-1, L, H)


def anneal(step: int, steps: int, start: float = 2.0, end: float = 0.1) -> float:
    """The Gumbel-softmax temperature at `step` of `steps`: geometric from `start` to `end`."""
    return start * (end / start) ** (step / max(1, steps - 1))


def train_static(spec, sur: Surrogate, table: LatencyTable, t_min: float, steps: int, latency_weight: float, seed: int,
                 lr: float = 3e-3, batch: int = 32, hidden: int = STATIC_HIDDEN,
                 penalty_linear: float = PENALTY_LINEAR) -> tuple[StaticRouter, list[dict]]:
    torch.manual_seed(seed)
    L, W, H = spec.num_layers, len(spec.mlp_widths[0]), len(spec.head_counts[0])
    router = StaticRouter(L, W, H, hidden)
    for p in sur.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    hist = []
    for step in range(steps):
        tau = anneal(step, steps)
        t = t_min + (1 - t_min) * torch.rand(batch)
        lm, la = router(t)
        pm, pa = F.gumbel_softmax(lm, tau=tau, dim=-1), F.gumbel_softmax(la, tau=tau, dim=-1)
        e = expected_latency(table, pm, pa)
        pred = sur(pm, pa)
        loss = (pred + over_budget_penalty(e, t, latency_weight, penalty_linear)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            hist.append({"step": step, "tau": round(tau, 4), "loss": loss.item(), "surrogate": pred.mean().item(),
                         "over_budget_frac": float((e > t).float().mean())})
    router.eval()
    return router, hist


def route_static(router: StaticRouter, spec, t: float) -> SubnetConfig:
    with torch.no_grad():
        lm, la = router(torch.tensor([float(t)]))
    mi, ai = lm[0].argmax(-1).tolist(), la[0].argmax(-1).tolist()
    return SubnetConfig(tuple(spec.mlp_widths[l][i] for l, i in enumerate(mi)),
                        tuple(spec.head_counts[l][i] for l, i in enumerate(ai)))


def _moves(cur: SubnetConfig, spec, d: int) -> list[SubnetConfig]:
    """Every config one choice index away from `cur` in direction d (-1 narrower, +1 wider), one layer at a time."""
    out = []
    for l in range(spec.num_layers):
        for field, choices in (("mlp_width", spec.mlp_widths[l]), ("heads", spec.head_counts[l])):
            vals = list(getattr(cur, field))
            i = choices.index(vals[l]) + d
            if 0 <= i < len(choices):
                vals[l] = choices[i]
                out.append(SubnetConfig(**{"mlp_width": cur.mlp_width, "heads": cur.heads, field: tuple(vals)}))
    return out


def fit_to_budget(cfg: SubnetConfig, spec, predict, budget: float, sur: Surrogate | None = None) -> SubnetConfig:
    """Shrink `cfg` one layer choice at a time until predict(cfg) <= budget, each time taking the step
    that saves the most latency per unit of predicted loss (or the most latency without a surrogate)."""
    cur, base = cfg, predict(cfg)
    while base > budget:
        cands = _moves(cur, spec, -1)
        if not cands:
            break
        preds = [predict(c) for c in cands]
        saved = [base - p for p in preds]
        if sur is not None:
            losses = surrogate_losses(sur, spec, [cur] + cands)
            score = [s / max(1e-3, losses[i + 1] - losses[0] + 1e-3) for i, s in enumerate(saved)]
        else:
            score = saved
        best = max(range(len(cands)), key=score.__getitem__)
        cur, base = cands[best], preds[best]
    return cur


def grow_to_budget(cfg: SubnetConfig, spec, predict, budget: float, sur: Surrogate) -> SubnetConfig:
    """Widen `cfg` one layer choice at a time while predict(cfg) stays <= budget, each time taking
    the step the surrogate rates best per ms added. Nested widths make a wider choice no worse in
    truth, so budget left unused is spent (the surrogate, fitted on whole configs, is only asked
    about whole configs); this recovers budget a router trained through soft choices left idle."""
    cur, base = cfg, predict(cfg)
    while True:
        cands = [(c, p) for c in _moves(cur, spec, +1) if (p := predict(c)) <= budget]
        if not cands:
            return cur
        losses = surrogate_losses(sur, spec, [cur] + [c for c, _ in cands])
        gain = [(losses[0] - losses[i + 1]) / max(1e-6, p - base) for i, (_, p) in enumerate(cands)]
        cur, base = cands[max(range(len(cands)), key=gain.__getitem__)]


def answer_static(router: StaticRouter, sur: Surrogate, spec, budget_ms: float, predict,
                  full_ms: float | None = None) -> SubnetConfig:
    """The static router's config for `budget_ms`: routed at the budget's fraction of `full_ms` (the
    full model's step its latency table was scaled to: the measured one; default the latency model's
    prediction of it), shrunk if predicted over, widened into budget left unused."""
    t = min(1.0, budget_ms / (full_ms or predict(spec.full())))
    cfg = fit_to_budget(route_static(router, spec, t), spec, predict, budget_ms, sur)
    return grow_to_budget(cfg, spec, predict, budget_ms, sur)


def static_answer(router: StaticRouter, sur: Surrogate, spec, t: float, predict=None,
                  full_ms: float | None = None) -> SubnetConfig:
    """The static answer users get at budget fraction t of the full model's `full_ms` (see
    `answer_static`): with a latency model (`predict`, config -> ms), `answer_static` at t of it; without
    one (a regime never profiled), the raw routing."""
    if predict is None:
        return route_static(router, spec, t)
    full = full_ms or predict(spec.full())
    return answer_static(router, sur, spec, t * full, predict, full)
