import torch


def test_static_router_respects_budgets_and_is_deterministic(tiny_run):
    from flextron.elastic import ElasticModel
    from flextron.latency_table import LatencyTable, expected_latency
    from flextron.static_router import _moves, route_static, static_answer, train_static
    from flextron.surrogate import fit_surrogate, one_hot, sample_configs

    spec = ElasticModel.load(tiny_run / "elastic").spec
    L, W, H = spec.num_layers, len(spec.mlp_widths[0]), len(spec.head_counts[0])
    # a monotone synthetic latency table and loss
    table = LatencyTable(attn=torch.arange(1, H + 1).float().repeat(L, 1),
                         mlp=2 * torch.arange(1, W + 1).float().repeat(L, 1), fixed=1.0, source="synthetic",
                         unit="relative", regime="prefill:b1:s64:float32:eager")
    assert table.full == 1.0 + L * (H + 2 * W)
    cfgs = sample_configs(spec, 60, seed=0)
    loss = [3.0 + sum(1.0 / w for w in c.mlp_width) * 40 + sum(1.0 / h for h in c.heads) for c in cfgs]
    sur, _ = fit_surrogate(spec, cfgs, loss, seed=0)
    lo = (1.0 + L * 3) / table.full
    router, hist = train_static(spec, sur, table, lo, steps=600, latency_weight=20.0, seed=0)
    fracs = []
    for t in (0.4, 0.6, 0.8, 1.0):
        c = route_static(router, spec, t)
        assert c == route_static(router, spec, t)  # deterministic
        fracs.append(float(expected_latency(table, *one_hot(spec, [c]))[0]))
        assert fracs[-1] <= t * 1.1
    assert fracs == sorted(fracs) and fracs[-1] > fracs[0]  # more budget buys a bigger network

    # the answer users get: the raw routing without a latency model; with one, shrunk to fit the
    # budget and widened until no single wider choice would still fit
    def predict(c):
        return float(expected_latency(table, *one_hot(spec, [c]))[0]) * table.full

    for t in (0.5, 0.7):
        assert static_answer(router, sur, spec, t) == route_static(router, spec, t)
        c = static_answer(router, sur, spec, t, predict)
        budget = t * predict(spec.full())
        assert predict(c) <= budget and all(predict(w) > budget for w in _moves(c, spec, +1))


def test_fit_to_budget_shrinks_until_predicted_fits(tiny_run):
    from flextron.elastic import ElasticModel
    from flextron.static_router import fit_to_budget

    spec = ElasticModel.load(tiny_run / "elastic").spec

    def predict(c):
        return sum(c.mlp_width) / 64 + sum(c.heads)

    full = spec.full()
    out = fit_to_budget(full, spec, predict, predict(full) * 0.6)
    assert predict(out) <= predict(full) * 0.6
    spec.validate(out)
