import csv
import json
import shutil

import pytest
import torch

from flextron.errors import FlextronError
from flextron.spec import SubnetConfig


@pytest.fixture(scope="module")
def trained_run(tiny_run, tmp_path_factory):
    from flextron.train import TrainConfig, train

    run = tmp_path_factory.mktemp("train") / "run"
    shutil.copytree(tiny_run, run)
    train(TrainConfig(run=str(run), steps=4, batch_size=2, seq_len=64, checkpoint_every=2, lr=1e-3))
    return run


def test_train_writes_metrics_checkpoint_and_trained_weights(trained_run):
    from flextron.elastic import ElasticModel

    rows = list(csv.DictReader(open(trained_run / "train" / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert int(rows[-1]["tokens"]) == 4 * 2 * 64
    assert all(float(r["loss_full"]) > 0 and float(r["loss_smallest"]) > 0 for r in rows)
    trained = ElasticModel.load(trained_run / "trained")
    one_shot = ElasticModel.load(trained_run / "elastic")
    diff = max((a - b).abs().max().item() for a, b in zip(trained.model.parameters(), one_shot.model.parameters()))
    assert diff > 0  # the weights moved
    assert not list((trained_run / "train").glob("*.tmp"))


TRAIN_KW = dict(steps=4, batch_size=2, seq_len=64, checkpoint_every=2, lr=1e-3)  # as trained_run was trained


def test_resume_refuses_every_changed_flag_that_shapes_training(trained_run, tmp_path):
    """A resume must repeat every flag the result depends on (--steps too: it sets the cosine
    schedule); the error names the flag, and --restart starts again from step 0."""
    from flextron.train import TrainConfig, train

    run = tmp_path / "r"
    shutil.copytree(trained_run, run)
    changes = {"steps": 6, "batch_size": 1, "seq_len": 32, "grad_accum": 2, "random_configs": 1, "lr": 2e-3,
               "weight_decay": 0.1, "warmup": 2, "distill_weight": 0.5, "temperature": 2.0, "seed": 1, "corpus": "pydoc"}
    for name, value in changes.items():
        flag = "--" + name.replace("_", "-")
        with pytest.raises(FlextronError, match=rf"{flag} .*, now {value}.*--restart"):
            train(TrainConfig(run=str(run), **{**TRAIN_KW, name: value}))
    # a resume that repeats the flags (checkpoint_every may change) trains nothing more
    out = train(TrainConfig(run=str(run), **{**TRAIN_KW, "checkpoint_every": 3}))
    assert out["resumed"] and out["steps"] == 4
    assert [int(r["step"]) for r in csv.DictReader(open(run / "train" / "metrics.csv"))] == [1, 2, 3, 4]
    out = train(TrainConfig(run=str(run), **{**TRAIN_KW, "steps": 2, "restart": True}))
    assert not out["resumed"] and out["steps"] == 2
    assert [int(r["step"]) for r in csv.DictReader(open(run / "train" / "metrics.csv"))] == [1, 2]
    assert json.loads((run / "train" / "train_config.json").read_text())["steps"] == 2


def test_resume_after_an_interruption_between_checkpoints_keeps_one_row_per_step(tiny_run, tmp_path, monkeypatch):
    """Metrics written after the last checkpoint (steps that will run again) are not duplicated."""
    import flextron.train as tr

    run = tmp_path / "r"
    shutil.copytree(tiny_run, run)
    real_save = tr.save_checkpoint

    def stop_at_step_4(folder, elastic, opt=None, state=None):
        if state is not None and state["step"] == 4:  # rows 3 and 4 are written; the checkpoint is at 2
            raise KeyboardInterrupt
        real_save(folder, elastic, opt, state)

    monkeypatch.setattr(tr, "save_checkpoint", stop_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        tr.train(tr.TrainConfig(run=str(run), **{**TRAIN_KW, "steps": 6}))
    metrics = run / "train" / "metrics.csv"
    assert [int(r["step"]) for r in csv.DictReader(open(metrics))] == [1, 2, 3, 4]
    monkeypatch.setattr(tr, "save_checkpoint", real_save)
    out = tr.train(tr.TrainConfig(run=str(run), **{**TRAIN_KW, "steps": 6}))
    assert out["resumed"] and out["tokens"] == 6 * 2 * 64
    assert [int(r["step"]) for r in csv.DictReader(open(metrics))] == [1, 2, 3, 4, 5, 6]


def test_train_uses_the_runs_corpus_unless_told(tiny_run, tmp_path, monkeypatch):
    import flextron.data
    from flextron.train import TrainConfig, train

    run = tmp_path / "r"
    shutil.copytree(tiny_run, run)
    convert_cfg = json.loads((run / "convert_config.json").read_text())
    (run / "convert_config.json").write_text(json.dumps({**convert_cfg, "corpus": "pydoc"}))
    seen, real = [], flextron.data.token_windows
    monkeypatch.setattr(flextron.data, "token_windows", lambda *a, **k: seen.append(a[5]) or real(*a, **k))
    train(TrainConfig(run=str(run), **{**TRAIN_KW, "steps": 1}))
    assert seen == ["pydoc"]
    assert json.loads((run / "train" / "train_config.json").read_text())["corpus"] == "pydoc"


def test_distill_loss_is_zero_kl_for_identical_logits():
    from flextron.train import distill_loss

    logits = torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    ce = distill_loss(logits, logits, ids, 0.0, 1.0)
    assert distill_loss(logits, logits, ids, 1.0, 2.0).abs().item() < 1e-6
    assert abs(distill_loss(logits, logits, ids, 0.5, 1.0).item() - 0.5 * ce.item()) < 1e-5


def test_dynamic_router_grouped_compute_matches_masked_and_skips(tiny_run):
    """Hard routing (tokens grouped by width, prefix weights) equals the nested-mask formulation with
    one-hot choices, and each group multiplies only its prefix."""
    from flextron.elastic import ElasticModel
    from flextron.routers import DynamicRouting

    el = ElasticModel.load(tiny_run / "elastic")
    routing = DynamicRouting(el)
    m = routing.modules[0]
    torch.manual_seed(0)
    with torch.no_grad():
        m.router.weight.normal_(0, 1.0)
    x = torch.randn(3, 7, el.spec.hidden_size)
    m.soft = False
    hard = m(x)
    choice = m.last_choice
    assert len(choice.unique()) > 1  # several widths really used
    # reference: each token through the MLP sliced to its width
    ref = torch.stack([
        torch.nn.functional.linear(
            m.mlp.act_fn(torch.nn.functional.linear(t, m.gate.weight[: m.widths[c]]))
            * torch.nn.functional.linear(t, m.up.weight[: m.widths[c]]), m.down.weight[:, : m.widths[c]])
        for t, c in zip(x.reshape(-1, x.shape[-1]), choice.reshape(-1))]).view_as(x)
    assert torch.allclose(hard, ref, atol=1e-5)
    # soft path at a tiny temperature is (nearly) the same one-hot choice, as a mask
    m.soft, m.tau = True, 1e-4
    torch.manual_seed(1)
    m(x)
    assert (m.last_probs.argmax(-1) == choice).float().mean() > 0.7


def test_surrogate_learns_a_known_loss_function(tiny_run):
    from flextron.elastic import ElasticModel
    from flextron.routers import fit_surrogate, sample_configs

    spec = ElasticModel.load(tiny_run / "elastic").spec
    cfgs = sample_configs(spec, 60, seed=0)
    assert len(set(cfgs)) == len(cfgs) >= 60
    # a synthetic "loss" falling with width and heads, as real losses do
    loss = [3.0 + sum(1.0 / w for w in c.mlp_width) * 40 + sum(1.0 / h for h in c.heads) for c in cfgs]
    _, m = fit_surrogate(spec, cfgs, loss, seed=0)
    assert m["heldout"] >= 4 and m["heldout_mean_rel_err"] < 0.03 and m["heldout_spearman"] > 0.8


def test_static_router_respects_budgets_and_is_deterministic(tiny_run):
    from flextron.elastic import ElasticModel
    from flextron.routers import expected_latency, fit_surrogate, one_hot, route_static, sample_configs, train_static

    spec = ElasticModel.load(tiny_run / "elastic").spec
    L, W, H = spec.num_layers, len(spec.mlp_widths[0]), len(spec.head_counts[0])
    # a monotone synthetic latency table and loss
    table = {"attn": torch.arange(1, H + 1).float().repeat(L, 1), "mlp": 2 * torch.arange(1, W + 1).float().repeat(L, 1),
             "fixed": 1.0, "full": 1.0 + L * (H + 2 * W)}
    cfgs = sample_configs(spec, 60, seed=0)
    loss = [3.0 + sum(1.0 / w for w in c.mlp_width) * 40 + sum(1.0 / h for h in c.heads) for c in cfgs]
    sur, _ = fit_surrogate(spec, cfgs, loss, seed=0)
    lo = (1.0 + L * 3) / table["full"]
    router, hist = train_static(spec, sur, table, lo, steps=600, latency_weight=20.0, seed=0)
    fracs = []
    for t in (0.4, 0.6, 0.8, 1.0):
        c = route_static(router, spec, t)
        assert c == route_static(router, spec, t)  # deterministic
        fracs.append(float(expected_latency(table, *one_hot(spec, [c]))[0]))
        assert fracs[-1] <= t * 1.1
    assert fracs == sorted(fracs) and fracs[-1] > fracs[0]  # more budget buys a bigger network


def test_fit_to_budget_shrinks_until_predicted_fits(tiny_run):
    from flextron.elastic import ElasticModel
    from flextron.routers import fit_to_budget

    spec = ElasticModel.load(tiny_run / "elastic").spec

    def predict(c):
        return sum(c.mlp_width) / 64 + sum(c.heads)

    full = spec.full()
    out = fit_to_budget(full, spec, predict, predict(full) * 0.6)
    assert predict(out) <= predict(full) * 0.6
    spec.validate(out)


def test_route_command_trains_saves_and_answers_budgets(trained_run, tmp_path, profiled_copy):
    from flextron.elastic import ElasticModel
    from flextron.routers import Routers, _moves, regime_dir
    from profiler.latency_model import LatencyModels
    from search.route import RouteConfig, route

    run = profiled_copy(trained_run, tmp_path / "r", "prefill:b1:s64", 6)
    with pytest.raises(FlextronError, match="holds no routers"):
        route(RouteConfig(run=str(run), budget_ms=1.0))
    out = route(RouteConfig(run=str(run), static_steps=100, dynamic_steps=2, joint_steps=1, surrogate_samples=24,
                            eval_windows=2, eval_seq_len=32, seq_len=32, batch_size=2, surrogate_threshold=0.5))
    folder = regime_dir(run, out["regime"], weights="trained")
    assert folder.name == "trained" and not (folder.parent / "elastic").exists()
    assert not list(folder.parent.glob("*.tmp")) and not list(folder.parent.glob("*.old"))
    meta = json.loads((folder / "router.json").read_text())
    assert meta["weights"] == "trained" and meta["table"]["source"].startswith("measured")
    assert {"static_router.safetensors", "surrogate.safetensors", "dynamic_router.safetensors"} <= {p.name for p in folder.iterdir()}
    assert (folder / "joint" / "model.safetensors").is_file()
    # the dynamic router is calibrated per budget on calibration text: a budget is met in expectation
    # (the full budget always) unless even the narrowest routing (the largest shift) misses it, and a
    # budget between two calibrated ones is served by the lower one
    for key in ("dynamic_calibration", "joint_calibration"):
        calib = sorted(meta[key], key=lambda c: c["router_frac"])
        assert len(calib) == 9 and calib[-1]["meets"]
        # (values are stored rounded to 4 places)
        assert all(c["expected_frac"] <= c["router_frac"] + 1e-4 if c["meets"] else c["expected_frac"] > c["router_frac"] - 1e-4
                   for c in calib)
        assert all(c["meets"] or c["shift"] == 32.0 for c in calib)
    routers = Routers.load(run, out["regime"], ElasticModel.load(run / "trained").spec, weights="trained")
    # routers trained on the trained weights never serve the one-shot ones
    with pytest.raises(FlextronError, match="holds no routers"):
        Routers.load(run, out["regime"], routers.spec, weights="elastic")
    with pytest.raises(FlextronError, match="holds no routers"):
        route(RouteConfig(run=str(run), budget_ms=1.0, weights="elastic"))
    mid, nxt = sorted(meta["dynamic_calibration"], key=lambda c: c["router_frac"])[4:6]
    assert routers.dynamic_point((mid["router_frac"] + nxt["router_frac"]) / 2) == mid
    assert routers.dynamic_point(0.0)["router_frac"] == meta["dynamic_calibration"][0]["router_frac"]
    spec = ElasticModel.load(run / "trained").spec
    lat = LatencyModels.load(run).get(out["regime"])
    lo_ms, hi_ms = lat.predict_config(spec.smallest()), lat.predict_config(spec.full())
    for budget in (2 * max(lo_ms, hi_ms), lo_ms + 0.5 * abs(hi_ms - lo_ms)):
        answer = route(RouteConfig(run=str(run), budget_ms=budget))
        chosen = spec.validate(SubnetConfig.from_dict(answer["config"]))
        assert answer["source"] == "router" and lat.predict_config(chosen) <= budget + 1e-9
        # no budget is left idle: no single wider choice would still fit (at the full budget: the full model)
        assert all(lat.predict_config(c) > budget for c in _moves(chosen, spec, +1))
        if budget >= hi_ms:
            assert chosen == spec.full()
    with pytest.raises(FlextronError, match="below the smallest"):
        route(RouteConfig(run=str(run), budget_ms=1e-6))
    # a surrogate that misses the threshold stops before any router is trained
    with pytest.raises(FlextronError, match="surrogate"):
        route(RouteConfig(run=str(run), static_steps=10, dynamic_steps=1, joint_steps=0, surrogate_samples=24,
                          eval_windows=2, eval_seq_len=32, surrogate_threshold=1e-9))
    assert Routers.load(run, out["regime"], spec, weights="trained").meta["surrogate"]["threshold"] == 0.5
    # the router's answer seeds the search, marked as router-chosen
    import pandas as pd

    from search.optuna_search import SearchConfig, results_dir, search

    search(SearchConfig(run=str(run), budget_ms=(1e6,), trials=2, eval_windows=2, eval_seq_len=32))
    results = results_dir(run, out["regime"], "trained")
    assert "router" in set(pd.read_parquet(results / "trials.parquet")["source"])
    assert json.loads((results / "best.json").read_text())["weights"] == "trained"
    # one Budget: the search and the routers resolve a fraction against the same reference to the same ms
    search(SearchConfig(run=str(run), budget_frac=(1.5,), trials=2, eval_windows=2, eval_seq_len=32))
    b = next(x for x in json.loads((results / "best.json").read_text())["best"] if x["budget_frac"] == 1.5)
    assert meta["reference_full_ms"] == b["reference_full_ms"]
    for a in meta["static_answers"] + meta["dynamic_calibration"]:
        assert a["budget_ms"] == pytest.approx(a["budget_frac"] * meta["reference_full_ms"], rel=1e-5)
    assert routers.dynamic_point_for(b["budget_ms"]) == routers.dynamic_point(b["budget_ms"] / meta["table"]["full_ms"])
    # a profiled regime whose fit is missing is an error naming `flextron fit`, never the analytic table
    shutil.rmtree(run / "latency_model")
    with pytest.raises(FlextronError, match="not fitted yet.*flextron fit"):
        route(RouteConfig(run=str(run), regime=out["regime"], static_steps=10, surrogate_samples=24))


def test_analytic_table_is_labelled_when_regime_not_profiled(tiny_run):
    from flextron.elastic import ElasticModel
    from search.route import latency_table

    spec = ElasticModel.load(tiny_run / "elastic").spec
    t = latency_table(tiny_run, "prefill:b1:s64", spec)
    assert t["source"].startswith("analytic") and t["unit"] == "relative"
    assert t["mlp"].shape == (spec.num_layers, len(spec.mlp_widths[0]))
    assert (t["mlp"].diff(dim=-1) > 0).all()


@pytest.mark.gpu
def test_train_and_dynamic_routing_on_cuda(tiny_run, tmp_path):
    """The CUDA path: bf16 autocast training steps, then grouped dynamic routing on the GPU."""
    from flextron.elastic import ElasticModel
    from flextron.routers import DynamicRouting
    from flextron.train import TrainConfig, train

    run = tmp_path / "r"
    shutil.copytree(tiny_run, run)
    out = train(TrainConfig(run=str(run), steps=3, batch_size=2, seq_len=64, checkpoint_every=2, device="cuda"))
    assert out["steps"] == 3
    el = ElasticModel.load(run / "trained", device="cuda")
    routing = DynamicRouting(el)
    routing.install()
    routing.set(0.5, soft=False)
    with torch.no_grad():
        logits = el(input_ids=torch.randint(0, 256, (2, 16), device="cuda"), use_cache=False).logits
    assert torch.isfinite(logits).all() and logits.device.type == "cuda"
