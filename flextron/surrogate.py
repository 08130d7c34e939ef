"""The surrogate: a sub-network's validation loss, predicted from its per-layer choices.

The surrogate is a small network predicting a sub-network's validation loss from per-layer choice
probabilities (one-hot for a concrete config). It is fitted on sampled configs' measured losses; the
routers are trained only when its held-out relative error is under a threshold.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

from flextron.spec import SubnetConfig


def one_hot(spec, cfgs: list[SubnetConfig]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each config's choices as one-hot features: MLP widths [N, L, width choices] and head counts
    [N, L, head choices], the inputs the surrogate and the latency table take."""
    m = torch.zeros(len(cfgs), spec.num_layers, len(spec.mlp_widths[0]))
    a = torch.zeros(len(cfgs), spec.num_layers, len(spec.head_counts[0]))
    for i, c in enumerate(cfgs):
        for l, (w, hc) in enumerate(zip(c.mlp_width, c.heads)):
            m[i, l, spec.mlp_widths[l].index(w)] = 1
            a[i, l, spec.head_counts[l].index(hc)] = 1
    return m, a


SURROGATE_HIDDEN = 128  # units of each of the surrogate's two hidden layers


class Surrogate(nn.Module):
    def __init__(self, n_layers: int, n_mlp: int, n_attn: int, hidden: int = SURROGATE_HIDDEN):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_layers * (n_mlp + n_attn), hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                 nn.GELU(), nn.Linear(hidden, 1))
        self.register_buffer("y_mean", torch.zeros(()))
        self.register_buffer("y_std", torch.ones(()))

    def forward(self, p_mlp, p_attn):
        x = torch.cat([p_mlp.flatten(-2), p_attn.flatten(-2)], -1)
        return self.net(x).squeeze(-1) * self.y_std + self.y_mean


def sample_configs(spec, n: int, seed: int) -> list[SubnetConfig]:
    """Uniform configs plus heterogeneous ones spread over the whole size range: each sample draws
    a size level, then every layer's choice index scatters around it."""
    rng = random.Random(seed)
    out = sorted(spec.uniform_configs(), key=lambda c: c.key)
    seen, target = set(out), len(out) + n

    def pick(choices, level):
        i = round(level * (len(choices) - 1) + rng.gauss(0, 1.2))
        return choices[min(len(choices) - 1, max(0, i))]

    for _ in range(50 * n):
        if len(out) >= target:
            break
        lm, la = rng.random(), rng.random()
        c = SubnetConfig(tuple(pick(ws, lm) for ws in spec.mlp_widths), tuple(pick(hs, la) for hs in spec.head_counts))
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def fit_surrogate(spec, cfgs: list[SubnetConfig], losses: list[float], seed: int,
                  steps: int = 1500, lr: float = 3e-3, hidden: int = SURROGATE_HIDDEN) -> tuple[Surrogate, dict]:
    """Fit on 80% of the configs; report the error on the 20% it never saw."""
    torch.manual_seed(seed)
    idx = list(range(len(cfgs)))
    random.Random(seed).shuffle(idx)
    n_test = max(4, len(idx) // 5)
    test, tr = idx[:n_test], idx[n_test:]
    m, a = one_hot(spec, cfgs)
    y = torch.tensor(losses, dtype=torch.float32)
    sur = Surrogate(spec.num_layers, m.shape[-1], a.shape[-1], hidden)
    sur.y_mean.fill_(float(y[tr].mean()))
    sur.y_std.fill_(float(y[tr].std().clamp_min(1e-3)))
    opt = torch.optim.AdamW(sur.parameters(), lr=lr, weight_decay=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss((sur(m[tr], a[tr]) - sur.y_mean) / sur.y_std, (y[tr] - sur.y_mean) / sur.y_std)
        loss.backward()
        opt.step()
    sur.eval()
    with torch.no_grad():
        pred = sur(m[test], a[test])
    rel = ((pred - y[test]).abs() / y[test]).numpy()
    from scipy.stats import spearmanr

    rho = float(spearmanr(pred.numpy(), y[test].numpy()).statistic) if len(test) > 2 else float("nan")
    return sur, {"train": len(tr), "heldout": len(test), "heldout_mean_rel_err": float(rel.mean()),
                 "heldout_max_rel_err": float(rel.max()), "heldout_spearman": rho}


def surrogate_losses(sur: Surrogate, spec, cfgs: list[SubnetConfig]) -> list[float]:
    """The surrogate's predicted loss of each config."""
    with torch.no_grad():
        return sur(*one_hot(spec, cfgs)).tolist()
