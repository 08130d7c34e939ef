import numpy as np
import pytest
import torch

from flextron.elastic import ElasticModel
from flextron.errors import FlextronError
from flextron.evaluate import mean_loss, parse_config
from flextron.quality_model import QualityModel, QualityTable, measure_table
from flextron.spec import ElasticSpec, SubnetConfig


def test_the_table_holds_each_single_layer_change_as_the_whole_model_scores_it(tiny_run):
    """Each entry (computed from captured layer inputs, running only layers l..L-1) equals the loss of
    the whole model under that config minus the full model's, as `mean_loss` computes them."""
    elastic = ElasticModel.load(tiny_run / "elastic").to(dtype=torch.float64)
    spec = elastic.spec
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    table = measure_table(elastic, ids, mlp_table="all")
    base = mean_loss(elastic, spec.full(), ids)
    assert abs(table.base_loss - base) < 2e-6
    full = spec.full()
    for l in range(spec.num_layers):
        assert abs(table.skip[l] - (mean_loss(elastic, spec.depth([l]), ids) - base)) < 2e-6
        for i, w in enumerate(spec.mlp_widths[l]):
            cfg = SubnetConfig(tuple(w if j == l else x for j, x in enumerate(full.mlp_width)), full.heads)
            assert abs(table.mlp[l][i] - (mean_loss(elastic, cfg, ids) - base)) < 2e-6
        for i, h in enumerate(spec.head_counts[l]):
            cfg = SubnetConfig(full.mlp_width, tuple(h if j == l else x for j, x in enumerate(full.heads)))
            assert abs(table.heads[l][i] - (mean_loss(elastic, cfg, ids) - base)) < 2e-6
    assert table.mlp[0][-1] == 0.0 and table.heads[0][-1] == 0.0
    assert elastic.config == spec.full()  # the model is left as it was found


def test_the_alternate_table_measures_fewer_mlp_widths_and_fills_the_others_between_its_neighbours(tmp_path):
    """An alternate table measures the two narrowest MLP widths, every other one above and the widest narrower
    one (the same values as the full table's); each other width lies between its measured neighbours:
    log-linearly where both are positive, else linearly; fewer layer runs than the full table."""
    import math

    import flextron.quality_model as qm
    from flextron.convert import ConvertConfig, convert

    convert(ConvertConfig(model="tiny-llama", out=str(tmp_path / "r"), calib_windows=2, calib_seq_len=32,
                          alignment=32, mlp_choices=8))  # 8 widths, as SmolLM2: 2 of 7 narrower ones filled in
    elastic = ElasticModel.load(tmp_path / "r" / "elastic").to(dtype=torch.float64)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    calls = {"n": 0}
    real = qm._Suffix.loss

    def counted(self, *a, **kw):
        calls["n"] += 1
        return real(self, *a, **kw)

    qm._Suffix.loss = counted
    try:
        every = measure_table(elastic, ids)  # every width unless asked otherwise (the stage asks alternate)
        n_all, calls["n"] = calls["n"], 0
        alt = measure_table(elastic, ids, mlp_table="alternate")
    finally:
        qm._Suffix.loss = real
    n = len(elastic.spec.mlp_widths[0])
    assert qm.measured_mlp(n, "alternate") == [i for i in range(n - 1) if i < 2 or i % 2 == 1 or i == n - 2]
    assert qm.measured_mlp(8, "alternate") == [0, 1, 3, 5, 6]  # SmolLM2's 192..1344 of 1536: 576 and 960 filled
    assert calls["n"] == n_all - elastic.spec.num_layers * (n - 1 - len(qm.measured_mlp(n, "alternate")))
    assert calls["n"] < n_all
    for m_all, m_alt in zip(every.mlp, alt.mlp):
        for i in range(n):
            if i in qm.measured_mlp(n, "alternate") or i == n - 1:
                assert m_alt[i] == pytest.approx(m_all[i], abs=1e-9)
            else:
                a, b = m_alt[i - 1], m_alt[i + 1]
                want = math.sqrt(a * b) if a > 0 and b > 0 else (a + b) / 2
                assert m_alt[i] == pytest.approx(want)
    assert qm.fill_mlp([4.0, 9.9, 1.0, 7.7, 0.0], [0, 2]) == pytest.approx([4.0, 2.0, 1.0, 0.5, 0.0])
    with pytest.raises(FlextronError, match="unknown MLP table 'some'"):
        qm.measured_mlp(8, "some")


def _known_table(spec, rng):
    mlp = tuple(tuple(sorted(rng.uniform(0, 0.3, len(ws)), reverse=True)[:-1]) + (0.0,) for ws in spec.mlp_widths)
    heads = tuple(tuple(sorted(rng.uniform(0, 0.2, len(hs)), reverse=True)[:-1]) + (0.0,) for hs in spec.head_counts)
    return QualityTable(2.0, mlp, heads, tuple(rng.uniform(0.05, 1.0, spec.num_layers)))


def test_the_model_recovers_a_known_function_and_is_scored_only_on_unseen_configs():
    """Losses that are 2 + 1.5 x MLP deltas + 0.8 x head deltas + 2 x skip deltas + 0.02 per narrowed
    MLP + 0.01 per reduced head count + 0.1 per skipped layer: the scaled_counts form recovers all six
    from 14 configs and predicts 28 others; a truth without counts gets no counts; the additive form
    is chosen when the truth is additive."""
    import random

    spec = ElasticSpec.build("llama", 6, 64, 512, 8, 4, 16, 320)
    table = _known_table(spec, np.random.default_rng(0))
    rng = random.Random(0)
    cfgs = [spec.depth(rng.sample(range(6), rng.randint(0, 3)), spec.random_config(rng)) for _ in range(42)]
    S = table.sums(spec, cfgs)
    truth = np.array([1.5, 0.8, 2.0, 0.02, 0.01, 0.1])
    y = 2.0 + S @ truth
    m = QualityModel(table, spec).fit(cfgs[:14], y[:14])
    assert m.form_ == "scaled_counts" and np.allclose(m.scales_, truth, atol=1e-6)
    assert np.allclose(m.predict(cfgs[14:]), y[14:])
    scaled = QualityModel(table, spec).fit(cfgs[:14], 2.0 + S[:14, :3] @ truth[:3])
    assert np.allclose(scaled.scales_, [*truth[:3], 0, 0, 0], atol=1e-6)
    additive = QualityModel(table, spec).fit(cfgs[:14], 2.0 + S[:14, :3].sum(1))
    assert np.allclose(additive.predict(cfgs), 2.0 + S[:, :3].sum(1))
    # the per-layer tables reproduce the prediction: base + sum of each config's entries
    d_mlp, d_heads, d_skip = m.layer_tables()
    for c in cfgs[20:26]:
        by_hand = table.base_loss + sum(
            d_skip[l] if l in c.skip else d_mlp[l][spec.mlp_widths[l].index(c.mlp_width[l])]
            + d_heads[l][spec.head_counts[l].index(c.heads[l])] for l in range(6))
        assert abs(by_hand - m.predict_config(c)) < 1e-9
    again = QualityModel.from_dict(m.to_dict(), QualityTable.from_dict(table.to_dict()), spec)
    assert np.allclose(again.predict(cfgs), m.predict(cfgs))
    assert table.layer_ranking() == sorted(range(6), key=lambda l: table.skip[l])


def test_depth_forms_and_bad_depth_input_are_refused_clearly():
    spec = ElasticSpec.build("llama", 4, 64, 512, 8, 4, 16, 320)
    assert parse_config(spec, "skip:1,3").skip == (1, 3)
    assert parse_config(spec, "depth:2", [3, 0, 2, 1]).skip == (0, 3)
    with pytest.raises(FlextronError, match="quality table"):
        parse_config(spec, "depth:2")
    with pytest.raises(FlextronError, match="write depth:K"):
        parse_config(spec, "depth:two")
    with pytest.raises(FlextronError, match="skip between 0 and 3"):
        parse_config(spec, "depth:4", [0, 1, 2, 3])
    with pytest.raises(FlextronError, match="layer 7, which does not exist"):
        parse_config(spec, "skip:7")
    with pytest.raises(FlextronError, match="skips all 4 layers"):
        parse_config(spec, "skip:0,1,2,3")
    with pytest.raises(FlextronError, match="write skip:LAYER"):
        parse_config(spec, "skip:a,b")
    with pytest.raises(FlextronError, match="names a layer twice"):
        SubnetConfig((512,) * 4, (8,) * 4, (1, 1))
    with pytest.raises(FlextronError, match="unknown field"):
        SubnetConfig.from_dict({"mlp_width": [512] * 4, "heads": [8] * 4, "skipped": [1]})
    assert SubnetConfig.from_json(parse_config(spec, "skip:2").to_json()).skip == (2,)
    assert "skip" not in spec.full().to_dict()  # configs without depth keep the JSON they always had


def test_the_depth_path_skips_the_cheapest_layer_on_top_of_the_ones_before(tmp_path, monkeypatch):
    """On a 6-layer model (fp64): each step's recorded loss is the whole model's with the path so far
    skipped, and it is the least among that step's candidates (the neighbours of the skipped layers and
    the cheapest single skips left); `layer_ranking` follows the path; a saved table keeps it."""
    from flextron.convert import ConvertConfig, convert
    from flextron.models import TINY
    from flextron.quality_model import path_candidates

    assert path_candidates([4, 5], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], 8) == [0, 1, 2, 3, 6]
    assert path_candidates([0, 1, 2], [0.0] * 4, 4) == []  # never the last layer standing
    monkeypatch.setitem(TINY, "tiny-llama", ("LlamaConfig", {"num_hidden_layers": 6}))
    convert(ConvertConfig(model="tiny-llama", out=str(tmp_path / "r"), calib_windows=2, calib_seq_len=32))
    elastic = ElasticModel.load(tmp_path / "r" / "elastic").to(dtype=torch.float64)
    spec = elastic.spec
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    table = measure_table(elastic, ids, path_steps=4)
    base = mean_loss(elastic, spec.full(), ids)
    assert len(table.path) == len(table.path_loss) == 4 and table.path_seconds > 0
    for k, layer in enumerate(table.path):
        before = list(table.path[:k])
        cands = path_candidates(before, list(table.skip), spec.num_layers)
        losses = {c: mean_loss(elastic, spec.depth(before + [c]), ids) - base for c in cands}
        assert layer == min(losses, key=losses.get)
        assert abs(table.path_loss[k] - losses[layer]) < 2e-6
    assert table.layer_ranking()[:4] == list(table.path)
    assert sorted(table.layer_ranking()) == list(range(6))
    again = QualityTable.from_dict(table.to_dict())
    assert again.path == table.path and again.path_loss == table.path_loss
    assert measure_table(elastic, ids).path == ()  # no steps asked, none walked
    from search.quality_fit import QualityConfig

    with pytest.raises(FlextronError, match="--depth-path must be >= -1, got -2"):
        QualityConfig(run=str(tmp_path / "r"), depth_path=-2)


def test_a_table_kept_from_before_the_depth_path_gets_one_without_being_measured_again(tiny_run, tmp_path):
    import json
    import shutil

    from search.quality_fit import QualityConfig, quality

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    small = dict(run=str(run), calib_windows=1, calib_seq_len=16, eval_windows=1, eval_seq_len=16, fit_configs=4,
                 heldout_configs=3, device="cpu")
    first = quality(QualityConfig(**small, depth_path=0))  # as a table measured before the path
    assert first["depth_path"]["layers"] == [] and not first["table_reused"]
    again = quality(QualityConfig(**small))  # the default: half of the (3) layers
    assert again["table_reused"] and len(again["depth_path"]["layers"]) == 1
    table = json.loads((run / "quality" / "elastic" / "quality_table.json").read_text())
    assert table["path"] == again["depth_path"]["layers"] and table["seconds"] == first["table_seconds"]
    assert quality(QualityConfig(**small, depth_path=0))["depth_path"]["layers"] == []  # 0: none, as it says


def test_the_held_out_spearmans_interval_is_the_bootstrap_over_the_held_out_configs():
    """The interval is the 5th-95th percentile of Spearman over resamples of the held-out configs, the same as
    scipy's Spearman on each resample; a model that ranks every config right has [1, 1]."""
    from scipy.stats import spearmanr

    from search.quality_fit import spearman_interval

    rng = np.random.default_rng(1)
    y = rng.normal(size=30)
    p = y + rng.normal(scale=0.8, size=30)
    lo, hi = spearman_interval(y, p, seed=3, n=400)
    idx = np.random.default_rng(3).integers(0, 30, size=(400, 30))
    rho = [spearmanr(y[i], p[i]).statistic for i in idx]
    assert (lo, hi) == tuple(round(float(v), 4) for v in np.quantile(rho, [0.05, 0.95]))
    assert lo < spearmanr(y, p).statistic < hi and hi - lo > 0.1
    assert spearman_interval(y, 2 * y + 1) == [1.0, 1.0]
    assert spearman_interval([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == [None, None]  # no ranking to correlate


def test_the_default_depth_path_walks_half_of_the_layers():
    """SmolLM2's budgets of 0.5-0.7x need 11-15 of its 30 layers skipped: the default path covers them."""
    from search.quality_fit import path_steps

    assert path_steps(-1, 30) == 15 and path_steps(-1, 3) == 1 and path_steps(4, 30) == 4 and path_steps(0, 30) == 0


def test_bfloat16_quality_is_its_own_setting_close_to_float32_and_kept_on_resume(tiny_run, tmp_path):
    """An evaluation's precision is part of its setting: bfloat16 losses (close to float32's) never answer a
    float32 evaluation from the cache; the quality stage keys its table by it, saves it, and `auto` keeps it."""
    import json
    import shutil

    from flextron.elastic import ElasticModel
    from search.quality import QualityEvaluator, quality_setting
    from search.quality_fit import QualityConfig, quality

    assert quality_setting("validation", "wiki", 4, 32) == quality_setting("validation", "wiki", 4, 32, dtype="float32")
    assert quality_setting("validation", "wiki", 4, 32, dtype="bfloat16").endswith(":4x32:bfloat16")
    cache = tmp_path / "cache.jsonl"
    evs = {dt: QualityEvaluator(ElasticModel.load(tiny_run / "elastic", dtype=dt), cache, 2, 32)
           for dt in ("bfloat16", "float32")}
    cfg = evs["float32"].elastic.spec.smallest()
    low, full = evs["bfloat16"].loss(cfg), evs["float32"].loss(cfg)
    assert evs["float32"].evaluations == 1  # not answered by the bfloat16 line already in the cache
    assert evs["bfloat16"].setting.endswith(":bfloat16") and low != full and abs(low - full) < 0.05 * full

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    small = dict(run=str(run), calib_windows=1, calib_seq_len=16, eval_windows=1, eval_seq_len=16, fit_configs=4,
                 heldout_configs=3, device="cpu", depth_path=0)
    first = quality(QualityConfig(**small, eval_dtype="bfloat16"))
    folder = run / "quality" / "elastic"
    assert json.loads((folder / "quality_table.json").read_text())["key"]["dtype"] == "bfloat16"
    assert json.loads((folder / "quality_config.json").read_text())["eval_dtype"] == "bfloat16"
    assert json.loads((folder / "quality_model.json").read_text())["metrics"]["quality_setting"].endswith(":bfloat16")
    again = quality(QualityConfig(**small))  # auto (float32 on this test's device): the kept results' bfloat16
    assert again["table_reused"] and again["table_seconds"] == first["table_seconds"]
    assert json.loads((folder / "quality_config.json").read_text())["eval_dtype"] == "bfloat16"
    third = quality(QualityConfig(**small, eval_dtype="float32"))  # asked otherwise: measured again, keyed so
    assert not third["table_reused"] and "dtype" not in json.loads((folder / "quality_table.json").read_text())["key"]


def test_an_alternate_table_is_keyed_so_and_a_kept_full_one_serves_it(tiny_run, tmp_path):
    """The MLP widths a table measured are part of its key: a kept table that measured every width (as every
    table before the choice did) serves the default alternate one; asked for every width, an alternate table
    is measured again."""
    import json
    import shutil

    from search.quality_fit import QualityConfig, quality

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    small = dict(run=str(run), calib_windows=1, calib_seq_len=16, eval_windows=1, eval_seq_len=16, fit_configs=4,
                 heldout_configs=3, device="cpu", depth_path=0)
    key = run / "quality" / "elastic" / "quality_table.json"
    assert not quality(QualityConfig(**small))["table_reused"]
    assert json.loads(key.read_text())["key"]["mlp_table"] == "alternate"
    assert not quality(QualityConfig(**small, mlp_table="all"))["table_reused"]
    assert "mlp_table" not in json.loads(key.read_text())["key"]
    assert quality(QualityConfig(**small))["table_reused"]
    with pytest.raises(FlextronError, match="--mlp-table must be one of"):
        QualityConfig(**small, mlp_table="half")
