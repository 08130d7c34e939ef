import itertools
import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest

from flextron.errors import FlextronError
from flextron.spec import ElasticSpec, SubnetConfig
from profiler.fit import FitConfig, fit
from profiler.latency_model import (
    LatencyModel,
    LatencyModels,
    encode,
    layer_table_from_profile,
    tables_from_profile,
)
from profiler.sweep import random_configs

KEY = "decode:b1:ctx32:float32:eager"


def synthetic(spec):
    rng = np.random.default_rng(0)
    attn = {l: {h: 0.01 * h + rng.uniform(0, 0.01) for h in spec.head_counts[l]} for l in range(spec.num_layers)}
    mlp = {l: {w: 0.0005 * w + rng.uniform(0, 0.01) for w in spec.mlp_widths[l]} for l in range(spec.num_layers)}
    return attn, mlp


def test_fit_recovers_a_known_latency_function():
    spec = ElasticSpec.build("llama", 6, 64, 512, 8, 4, 16, 320)
    attn, mlp = synthetic(spec)
    configs = spec.uniform_configs() + random_configs(spec, 30, 1)
    X = encode(configs)
    truth = LatencyModel(attn, mlp, 0.0)
    sums = truth._sums(X)
    y = 0.7 + 1.3 * sums[:, 0] + 0.9 * sums[:, 1]
    m = LatencyModel(attn, mlp, 0.2).fit(X, y)
    assert np.allclose(m.coef_, [1.3, 0.9], atol=1e-6) and abs(m.intercept_ - 0.7) < 1e-6
    assert np.allclose(m.predict(X), y)
    tab = m.layer_table_ms(spec)
    assert tab["mlp_ms"].shape == (6, len(spec.mlp_widths[0])) and tab["attn_ms"].shape == (6, len(spec.head_counts[0]))
    again = LatencyModel.from_dict(json.loads(json.dumps(m.to_dict())))
    assert np.allclose(again.predict(X), y)
    with pytest.raises(FlextronError, match="was not profiled"):
        m.predict(np.array([[100] * 6 + [8] * 6]))


def test_learned_per_layer_terms_capture_what_isolated_layers_miss():
    """Layer 2's attention at its fewest heads costs 0.3 ms more inside the model than alone (say, a
    slower kernel path the isolated cell does not take): no scaling of isolated times predicts that;
    terms learned from the end-to-end set halve the error on configs never seen."""
    spec = ElasticSpec.build("llama", 6, 64, 512, 8, 4, 16, 320)
    attn, mlp = synthetic(spec)
    train = spec.uniform_configs() + random_configs(spec, 30, 1)
    test = [c for c in random_configs(spec, 60, 2) if c not in train][:30]
    sums = LatencyModel(attn, mlp, 0.0)._sums

    def truth(configs):
        return 0.7 + sums(encode(configs)).sum(1) + np.array([0.3 * (c.heads[2] == 2) for c in configs])

    def heldout_mape(model):
        p = model.fit(encode(train), truth(train)).predict(encode(test))
        return float(np.mean(np.abs(p - truth(test)) / truth(test)))

    learned = heldout_mape(LatencyModel(attn, mlp, 0.0))
    prior_only = heldout_mape(LatencyModel(attn, mlp, 0.0, alphas=(None,)))
    assert learned < 0.03 and learned < prior_only / 1.8  # measured: 2.4% against 5.0%


def test_sklearn_contract():
    from sklearn.base import clone

    m = LatencyModel({0: {1: 1.0}}, {0: {2: 1.0}}, 0.5)
    c = clone(m)
    assert c.get_params() == m.get_params() and not hasattr(c, "coef_")


# A subset of scikit-learn's `check_estimator` checks, for the parts of its contract that this
# estimator's API has (X is configs encoded as [n, 2L] choices, not arbitrary floats).

@pytest.fixture(scope="module")
def noisy_fit():
    """Tables, configs and measurements where the fit has choices to make: host-bound layers, one
    interaction the isolated times miss, and 1% noise."""
    spec = ElasticSpec.build("llama", 6, 64, 512, 8, 4, 16, 320)
    attn, mlp = synthetic(spec)
    configs = spec.uniform_configs() + random_configs(spec, 30, 1)
    X = encode(configs)
    A, M = LatencyModel(attn, mlp, 0.0)._sums(X).T
    noise = np.random.default_rng(3).normal(1.0, 0.01, len(X))
    y = (0.5 + np.maximum(0.2, A) + 1.4 * M + 0.2 * np.array([c.heads[1] == 2 for c in configs])) * noise
    return spec, attn, mlp, configs, X, y


def test_fit_is_deterministic_and_a_refit_gives_the_same_model(noisy_fit):
    from sklearn.base import clone

    spec, attn, mlp, configs, X, y = noisy_fit
    m = LatencyModel(attn, mlp, 0.0)
    assert m.fit(X, y) is m
    first = m.predict(X)
    other = clone(m).fit(X, y)
    assert m.fit(X, y) is m  # the same instance fitted again
    for again in (m, other):
        assert np.array_equal(again.predict(X), first)
        assert again.cv_mape_pct_ == other.cv_mape_pct_ and (again.form_, again.alpha_) == (other.form_, other.alpha_)


def test_fit_leaves_its_data_and_hyperparameters_unchanged(noisy_fit):
    import copy

    spec, attn, mlp, configs, X, y = noisy_fit
    X_before, y_before, attn_before = X.copy(), y.copy(), copy.deepcopy(attn)
    m = LatencyModel(attn, mlp, 0.0)
    params = copy.deepcopy(m.get_params())
    m.fit(X, y)
    assert np.array_equal(X, X_before) and np.array_equal(y, y_before)
    assert m.get_params() == params and attn == attn_before


def test_predict_gives_one_output_per_config_whatever_the_batch(noisy_fit):
    spec, attn, mlp, configs, X, y = noisy_fit
    m = LatencyModel(attn, mlp, 0.0).fit(X, y)
    X_before = X.copy()
    p = m.predict(X)
    assert p.shape == (len(X),) and np.isfinite(p).all()
    assert np.array_equal(X, X_before)  # the input is not changed
    order = np.random.default_rng(0).permutation(len(X))
    assert np.allclose(m.predict(X[order]), p[order], rtol=1e-12, atol=0)  # the order of the batch does not matter
    assert np.allclose(m.predict(X[:3]), p[:3], rtol=1e-12, atol=0)  # nor its other rows
    assert np.allclose(m.predict(X.tolist()), p, rtol=1e-12, atol=0)  # lists of choices are configs too
    with pytest.raises(FlextronError, match=r"expected configs as \[n, 12\] \(widths then heads\), got shape \(1, 6\)"):
        m.predict(X[:1, :6])


def test_a_config_encoded_twice_predicts_identically(noisy_fit):
    spec, attn, mlp, configs, X, y = noisy_fit
    m = LatencyModel(attn, mlp, 0.0).fit(X, y)
    c = configs[-1]
    again = SubnetConfig.from_json(c.to_json())
    assert np.array_equal(encode([c]), encode([again]))
    twice = m.predict(encode([c, again]))
    assert twice[0] == twice[1] == m.predict_config(c) == m.predict_config(again)


def test_a_saved_model_predicts_exactly_as_the_fitted_one(noisy_fit):
    spec, attn, mlp, configs, X, y = noisy_fit
    m = LatencyModel(attn, mlp, 0.0).fit(X, y)
    loaded = LatencyModel.from_dict(json.loads(json.dumps(m.to_dict())))
    assert np.array_equal(loaded.predict(X), m.predict(X))
    assert loaded.range_ms(spec) == m.range_ms(spec)
    saved, fitted = loaded.layer_table_ms(spec), m.layer_table_ms(spec)
    assert all(np.array_equal(saved[k], fitted[k]) for k in ("attn_ms", "mlp_ms"))
    assert saved["fixed_ms"] == fitted["fixed_ms"]


def test_an_unfitted_model_says_it_is_not_fitted(noisy_fit):
    from sklearn.exceptions import NotFittedError

    spec, attn, mlp, configs, X, y = noisy_fit
    m = LatencyModel(attn, mlp, 0.0)
    for use in (lambda: m.predict(X), lambda: m.predict_config(configs[0]), lambda: m.layer_table_ms(spec),
                lambda: m.range_ms(spec), m.to_dict):
        with pytest.raises(NotFittedError, match="not fitted yet. Call 'fit'"):
            use()


@pytest.fixture(scope="module")
def profiled(tiny_run, tmp_path_factory, profiled_copy):
    return profiled_copy(tiny_run, tmp_path_factory.mktemp("fit") / "run", "decode:b1:ctx32", 10, fit=False)


def test_fit_reports_error_only_on_unseen_configs(profiled):
    s = fit(FitConfig(run=str(profiled)))
    key = "decode:b1:ctx32:float32:eager"
    metrics = json.loads((profiled / "latency_model" / "metrics.json").read_text())[key]
    assert s[key]["heldout_mape_pct"] == metrics["heldout"]["mape_pct"] > 0
    e2e = pd.read_parquet(profiled / "profile" / "e2e.parquet")
    n_hetero = int((~e2e["uniform"]).sum())  # 10 random width configs and 4 that skip layers
    assert n_hetero == 14 and int((e2e["skipped_layers"] > 0).sum()) == 4
    assert metrics["heldout"]["n"] == 7 and metrics["train_configs"] == 4 * 4 + 7
    assert metrics["depth"] and metrics["heldout_depth_configs"] >= 1
    uniform_keys = set(e2e[e2e["uniform"]]["config_key"])
    assert not uniform_keys & set(metrics["heldout_keys"])
    models = LatencyModels.load(profiled)
    assert models.resolve("decode:b1:ctx32") == key
    with pytest.raises(FlextronError, match="was not profiled.*flextron profile --regime prefill"):
        models.get("prefill:b1:s64:float32:eager")


def test_a_model_fitted_on_another_profile_is_refused_until_refitted(profiled, tmp_path):
    """The latency model records the content id of the profile it was fitted on: after a re-profile
    (any change to the profile's tables) every stage that loads it is refused, naming `flextron fit`."""
    import shutil

    run = tmp_path / "reprofiled"
    shutil.copytree(profiled, run)
    fit(FitConfig(run=str(run)))
    before = LatencyModels.load(run)
    assert before.profile_id and set(before.model_ids) == set(before.models)
    e2e = pd.read_parquet(run / "profile" / "e2e.parquet")
    e2e["latency_ms_median"] *= 1.5  # what a re-profile on a slower machine would give
    e2e.to_parquet(run / "profile" / "e2e.parquet")
    with pytest.raises(FlextronError, match="fitted on another profile.*flextron fit --run"):
        LatencyModels.load(run)
    fit(FitConfig(run=str(run)))
    after = LatencyModels.load(run)
    assert after.profile_id != before.profile_id
    fit(FitConfig(run=str(run)))  # a re-fit on the same profile is the same model: the same ids
    assert LatencyModels.load(run).model_ids == after.model_ids


def test_mixed_devices_are_refused(profiled, tmp_path):
    import shutil

    run = tmp_path / "mixed"
    shutil.copytree(profiled, run)
    e2e = pd.read_parquet(run / "profile" / "e2e.parquet")
    e2e.loc[0, "device_name"] = "NVIDIA H100 80GB HBM3"
    e2e.to_parquet(run / "profile" / "e2e.parquet")
    with pytest.raises(FlextronError, match="mixes devices"):
        fit(FitConfig(run=str(run)))
    with pytest.raises(FlextronError, match="run `flextron profile"):
        fit(FitConfig(run=str(tmp_path / "nothing")))


def test_range_is_exact_when_the_narrowest_choice_is_not_the_fastest():
    """A noisy profile timed the narrowest MLP width slowest: the least latency is not the smallest config's."""
    spec = ElasticSpec.build("llama", 2, 64, 256, 8, 4, 16, 320, mlp_choices=3, head_choices=3)
    mlp = {0: {64: 2.5, 192: 0.9, 256: 1.2}, 1: {64: 0.4, 192: 0.7, 256: 3.0}}
    attn = {0: {2: 0.8, 6: 0.3, 8: 0.6}, 1: {2: 0.2, 6: 0.5, 8: 0.9}}
    m = LatencyModel(attn, mlp, 0.0)
    m = LatencyModel.from_dict({"attn_table": attn, "mlp_table": mlp, "fixed_ms": 0.0, "coef_": [1.5, 0.8],
                                "intercept_": 0.25})  # a scaled model with these coefficients
    every = [SubnetConfig(w, h) for w in itertools.product(*spec.mlp_widths)
             for h in itertools.product(*spec.head_counts)]
    predicted = m.predict(encode(every))
    lo, hi = m.range_ms(spec)
    assert lo == pytest.approx(predicted.min(), abs=1e-12) and hi == pytest.approx(predicted.max(), abs=1e-12)
    # pinned: 0.25 + 1.5 * (0.3 + 0.2) + 0.8 * (0.9 + 0.4), and the smallest config is well above it
    assert lo == pytest.approx(2.04) and m.predict_config(spec.smallest()) > lo + 1
    assert hi == pytest.approx(0.25 + 1.5 * (0.8 + 0.9) + 0.8 * (2.5 + 3.0))
    del m.mlp_table[1][192]
    with pytest.raises(FlextronError, match="layer 1: width 192 .* was not profiled"):
        m.range_ms(spec)


def copy_run(src, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(src, run)
    return run


def rewrite_profile(run, latency_ms, cv=0.01):
    """Pin the profile to known numbers: layer cells cost 0.01 ms per head and 0.001 ms per MLP
    column; the end-to-end medians become `latency_ms(configs, layers)`, their sample CV `cv`."""
    path = run / "profile" / "layers.parquet"
    layers = pd.read_parquet(path)
    per_unit = layers["kind"].map({"attn": 0.01, "mlp": 0.001, "embed": 0.0, "head": 0.0, "layer": 0.0,
                                   "bridge": 0.0})
    layers["latency_ms_median"] = layers["latency_ms_corrected"] = 0.05 + per_unit * layers["width"]
    # a whole layer: its attention and MLP at full size (0.05 + 0.01 heads, 0.05 + 0.001 width) and 0.04 ms more
    full = layers[layers["kind"].isin(["attn", "mlp"])].groupby(["layer", "kind"])["latency_ms_median"].max()
    whole = layers["kind"] == "layer"
    layers.loc[whole, ["latency_ms_median", "latency_ms_corrected"]] = [
        [full[(l, "attn")] + full[(l, "mlp")] + 0.04] * 2 for l in layers.loc[whole, "layer"]]
    layers.to_parquet(path)
    path = run / "profile" / "e2e.parquet"
    e2e = pd.read_parquet(path)
    configs = [SubnetConfig.from_json(c) for c in e2e["config"]]
    e2e["latency_ms_median"] = latency_ms(configs, layers)
    widest = max(configs, key=lambda c: (not c.skip, sum(c.mlp_width) + sum(c.heads)))
    full = e2e["latency_ms_median"][[c == widest for c in configs]]
    e2e["ratio_to_full"] = e2e["latency_ms_median"] / float(full.iloc[0])
    e2e["cv"] = cv
    e2e.to_parquet(path)
    noise = json.loads((run / "profile" / "noise.json").read_text())
    noise[KEY] = {**noise[KEY], "noise_floor_pct": 100 * cv, "ratio_noise_floor_pct": 100 * cv}
    (run / "profile" / "noise.json").write_text(json.dumps(noise))


def layer_sums(configs, layers):
    """Isolated attention + MLP times of each config's running layers, each layer's 0.04 ms beyond them included."""
    attn, mlp, fixed = tables_from_profile(layers, KEY)
    return LatencyModel(attn, mlp, fixed, layer_table=layer_table_from_profile(layers, KEY))._sums(
        encode(configs)).sum(1)


def host_bound(configs, layers):
    """Every attention call (with its layer's 0.04 ms beyond both modules) costs at least 0.16 ms of host time
    and every MLP call 0.35 ms, whatever its width; a skipped layer costs nothing."""
    attn, mlp, fixed = tables_from_profile(layers, KEY)
    return np.array([0.3 + sum(max(0.16, attn[l][c.heads[l]] + 0.04) + max(0.35, 1.5 * mlp[l][c.mlp_width[l]])
                               for l in c.active_layers) for c in configs])


def reversed_on_heldout(run, tmp_path):
    """A profile the model explains on its training configs but whose held-out configs run in the
    reverse order of its predictions (interactions between layers it cannot see)."""
    rewrite_profile(run, lambda configs, layers: 0.3 + layer_sums(configs, layers))
    fit(FitConfig(run=str(run)))
    pred = pd.read_parquet(run / "latency_model" / "predictions.parquet").set_index("config_key")
    held = pred[pred["heldout"]]["predicted_ms"]
    flipped = (2 * held.mean() - held).to_dict()

    def truth(configs, layers):
        base = 0.3 + layer_sums(configs, layers)
        return np.array([flipped.get(c.key, b) for c, b in zip(configs, base)])

    return truth


def test_fit_warns_when_it_cannot_rank_or_is_far_above_the_noise(profiled, tmp_path, capsys):
    run = copy_run(profiled, tmp_path)
    rewrite_profile(run, reversed_on_heldout(run, tmp_path))
    capsys.readouterr()
    s = fit(FitConfig(run=str(run)))
    metrics = json.loads((run / "latency_model" / "metrics.json").read_text())[KEY]
    assert s[KEY]["ratio_noise_floor_pct"] == metrics["ratio_noise_floor_pct"] == 1.0
    assert metrics["target"] == "ratio_to_full"
    assert s[KEY]["spearman"] == -1.0 and s[KEY]["heldout_mape_pct"] > 5
    assert "above the noise floor" in s[KEY]["verdict"]
    assert len(s["warnings"]) == 2 and s["warnings"] == metrics["warnings"]
    assert "cannot rank" in s["warnings"][0]
    assert "far above the measurement noise (ratio_noise_floor_pct 1.0%" in s["warnings"][1]
    err = capsys.readouterr().err
    assert err.count("flextron fit: WARNING: " + KEY) == 2


def test_an_error_within_the_noise_is_not_warned_about(profiled, tmp_path):
    """The same held-out error, measured on a machine whose noise floor is as large: only the ranking
    is warned about, and the verdict says the machine is the limit."""
    run = copy_run(profiled, tmp_path)
    truth = reversed_on_heldout(run, tmp_path)
    rewrite_profile(run, truth)
    mape = fit(FitConfig(run=str(run)))[KEY]["heldout_mape_pct"]
    rewrite_profile(run, truth, cv=mape / 100)
    s = fit(FitConfig(run=str(run)))
    assert s[KEY]["heldout_mape_pct"] == mape and "the machine is the limit" in s[KEY]["verdict"]
    assert len(s["warnings"]) == 1 and "cannot rank" in s["warnings"][0]


def test_fit_does_not_warn_about_a_model_that_explains_the_measurements(profiled, tmp_path):
    run = copy_run(profiled, tmp_path)

    rewrite_profile(run, lambda configs, layers: 0.3 + layer_sums(configs, layers))
    s = fit(FitConfig(run=str(run)))
    assert s["warnings"] == [] and s[KEY]["heldout_mape_pct"] < 0.01 and s[KEY]["spearman"] > 0.99
    assert "at the noise floor" in s[KEY]["verdict"]


def test_fit_recovers_a_host_bound_latency_function(profiled, tmp_path):
    """Eager steps bound by per-call host time: the fit finds the max(host, device) form and predicts
    held-out configs it never saw; summing device times cannot."""
    run = copy_run(profiled, tmp_path)
    rewrite_profile(run, host_bound)
    s = fit(FitConfig(run=str(run)))
    metrics = json.loads((run / "latency_model" / "metrics.json").read_text())[KEY]
    assert metrics["form"] == "host_bound" and s[KEY]["heldout_mape_pct"] < 0.5
    cv = metrics["cv_mape_pct"]  # the forms compared on the training configs alone
    assert cv["host_bound/None"] < cv["scaled/None"] / 5
    assert metrics["naive_sum_heldout"]["mape_pct"] > 5 * s[KEY]["heldout_mape_pct"]
    assert not set(metrics["heldout_keys"]) & {k for k, h in zip(*_train_keys(run)) if not h}


def _train_keys(run):
    p = pd.read_parquet(run / "latency_model" / "predictions.parquet")
    return list(p["config_key"]), list(p["heldout"])


def test_fit_refuses_failed_cells_unless_allowed(profiled, tmp_path):
    run = copy_run(profiled, tmp_path)
    path = run / "profile" / "e2e.parquet"
    e2e = pd.read_parquet(path)
    e2e.loc[e2e.index[-1], ["status", "latency_ms_median"]] = ["error: RuntimeError: graph capture failed", math.nan]
    e2e.to_parquet(path)
    with pytest.raises(FlextronError, match=rf"regime {KEY}: 1 of \d+ profiled cells failed \(0 oom, 1 error; "
                                            r"e\.g\. 'error: RuntimeError: graph capture failed'\).*--allow-errors"):
        fit(FitConfig(run=str(run)))
    s = fit(FitConfig(run=str(run), allow_errors=True))
    assert s[KEY]["cells_by_status"]["error"] == 1 and "--allow-errors" in s["warnings"][0]


@pytest.mark.parametrize("name, rebuild", [("profile/layers.parquet", "flextron profile --run"),
                                           ("profile/e2e.parquet", "flextron profile --run"),
                                           ("profile/device.json", "flextron profile --run")])
def test_fit_names_a_corrupt_profile_file(profiled, tmp_path, name, rebuild):
    run = copy_run(profiled, tmp_path)
    data = (run / name).read_bytes()
    (run / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(FlextronError, match=rf"{name.split('/')[1]} is corrupt.*{rebuild}"):
        fit(FitConfig(run=str(run)))


@pytest.mark.parametrize("text", ["{\"device_name\": \"cpu\", \"regi", "{\"device_name\": \"cpu\"}",
                                  "{\"device_name\": \"cpu\", \"regimes\": {\"r\": {\"coef_\": [1]}}}"])
def test_loading_a_corrupt_latency_model_names_it(profiled, tmp_path, text):
    run = copy_run(profiled, tmp_path)
    fit(FitConfig(run=str(run)))
    (run / "latency_model" / "latency_model.json").write_text(text)
    with pytest.raises(FlextronError, match=r"latency_model.json is corrupt.*flextron fit --run"):
        LatencyModels.load(run)


@pytest.mark.parametrize("bad, flag", [({"holdout_frac": 0.0}, "--holdout-frac"),
                                       ({"holdout_frac": 1.0}, "--holdout-frac"),
                                       ({"holdout_frac": math.nan}, "--holdout-frac"), ({"seed": -1}, "--seed"),
                                       ({"seed": 1.5}, "--seed")])
def test_fit_flags_are_validated(bad, flag):
    with pytest.raises(FlextronError, match=flag):
        FitConfig(run="r", **bad)


def test_skipping_a_layer_is_a_choice_the_model_predicts_and_ranges_over_exactly():
    """Depth: a skipped layer costs nothing of its attention, MLP and the layer's own overhead (whole
    layer minus both modules); the fit recovers a known function of configs that skip layers, and the
    feasible range is exact over every config in which at least one layer runs (brute force)."""
    import itertools

    from profiler.sweep import depth_configs

    spec = ElasticSpec.build("llama", 3, 64, 512, 8, 4, 16, 320, mlp_choices=2, head_choices=2)
    attn, mlp = synthetic(spec)
    whole = {l: attn[l][8] + mlp[l][512] + 0.05 * (l + 1) for l in range(3)}
    truth = LatencyModel(attn, mlp, 0.0, layer_table=whole)
    configs = spec.uniform_configs() + random_configs(spec, 6, 1) + depth_configs(spec, 8, 0)
    assert sum(bool(c.skip) for c in configs) == 8
    sums = truth._sums(encode(configs))
    y = 0.7 + 1.3 * sums[:, 0] + 0.9 * sums[:, 1]
    m = LatencyModel(attn, mlp, 0.0, layer_table=whole, alphas=(None,)).fit(encode(configs), y)
    assert np.allclose(m.coef_, [1.3, 0.9], atol=1e-6) and np.allclose(m.predict(encode(configs)), y)
    # layer 1 skipped saves 1.3 x (its attention + its 0.1 ms overhead) + 0.9 x its MLP
    full, no1 = spec.full(), spec.depth([1])
    saved = m.predict_config(full) - m.predict_config(no1)
    assert abs(saved - (1.3 * (attn[1][8] + 0.1) + 0.9 * mlp[1][512])) < 1e-9
    everything = [SubnetConfig(w, h, [l for l in range(3) if s[l]])
                  for w in itertools.product(*spec.mlp_widths) for h in itertools.product(*spec.head_counts)
                  for s in itertools.product((0, 1), repeat=3) if not all(s)]
    preds = m.predict(encode(everything))
    lo, hi = m.range_ms(spec)
    assert abs(lo - preds.min()) < 1e-9 and abs(hi - preds.max()) < 1e-9
    again = LatencyModel.from_dict(json.loads(json.dumps(m.to_dict())))
    assert again.depth and np.allclose(again.predict(encode(configs)), y)
    # a model fitted on a profile without whole-layer cells refuses depth and names the rebuild
    old = LatencyModel(attn, mlp, 0.0, alphas=(None,)).fit(encode(configs[:10]), y[:10])
    with pytest.raises(FlextronError, match="flextron profile --restart"):
        old.predict_config(no1)


def test_a_skipped_layer_with_a_bridge_costs_its_bridge():
    """With the profile's bridge cells, skipping a layer saves the layer but costs its bridge, as timed
    alone and unscaled by the form's coefficients; the learned terms fit what is left; a layer without a
    bridge still costs nothing skipped; the bridge table survives the JSON round trip."""
    from profiler.sweep import depth_configs

    spec = ElasticSpec.build("llama", 3, 64, 512, 8, 4, 16, 320, mlp_choices=2, head_choices=2)
    attn, mlp = synthetic(spec)
    whole = {l: attn[l][8] + mlp[l][512] + 0.05 for l in range(3)}
    bridge = {0: 0.2, 1: 0.2}  # layer 2 has none
    configs = spec.uniform_configs() + random_configs(spec, 6, 1) + depth_configs(spec, 8, 0)
    truth = LatencyModel(attn, mlp, 0.0, layer_table=whole, bridge_table=bridge)
    sums = truth._sums(encode(configs))
    skipped = np.array([[l in c.skip for l in range(3)] for c in configs], float)
    y = 0.7 + 1.3 * sums[:, 0] + 0.9 * sums[:, 1] + skipped @ np.array([0.2, 0.2, 0.0])
    m = LatencyModel(attn, mlp, 0.0, layer_table=whole, bridge_table=bridge, alphas=(None,)).fit(encode(configs), y)
    assert np.allclose(m.coef_, [1.3, 0.9], atol=1e-6) and np.allclose(m.predict(encode(configs)), y)
    full = m.predict_config(spec.full())
    assert abs(full - m.predict_config(spec.depth([1])) - (1.3 * (attn[1][8] + 0.05) + 0.9 * mlp[1][512] - 0.2)) < 1e-9
    assert abs(full - m.predict_config(spec.depth([2])) - (1.3 * (attn[2][8] + 0.05) + 0.9 * mlp[2][512])) < 1e-9
    assert abs(m.layer_table_ms(spec)["skip_ms"][0].item() - 0.2) < 1e-6
    again = LatencyModel.from_dict(json.loads(json.dumps(m.to_dict())))
    assert again.bridge_table == bridge and np.allclose(again.predict(encode(configs)), y)
    # without the bridge cells, the same data leaves the fit off by the bridges
    blind = LatencyModel(attn, mlp, 0.0, layer_table=whole, alphas=(None,)).fit(encode(configs), y)
    assert np.abs(blind.predict(encode(configs)) - y).max() > 0.05


def test_layers_of_one_shape_share_one_cost_per_choice(profiled, tmp_path):
    """Isolated cells of identical layers differ by noise only; the fitted tables give every layer of one
    shape the median of their cells, so a search cannot buy latency from a layer whose cell read cheap."""
    import shutil

    from profiler.fit import pool_layers

    assert pool_layers({0: {1: 1.0, 2: 2.0}, 1: {1: 3.0, 2: 2.2}, 2: {1: 2.0, 2: 9.0}, 3: {5: 1.0}},
                       [[0, 1, 2]]) == {0: {1: 2.0, 2: 2.2}, 1: {1: 2.0, 2: 2.2}, 2: {1: 2.0, 2: 2.2}, 3: {5: 1.0}}
    assert pool_layers({0: 1.0, 1: 5.0, 2: 2.0}, [[0, 1, 2]]) == {0: 2.0, 1: 2.0, 2: 2.0}
    run = tmp_path / "pooled"
    shutil.copytree(profiled, run)
    layers = pd.read_parquet(run / "profile" / "layers.parquet")
    noisy = (layers["layer"] == 1) & (layers["kind"] == "mlp")
    layers.loc[noisy, ["latency_ms_median", "latency_ms_corrected"]] *= 0.5  # layer 1's MLP cells read cheap
    layers.to_parquet(run / "profile" / "layers.parquet")
    fit(FitConfig(run=str(run)))
    models = LatencyModels.load(run)
    m = models.get(models.resolve(None))
    # the isolated terms the model starts from (its learned end-to-end corrections depend on the fit)
    for name, table in (("mlp", m.mlp_table), ("attn", m.attn_table)):
        rows = [table[l] for l in sorted(table)]
        assert all(r == rows[0] for r in rows), name  # every layer the same costs
    assert len(set(m.layer_table.values())) == 1


def test_identical_layers_share_their_learned_terms():
    """Layers with identical isolated tables (one shape, pooled) get one learned term per choice: noise
    in the end-to-end set cannot make one of them read cheaper than its twins (a knapsack would buy that
    phantom latency), and an effect they all show (fewest heads +0.05 ms inside the model) is learned
    from every layer at once. A layer of another shape keeps its own terms."""
    spec = ElasticSpec.build("llama", 6, 64, 512, 8, 4, 16, 320)
    attn, mlp = synthetic(spec)
    for l in range(1, 5):  # layers 0-4 one shape, layer 5 another
        attn[l], mlp[l] = dict(attn[0]), dict(mlp[0])
    configs = spec.uniform_configs() + random_configs(spec, 40, 3)
    X = encode(configs)
    sums = LatencyModel(attn, mlp, 0.0)._sums(X)
    fewest = (X[:, 6:] == min(spec.head_counts[0])).sum(1)
    rng = np.random.default_rng(0)
    y = (0.5 + sums.sum(1) + 0.05 * fewest) * (1 + 0.02 * rng.standard_normal(len(X)))
    m = LatencyModel(attn, mlp, 0.0, forms=("scaled",), alphas=(0.1,)).fit(X, y)
    assert np.allclose(m.delta_attn_[:5], m.delta_attn_[0]) and np.allclose(m.delta_mlp_[:5], m.delta_mlp_[0])
    assert not np.allclose(m.delta_attn_[5], m.delta_attn_[0])
    Ae, _ = m._effective()  # fewest heads against all heads, inside the model: isolated difference + 0.05
    truth = attn[0][min(attn[0])] - attn[0][max(attn[0])] + 0.05
    assert abs((Ae[0, 0] - Ae[0, -1]) - truth) < 0.01, (Ae[0, 0] - Ae[0, -1], truth)
