"""Flextron's routers: a surrogate loss model, a static router and a dynamic (per-token) router.

- The latency table of a regime is the latency model's `[layers, choices]` table (measured on the
  device). Only when the regime was never profiled is an analytic FLOPs/bytes table used, and then
  its source says "analytic" everywhere it shows.
- The surrogate is a small network predicting a sub-network's validation loss from per-layer
  choice probabilities (one-hot for a concrete config). It is fitted on sampled configs' measured
  losses; the routers are trained only when its held-out relative error is under a threshold.
- The static router maps a budget (fraction of the full model's latency) to per-layer logits over
  MLP widths and head counts. Training uses Gumbel-softmax with an annealed temperature; the loss is
  the surrogate's predicted loss plus a penalty on expected latency over budget. At inference it
  is deterministic (argmax) and answers any budget in range; the answer is shrunk greedily while the
  latency model predicts it over budget, and widened while budget is left (`answer_static`).
- The dynamic router picks each token's MLP width from its hidden state and the budget. Training
  uses the nested structure: a soft choice is a per-neuron mask (sum of the probabilities of the
  widths that include the neuron). Inference groups tokens by width and runs each group on the
  prefix weights, so the skipped compute is really skipped. Heads come from the static answer. After
  training, a logit shift toward narrow widths is calibrated per budget on calibration text, so hard
  routing meets each budget in expectation.
- Joint fine-tuning then trains the model weights together with the dynamic router (short).

Everything is stored as safetensors plus JSON in `RUN/router/<regime>/<weights>/` (a folder built
aside and swapped in whole). This module takes latency as plain tensors and callables;
`search/route.py` (the `flextron route` stage) wires in the latency model.
"""

from __future__ import annotations

import random
from operator import itemgetter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flextron.errors import FlextronError
from flextron.spec import SubnetConfig

ROUTERS_DIR = "router"


ROUTER_WEIGHTS = ("elastic", "trained")  # resolved weight names (`--weights auto` is resolved first)


def regime_dir(run_root: str | Path, regime_key: str, *, weights: str) -> Path:
    """RUN/router/<regime>/<weights>/: routers are keyed by the weights they were trained on too, so
    routers trained on `trained/` never serve (or seed a search over) the one-shot `elastic/` weights."""
    if weights not in ROUTER_WEIGHTS:
        raise FlextronError(f"routers are stored per resolved weights {list(ROUTER_WEIGHTS)}, got {weights!r}")
    from flextron.spec import regime_slug

    return Path(run_root) / ROUTERS_DIR / regime_slug(regime_key) / weights


# ---- the latency table ------------------------------------------------------------------------------
def _table(attn: torch.Tensor, mlp: torch.Tensor, fixed: float, **meta) -> dict:
    """A latency table: per-layer costs [L, choices] plus the fixed part; `full` is the full model's
    cost and `smallest_frac` the least any config costs, as a fraction of full."""
    full = fixed + float(attn[:, -1].sum() + mlp[:, -1].sum())
    least = fixed + float(attn.min(-1).values.sum() + mlp.min(-1).values.sum())
    return {"attn": attn, "mlp": mlp, "fixed": fixed, "full": full, "smallest_frac": least / full, **meta}


def measured_table(layer_ms: dict, source: str, regime_key: str) -> dict:
    """A latency table from a latency model's `[layers, choices]` ms tables (attn_ms, mlp_ms, fixed_ms)."""
    return _table(layer_ms["attn_ms"].float(), layer_ms["mlp_ms"].float(), float(layer_ms["fixed_ms"]),
                  source=source, regime=regime_key, unit="ms")


def analytic_table(spec, regime_key: str) -> dict:
    """Relative costs (weight bytes plus KV-cache reads for decode, or FLOPs for prefill) per layer and
    choice, for a regime that was never profiled; its source says so."""
    from flextron.spec import Regime

    r = Regime.parse(regime_key)
    h, d = spec.hidden_size, spec.head_dim
    kv_ctx = r.seq_len if r.phase == "decode" else r.new_tokens
    mlp = torch.tensor([[3.0 * h * w for w in ws] for ws in spec.mlp_widths])
    attn = torch.tensor([[2.0 * h * hc * d + 2.0 * h * (hc // spec.q_per_kv) * d
                          + 2.0 * (hc // spec.q_per_kv if r.phase == "decode" else hc) * d * kv_ctx
                          for hc in hs] for hs in spec.head_counts])
    return _table(attn, mlp, float(2 * spec.vocab_size * h), regime=r.key, unit="relative",
                  source="analytic (FLOPs/bytes model; this regime was not profiled)")


def expected_latency(table: dict, p_mlp: torch.Tensor, p_attn: torch.Tensor) -> torch.Tensor:
    """Expected latency as a fraction of the full model's, from choice probabilities [..., L, C]."""
    e = table["fixed"] + (p_mlp * table["mlp"]).sum((-1, -2)) + (p_attn * table["attn"]).sum((-1, -2))
    return e / table["full"]


def over_budget_penalty(e: torch.Tensor, t, weight: float) -> torch.Tensor:
    """weight * (r^2 + 0.1 r) with r the relative overshoot of expected latency fraction e over budget t."""
    over = F.relu(e / t - 1)
    return weight * (over ** 2 + 0.1 * over)


# ---- features and the surrogate ---------------------------------------------------------------------
def one_hot(spec, cfgs: list[SubnetConfig]) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.zeros(len(cfgs), spec.num_layers, len(spec.mlp_widths[0]))
    a = torch.zeros(len(cfgs), spec.num_layers, len(spec.head_counts[0]))
    for i, c in enumerate(cfgs):
        for l, (w, hc) in enumerate(zip(c.mlp_width, c.heads)):
            m[i, l, spec.mlp_widths[l].index(w)] = 1
            a[i, l, spec.head_counts[l].index(hc)] = 1
    return m, a


class Surrogate(nn.Module):
    def __init__(self, n_layers: int, n_mlp: int, n_attn: int, hidden: int = 128):
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


def fit_surrogate(spec, cfgs: list[SubnetConfig], losses: list[float], seed: int, steps: int = 1500) -> tuple[Surrogate, dict]:
    """Fit on 80% of the configs; report the error on the 20% it never saw."""
    torch.manual_seed(seed)
    idx = list(range(len(cfgs)))
    random.Random(seed).shuffle(idx)
    n_test = max(4, len(idx) // 5)
    test, tr = idx[:n_test], idx[n_test:]
    m, a = one_hot(spec, cfgs)
    y = torch.tensor(losses, dtype=torch.float32)
    sur = Surrogate(spec.num_layers, m.shape[-1], a.shape[-1])
    sur.y_mean.fill_(float(y[tr].mean()))
    sur.y_std.fill_(float(y[tr].std().clamp_min(1e-3)))
    opt = torch.optim.AdamW(sur.parameters(), lr=3e-3, weight_decay=1e-3)
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


# ---- the static router ------------------------------------------------------------------------------
class StaticRouter(nn.Module):
    """budget fraction -> per-layer logits over MLP widths and head counts."""

    def __init__(self, n_layers: int, n_mlp: int, n_attn: int, hidden: int = 64):
        super().__init__()
        self.shape = (n_layers, n_mlp, n_attn)
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, n_layers * (n_mlp + n_attn)))

    def forward(self, t: torch.Tensor):
        L, W, H = self.shape
        z = self.net(t.view(-1, 1))
        return z[:, : L * W].view(-1, L, W), z[:, L * W:].view(-1, L, H)


def anneal(step: int, steps: int, start: float = 2.0, end: float = 0.1) -> float:
    return start * (end / start) ** (step / max(1, steps - 1))


def train_static(spec, sur: Surrogate, table: dict, t_min: float, steps: int, latency_weight: float, seed: int,
                 lr: float = 3e-3, batch: int = 32) -> tuple[StaticRouter, list[dict]]:
    torch.manual_seed(seed)
    L, W, H = spec.num_layers, len(spec.mlp_widths[0]), len(spec.head_counts[0])
    router = StaticRouter(L, W, H)
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
        loss = (pred + over_budget_penalty(e, t, latency_weight)).mean()
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
    return SubnetConfig(tuple(spec.mlp_widths[l][i] for l, i in enumerate(mi)), tuple(spec.head_counts[l][i] for l, i in enumerate(ai)))


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


def _sur_losses(sur: Surrogate, spec, cfgs: list[SubnetConfig]) -> list[float]:
    with torch.no_grad():
        return sur(*one_hot(spec, cfgs)).tolist()


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
            losses = _sur_losses(sur, spec, [cur] + cands)
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
        losses = _sur_losses(sur, spec, [cur] + [c for c, _ in cands])
        gain = [(losses[0] - losses[i + 1]) / max(1e-6, p - base) for i, (_, p) in enumerate(cands)]
        cur, base = cands[max(range(len(cands)), key=gain.__getitem__)]


def answer_static(router: StaticRouter, sur: Surrogate, spec, budget_ms: float, predict) -> SubnetConfig:
    """The static router's config for `budget_ms`: routed at the budget's fraction of the latency
    model's full-model prediction, shrunk if predicted over, widened into budget left unused."""
    t = min(1.0, budget_ms / predict(spec.full()))
    cfg = fit_to_budget(route_static(router, spec, t), spec, predict, budget_ms, sur)
    return grow_to_budget(cfg, spec, predict, budget_ms, sur)


# ---- the dynamic router -----------------------------------------------------------------------------
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
        return self._probs

    def forward(self, x):
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
            self.modules.append(DynamicMLP(mlp, ad, spec.mlp_widths[l], spec.hidden_size).to(elastic.device))
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

    def set(self, budget: float, soft: bool, tau: float = 1.0, shift: float = 0.0):
        for m in self.modules:
            m.budget, m.soft, m.tau, m.shift = budget, soft, tau, shift

    def expected_mlp(self, table: dict) -> torch.Tensor:
        """Expected MLP latency (table units) of the last forward: per layer, mean over tokens of sum_c p_c T[l, c]."""
        return sum((m.last_probs.reshape(-1, len(m.widths)).mean(0) * table["mlp"][l].to(m.last_probs.device)).sum()
                   for l, m in enumerate(self.modules))

    def expected_frac(self, table: dict, heads) -> torch.Tensor:
        """Expected latency fraction of the last forward: fixed part, attention at the static `heads`,
        and the routed MLP widths' expectation."""
        spec = self.elastic.spec
        attn = sum(float(table["attn"][l, spec.head_counts[l].index(h)]) for l, h in enumerate(heads))
        return (table["fixed"] + attn + self.expected_mlp(table)) / table["full"]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{l}.{k}": v.detach().cpu().contiguous() for l, m in enumerate(self.modules) for k, v in m.router.state_dict().items()}

    def load_state_dict(self, sd: dict) -> None:
        for l, m in enumerate(self.modules):
            m.router.load_state_dict({k.split(".", 1)[1]: v for k, v in sd.items() if k.split(".", 1)[0] == str(l)})


def dynamic_step(elastic, routing: DynamicRouting, teacher, ids, table, static_heads, t: float, tau: float,
                 latency_weight: float, distill_weight: float = 0.9):
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
    return lm + over_budget_penalty(e, t, latency_weight), float(e.detach())


@torch.no_grad()
def dynamic_eval(elastic, routing: DynamicRouting, windows, heads, t: float, table: dict, batch_size: int = 8,
                 shift: float = 0.0) -> dict:
    """Loss on `windows` with hard per-token routing (grouped compute) at budget t and logit `shift`,
    and the expected latency fraction of that routing."""
    from flextron.evaluate import mean_loss

    routing.set(t, soft=False, shift=shift)
    fracs: list[float] = []
    loss = mean_loss(elastic, SubnetConfig(elastic.spec.full().mlp_width, tuple(heads)), windows, batch_size,
                     after_batch=lambda: fracs.append(float(routing.expected_frac(table, heads))))
    return {"loss": loss, "expected_frac": sum(fracs) / len(fracs)}


def calibrate_dynamic(elastic, routing: DynamicRouting, windows, table: dict, heads_for, fracs, iters: int = 14,
                      bound: float = 32.0) -> list[dict]:
    """Per budget fraction t, the logit shift that makes hard routing's expected latency fraction on
    `windows` (calibration text) meet t: a bisection, since a larger shift only moves tokens to narrower
    widths. A budget the narrowest widths cannot meet gets the largest shift (and says so)."""
    def expected(t: float, heads, shift: float) -> float:
        return dynamic_eval(elastic, routing, windows, heads, t, table, batch_size=4, shift=shift)["expected_frac"]

    out = []
    for t in fracs:
        heads = heads_for(t)
        lo, hi = -bound, bound
        if expected(t, heads, lo) <= t:  # even leaning wide fits
            hi = lo
        elif expected(t, heads, hi) > t:  # cannot fit: narrowest routing
            lo = hi
        for _ in range(iters if lo < hi else 0):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if expected(t, heads, mid) <= t else (mid, hi)
        e = expected(t, heads, hi)
        out.append({"router_frac": round(float(t), 4), "heads": list(heads), "shift": round(hi, 4),
                    "expected_frac": round(e, 4), "meets": e <= t + 1e-6})
    routing.set(1.0, soft=False)
    return out


def calibrated_point(calibration: list[dict], t: float) -> dict:
    """The calibrated budget point that serves budget fraction t: the largest one not above t (its
    heads, shift and router budget input), so the expected latency never exceeds t; below every
    calibrated budget, the smallest one."""
    frac = itemgetter("router_frac")
    return max((c for c in calibration if frac(c) <= t + 1e-9), default=min(calibration, key=frac), key=frac)


# ---- storage ------------------------------------------------------------------------------------------
def save_tensors(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path, run_root: str | Path | None = None) -> dict:
    """The tensors of a safetensors file, or a FlextronError naming the file (missing or corrupt) and,
    given the run, the command that rebuilds it."""
    from safetensors.torch import load_file

    from flextron.rundir import rebuild_command

    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
        fix = f"rebuild it with `{rebuild_command(run_root, path)}`" if run_root is not None else "rebuild it"
        what = ("is missing" if isinstance(e, FileNotFoundError)
                else f"is corrupt or unreadable ({type(e).__name__}: {str(e)[:160]})")
        raise FlextronError(f"{path} {what}; {fix}") from None


class Routers:
    """Trained routers of one regime and one set of weights, loaded from RUN/router/<regime>/<weights>/
    (safetensors + JSON)."""

    def __init__(self, folder: Path, spec, run_root: str | Path | None = None):
        from flextron.rundir import read_json, recover_swap

        folder = Path(folder)
        recover_swap(folder)  # a `flextron route` killed while swapping its folder in
        meta_path = folder / "router.json"
        if not meta_path.is_file():
            legacy = (" (those in its parent folder predate routers kept per weights)"
                      if (folder.parent / "router.json").is_file() else "")
            raise FlextronError(f"{folder} holds no routers{legacy}; run `flextron route --run {run_root or 'RUN'} "
                                f"--regime REGIME --weights {folder.name}` first")
        self.folder, self.spec = folder, spec
        self.meta = read_json(meta_path, run_root)
        L, W, H = spec.num_layers, len(spec.mlp_widths[0]), len(spec.head_counts[0])
        self.static = StaticRouter(L, W, H)
        self.static.load_state_dict(load_tensors(folder / "static_router.safetensors", run_root))
        self.static.eval()
        self.surrogate = Surrogate(L, W, H)
        self.surrogate.load_state_dict(load_tensors(folder / "surrogate.safetensors", run_root))
        self.surrogate.eval()

    @classmethod
    def load(cls, run_root: str | Path, regime_key: str, spec, *, weights: str) -> "Routers":
        """The routers trained for `regime_key` on `weights` ("elastic" or "trained", already resolved)."""
        return cls(regime_dir(run_root, regime_key, weights=weights), spec, run_root)

    def dynamic_point(self, t: float, joint: bool = False) -> dict:
        """How the dynamic router (or the jointly fine-tuned one) serves router input t (a fraction of
        the latency table's full model): the calibrated point's `router_frac`, static `heads` and logit
        `shift`, with the Budget it stands for (`budget_ms`, `budget_frac` of `reference_full_ms`)."""
        calib = self.meta.get("joint_calibration" if joint else "dynamic_calibration")
        if not calib:
            raise FlextronError(f"{self.folder} has no calibrated dynamic router; re-run `flextron route`")
        return calibrated_point(calib, t)

    def dynamic_point_for(self, budget_ms: float, joint: bool = False) -> dict:
        """The calibrated point serving a Budget of `budget_ms` (resolved like search and verify do)."""
        return self.dynamic_point(budget_ms / self.meta["table"]["full_ms"], joint)

    def config_for(self, budget_ms: float, predict) -> SubnetConfig:
        """The static router's config for `budget_ms` (see `answer_static`)."""
        return answer_static(self.static, self.surrogate, self.spec, budget_ms, predict)
