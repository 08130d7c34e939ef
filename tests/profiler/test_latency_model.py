import json

import numpy as np
import pandas as pd
import pytest

from flextron.errors import FlextronError
from flextron.spec import ElasticSpec
from profiler.latency_model import FitConfig, LatencyModel, LatencyModels, encode, fit
from profiler.sweep import random_configs


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


def test_sklearn_contract():
    from sklearn.base import clone

    m = LatencyModel({0: {1: 1.0}}, {0: {2: 1.0}}, 0.5)
    c = clone(m)
    assert c.get_params() == m.get_params() and not hasattr(c, "coef_")


@pytest.fixture(scope="module")
def profiled(tiny_run, tmp_path_factory, profiled_copy):
    return profiled_copy(tiny_run, tmp_path_factory.mktemp("fit") / "run", "decode:b1:ctx32", 10, fit=False)


def test_fit_reports_error_only_on_unseen_configs(profiled):
    s = fit(FitConfig(run=str(profiled)))
    key = "decode:b1:ctx32:float32:eager"
    metrics = json.loads((profiled / "latency_model" / "metrics.json").read_text())[key]
    assert s[key]["heldout_mape_pct"] == metrics["heldout"]["mape_pct"] > 0
    assert metrics["heldout"]["n"] == 5 and metrics["train_configs"] == 4 * 4 + 5
    e2e = pd.read_parquet(profiled / "profile" / "e2e.parquet")
    uniform_keys = set(e2e[e2e["uniform"]]["config_key"])
    assert not uniform_keys & set(metrics["heldout_keys"])
    models = LatencyModels.load(profiled)
    assert models.resolve("decode:b1:ctx32") == key
    with pytest.raises(FlextronError, match="was not profiled.*flextron profile --regime prefill"):
        models.get("prefill:b1:s64:float32:eager")


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
