"""`flextron eval --router`: a budget served by the run's routers, scored on validation text and timed
beside the full model, through the CLI."""

import json
import shutil
from pathlib import Path

import pytest

from flextron.cli import main

REGIME = "prefill:b1:s64"


@pytest.fixture(scope="module")
def routed_run(trained_run, profiled_copy, tmp_path_factory):
    from search.route import RouteConfig, route

    run = profiled_copy(trained_run, tmp_path_factory.mktemp("route_eval") / "r", REGIME, 6)
    route(RouteConfig(run=str(run), static_steps=60, dynamic_steps=2, surrogate_samples=16, eval_windows=2,
                      eval_seq_len=32, seq_len=32, batch_size=2, select_windows=2, select_rounds=2, select_reps=1,
                      surrogate_threshold=0.9))
    return run


def _eval(capsys, *argv):
    code = main(["eval", *argv])
    out = capsys.readouterr()
    return code, (json.loads(out.out.strip().splitlines()[-1]) if code == 0 else out.err)


def _meta(run) -> tuple[Path, dict]:
    folder = next((run / "router").glob("*/trained"))
    return folder / "router.json", json.loads((folder / "router.json").read_text())


def test_eval_serves_the_dynamic_routers_verdict_and_times_it(routed_run, capsys, tmp_path):
    from flextron.dynamic_router import calibrated_point

    run = tmp_path / "r"
    shutil.copytree(routed_run, run)
    path, meta = _meta(run)
    calib = sorted(meta["dynamic_calibration"], key=lambda c: c["router_frac"])
    # the tiny model's routed steps measure slower than static ones: make one verdict dynamic, so the
    # served form of both kinds is scored and timed
    # (the entry served at a budget is `calibrated_point`'s: of entries with equal fractions, the first)
    mid = next(c for c in calib[len(calib) // 2:] if calibrated_point(calib, c["router_frac"]) is c)
    mid["serve"] = "dynamic"
    mid["selection"]["dynamic"] = {"loss": 1.0, "ratio": 0.5, "point": {f: mid[f] for f in (
        "router_frac", "heads", "shift", "fixed_layers", "expected_frac")}}
    # and the top budget's verdict dynamic with the routing calibrated lower (what a calibration that measured
    # the lower routing within the top budget decides): it serves that routing at its expected latency
    top = calibrated_point(calib, calib[-1]["router_frac"])
    top["serve"] = "dynamic"
    top["selection"]["dynamic"] = {**mid["selection"]["dynamic"], "point": dict(mid["selection"]["dynamic"]["point"])}
    # and one verdict static (the tiny model's usual verdict, forced so it does not hang on the timing)
    low = next(c for c in calib[: len(calib) // 2] if calibrated_point(calib, c["router_frac"]) is c)
    low["serve"] = "static"
    path.write_text(json.dumps({**meta, "dynamic_calibration": calib}))
    for point in (top, mid, low):
        budget_ms = point["router_frac"] * meta["table"]["full_ms"] * 1.0001  # just above the calibrated point
        code, res = _eval(capsys, "--run", str(run), "--router", "dynamic", "--budget-ms", str(budget_ms),
                          "--windows", "2", "--seq-len", "32", "--rounds", "2", "--reps", "2")
        assert code == 0, res
        assert res["serve"] == point["serve"] and res["served"]["router_frac"] == point["router_frac"]
        assert res["tokens"] == 2 * 31 and res["ppl"] > 1
        assert res["measured_ms"] > 0 and res["full_measured_ms"] > 0 and res["measured_frac"] > 0
        # dynamic: the routing its verdict chose (calibrated at this budget or, where that measured within, a
        # lower one; which one depends on the calibration's timing), expected where it was calibrated
        routed = point["selection"]["dynamic"]["point"] if point["serve"] == "dynamic" else None
        expected = routed["expected_frac"] if routed else res["expected_frac"]
        assert res["served"]["routed_at"] == (routed["router_frac"] if routed else None)
        assert res["expected_ms"] == pytest.approx(expected * meta["table"]["full_ms"], rel=1e-3)
        assert res["rounds"] == 2 and res["ratio_noise_floor_pct"] >= 0
    # the top budget serves the full widths (dynamic routing at every widest choice, or the full config)
    code, res = _eval(capsys, "--run", str(routed_run), "--router", "static", "--budget-ms",
                      str(10 * meta["table"]["full_ms"]), "--windows", "2", "--seq-len", "32", "--rounds", "2")
    assert code == 0 and res["serve"] == "static"
    code, full = _eval(capsys, "--run", str(routed_run), "--windows", "2", "--seq-len", "32")
    assert code == 0 and res["ppl"] == pytest.approx(full["ppl"], rel=1e-6)


def test_eval_router_flags_are_checked(routed_run, capsys):
    run = str(routed_run)
    assert "needs --budget-ms" in _eval(capsys, "--run", run, "--router", "dynamic")[1]
    assert "--router must be one of" in _eval(capsys, "--run", run, "--router", "joint", "--budget-ms", "1")[1]
    assert "add --router dynamic" in _eval(capsys, "--run", run, "--budget-ms", "1")[1]
    assert "instead of --config" in _eval(capsys, "--run", run, "--router", "dynamic", "--budget-ms", "1",
                                          "--config", "smallest")[1]
    assert "holds no routers" in _eval(capsys, "--run", run, "--router", "dynamic", "--budget-ms", "1",
                                       "--weights", "elastic")[1]
