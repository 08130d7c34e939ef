def test_surrogate_learns_a_known_loss_function(tiny_run):
    from flextron.elastic import ElasticModel
    from flextron.surrogate import fit_surrogate, sample_configs

    spec = ElasticModel.load(tiny_run / "elastic").spec
    cfgs = sample_configs(spec, 60, seed=0)
    assert len(set(cfgs)) == len(cfgs) >= 60
    # a synthetic "loss" falling with width and heads, as real losses do
    loss = [3.0 + sum(1.0 / w for w in c.mlp_width) * 40 + sum(1.0 / h for h in c.heads) for c in cfgs]
    _, m = fit_surrogate(spec, cfgs, loss, seed=0)
    assert m["heldout"] >= 4 and m["heldout_mean_rel_err"] < 0.03 and m["heldout_spearman"] > 0.8
