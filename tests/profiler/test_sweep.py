import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from flextron import bridges as bridging
from flextron.elastic import ElasticModel
from flextron.errors import FlextronError
from profiler.bench import RegimeBench
from profiler.profile import NOISE_FILE
from profiler.sweep import ProfileConfig, drift_corrected, profile, run_sweep

# max_rounds = rounds: no rounds added for precision (timing-dependent; tested on a fake timer)
FAST = dict(min_reps=2, min_time_ms=1, warmup=1, e2e_random=6, e2e_depth=3, anchor_every=10, max_rounds=6)
REPO = Path(__file__).resolve().parents[2]


class Kill(Exception):
    pass


def dying_at(n):
    """A progress hook that stops the sweep when it reaches layer cell `n` (cells 0..n-1 finished)."""
    def progress(items, desc=""):
        for i, x in enumerate(items):
            if i == n:
                raise Kill()
            yield x
    return progress


def raw_parts(out, prefix):
    """Every row written to the sweep's parts: where lost or duplicated cells would show."""
    parts = sorted((out / "parts").glob(f"{prefix}-*.parquet"))
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True) if parts else pd.DataFrame()


def assert_each_cell_written_once(out):
    """Every part file's rows, concatenated, hold each cell once per kind (layer cells and anchors,
    end-to-end configs, round samples): checked on the raw parts, since combining them into
    layers.parquet and e2e.parquet keeps one row per cell and would hide a cell written twice."""
    for prefix in ("layers", "e2e"):
        rows = raw_parts(out, prefix)
        assert len(rows) and rows["cell_key"].is_unique, f"{prefix} parts repeat cells"
    samples = raw_parts(out, "e2e_round")
    assert not samples.duplicated(["regime", "round", "key", "sample"]).any(), "round parts repeat samples"


@pytest.fixture
def one_thread():
    """Timing relations on a shared CPU: with two intra-op threads, a tiny decode step can wait tens of
    ms at a barrier for a descheduled thread (seen: 24 ms decode beside 0.8 ms prefill); one thread
    measures the work itself."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_sweep_covers_every_layer_and_choice(tiny_run, tmp_path, one_thread):
    el = ElasticModel.load(tiny_run / "elastic")
    cfg = ProfileConfig(run=str(tiny_run), regime=("decode:b1:ctx32", "prefill:b1:s16"), **FAST)
    s = run_sweep(el, tmp_path / "p", cfg)
    layers = pd.read_parquet(tmp_path / "p" / "layers.parquet")
    spec = el.spec
    # embedding and head, then per layer: the whole layer, its bridge, each MLP width, each head count
    assert all(bridging.used(el.bridges, l) for l in range(spec.num_layers))
    per_regime = 2 + sum(2 + len(w) + len(h) for w, h in zip(spec.mlp_widths, spec.head_counts))
    cells = layers[~layers["anchor"]]
    assert sorted(cells[cells["kind"] == "bridge"]["layer"]) == sorted(list(range(spec.num_layers)) * 2)
    assert len(cells) == 2 * per_regime == s["layer_cells"]
    assert_each_cell_written_once(tmp_path / "p")
    assert len(raw_parts(tmp_path / "p", "layers").query("~anchor")) == 2 * per_regime
    assert {"latency_ms_median", "latency_ms_p10", "latency_ms_p90", "latency_ms_p99", "cv", "n", "samples_ms",
            "device_name", "sm_clock_mhz", "throttled"} <= set(layers.columns)
    assert (cells["latency_ms_median"] > 0).all()
    assert layers["anchor"].sum() >= 2  # drift anchors re-measured
    e2e = pd.read_parquet(tmp_path / "p" / "e2e.parquet")
    n_uniform = len(spec.mlp_widths[0]) * len(spec.head_counts[0])
    assert len(e2e) == 2 * (n_uniform + 6 + 3) and e2e["uniform"].sum() == 2 * n_uniform
    assert (e2e["skipped_layers"] > 0).sum() == 2 * 3  # the configs that skip layers, per regime
    assert len(raw_parts(tmp_path / "p", "e2e")) == len(e2e)
    n_rows = {rk: len(layers[layers["regime"] == rk]) + len(e2e[e2e["regime"] == rk]) for rk in s["regimes"]}
    assert s["cells_by_status"] == {rk: {"ok": n, "oom": 0, "error": 0} for rk, n in n_rows.items()}
    # the rows carry each config's analytic work: prefill of 16 tokens is 16 decode steps' FLOPs
    # (no assertion on which measured faster: that is the machine's, not the code's)
    flops = e2e[e2e["uniform"]].groupby("phase")["flops"].median()
    assert flops["prefill"] > 10 * flops["decode"]


SIGNAL_SCRIPT = """
import signal, sys, time
# A test run started in the background (`make test &`) hands its children SIGINT ignored, and the
# sweep leaves ignored signals ignored (as under nohup); this process stands for a foreground one.
signal.signal(signal.SIGINT, signal.default_int_handler)
import flextron.progress
import profiler.parts
from flextron.cli import main

profiler.parts.FLUSH_S = 1e9  # no timed writes: only the interrupt can save the finished rows

def stop_at_cell(items, desc=""):
    for i, x in enumerate(items):
        if desc.startswith("layers") and i == {n}:
            print("READY", flush=True)  # cells 0..{n}-1 are finished, none is written yet
            time.sleep(120)
        yield x

flextron.progress.progress = stop_at_cell
sys.exit(main(["profile", "--run", {run!r}, "--regime", "decode:b1:ctx32", "--min-reps", "2", "--min-time-ms", "1",
               "--warmup", "1", "--e2e-random", "6", "--e2e-depth", "3", "--anchor-every", "10", "--layers-only"]))
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signalled_sweep_resumes_without_lost_or_duplicated_cells(tiny_run, tmp_path, sig):
    """A real signal to a `flextron profile` process mid-sweep, then a resume; counted on the raw parts."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    n_done = 7
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SIGNAL_SCRIPT).format(n=n_done, run=str(run))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    try:
        ready = proc.stdout.readline()
        assert ready.strip() == "READY", proc.communicate(timeout=60)[1][-2000:]
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted; finished work is kept" in err, err[-2000:]
    out = run / "profile"
    assert len(raw_parts(out, "layers")) == n_done  # every finished cell was written, none twice
    assert (out / "profile_config.json").is_file() and (out / "device.json").is_file()

    el = ElasticModel.load(run / "elastic")
    spec = el.spec
    n_layer_cells = 2 + sum(2 + len(w) + len(h) for w, h in zip(spec.mlp_widths, spec.head_counts))  # layer, bridge
    s = profile(ProfileConfig(run=str(run), regime=("decode:b1:ctx32",), layers_only=True, **FAST))
    cells = raw_parts(out, "layers").query("~anchor")
    # On the raw parts: a resume that measured a finished cell again would duplicate its key here.
    assert cells["cell_key"].is_unique and len(cells) == n_layer_cells == s["layer_cells"]
    n_anchors = (n_layer_cells - n_done) // FAST["anchor_every"]
    assert s["measured_now"] == n_layer_cells - n_done + n_anchors


def quick_forward(self, cfg):
    """Stands in for a whole-model forward where only the sweep's bookkeeping is under test."""
    return lambda: sum(range(100))


def test_resume_refuses_other_settings_and_keeps_the_first_device_record(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(RegimeBench, "forward_fn", quick_forward)
    el = ElasticModel.load(tiny_run / "elastic")
    out = tmp_path / "profile"
    cfg = ProfileConfig(run=str(tiny_run), regime=("decode:b1:ctx32",), layers_only=True, **FAST)
    with pytest.raises(Kill):
        run_sweep(el, out, cfg, progress=dying_at(3))
    saved = json.loads((out / "profile_config.json").read_text())  # saved when the sweep started
    assert saved["regime"] == ["decode:b1:ctx32:float32:eager"] and saved["dtype"] == "float32"
    assert saved["min_reps"] == 2 and saved["layers_only"] is True
    assert saved["e2e_warmup"] == 0  # the default (-1) saved resolved: none on a fresh start
    device = json.loads((out / "device.json").read_text())
    (out / "device.json").write_text(json.dumps({**device, "hostname": "first start"}))

    for change, flag in [({"min_reps": 3}, "--min-reps"), ({"min_time_ms": 2.0}, "--min-time-ms"),
                         ({"warmup": 2}, "--warmup"), ({"seed": 1}, "--seed"), ({"anchor_every": 5}, "--anchor-every"),
                         ({"e2e_random": 3}, "--e2e-random"), ({"energy_s": 0.0}, "--energy-s"),
                         ({"dtype": "bfloat16"}, "--dtype"), ({"e2e_warmup": 1}, "--e2e-warmup"),
                         ({"regime": ("decode:b1:ctx32", "prefill:b1:s16")}, "--regime")]:
        with pytest.raises(FlextronError, match=f"started with {flag} .*or --restart"):
            run_sweep(el, out, replace(cfg, **change))
    assert len(raw_parts(out, "layers")) == 3  # a refused resume measured nothing

    # The same regime written in full is the same sweep; --layers-only may be dropped to add the
    # end-to-end cells (the layer cells are not measured again).
    s = run_sweep(el, out, replace(cfg, regime=("decode:b1:ctx32:float32:eager",)))
    assert s["e2e_cells"] == 0 and s["layer_cells"] == len(raw_parts(out, "layers").query("~anchor"))
    s = run_sweep(el, out, replace(cfg, layers_only=False))
    assert s["measured_now"] == s["e2e_cells"] > 0
    assert_each_cell_written_once(out)
    assert json.loads((out / "profile_config.json").read_text())["layers_only"] is False
    assert json.loads((out / "device.json").read_text())["hostname"] == "first start"

    # a profile kept from before the default was 0 took one warm-up step: the default resumes it with its own
    saved = json.loads((out / "profile_config.json").read_text())
    (out / "profile_config.json").write_text(json.dumps({**saved, "e2e_warmup": 1}))
    assert run_sweep(el, out, replace(cfg, layers_only=False))["measured_now"] == 0
    assert json.loads((out / "profile_config.json").read_text())["e2e_warmup"] == 1
    with pytest.raises(FlextronError, match="started with --e2e-warmup 1, now 0"):
        run_sweep(el, out, replace(cfg, layers_only=False, e2e_warmup=0))
    # one from before it had its own setting timed them after --warmup steps: resumed with those
    saved = {k: v for k, v in json.loads((out / "profile_config.json").read_text()).items() if k != "e2e_warmup"}
    (out / "profile_config.json").write_text(json.dumps({**saved, "warmup": 1}))
    run_sweep(el, out, replace(cfg, layers_only=False))
    assert json.loads((out / "profile_config.json").read_text())["e2e_warmup"] == 1

    with pytest.raises(Kill):  # --restart removes the old profile and records the new settings
        run_sweep(el, out, replace(cfg, min_reps=3, restart=True), progress=dying_at(0))
    assert json.loads((out / "profile_config.json").read_text())["min_reps"] == 3
    assert json.loads((out / "device.json").read_text())["hostname"] != "first start"
    assert raw_parts(out, "layers").empty and not (out / "layers.parquet").exists()


def test_corrupt_state_is_named_with_its_fix(tiny_run, tmp_path):
    el = ElasticModel.load(tiny_run / "elastic")
    out = tmp_path / "run" / "profile"
    cfg = ProfileConfig(run="r", regime=("decode:b1:ctx32",), layers_only=True, **FAST)
    with pytest.raises(Kill):
        run_sweep(el, out, cfg, progress=dying_at(3))
    part = next((out / "parts").glob("layers-*.parquet"))
    part.write_bytes(part.read_bytes()[:40])
    with pytest.raises(FlextronError, match=rf"{part.name} is a corrupt part.*delete it"):
        run_sweep(el, out, cfg)
    part.unlink()  # as told: its cells are measured again
    device = (out / "device.json").read_text()
    (out / "device.json").write_text(device[:20])
    with pytest.raises(FlextronError, match=r"device.json is corrupt.*flextron profile --run .*--restart"):
        run_sweep(el, out, cfg)
    (out / "device.json").write_text(device)
    s = run_sweep(el, out, cfg)
    assert s["measured_now"] >= s["layer_cells"] and raw_parts(out, "layers").query("~anchor")["cell_key"].is_unique
    shutil.rmtree(out)
    (out / "parts").mkdir(parents=True)
    (out / "parts" / "layers-00000-1.parquet").write_bytes(b"rows without the settings that measured them")
    with pytest.raises(FlextronError, match="no profile_config.json.*--restart"):
        run_sweep(el, out, cfg)


def test_oom_cells_are_recorded_counted_and_refused_by_fit(tiny_run, tmp_path, monkeypatch, capsys):
    from profiler.fit import FitConfig, fit

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    el = ElasticModel.load(run / "elastic")
    spec = el.spec
    cell_fn = RegimeBench.cell_fn
    oom = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def failing_cell(self, layer, kind, width):
        if (layer, kind, width) == (1, "mlp", spec.mlp_widths[1][1]):
            raise oom
        return cell_fn(self, layer, kind, width)

    def failing_forward(self, cfg):
        if cfg == spec.smallest():  # not the full model: it is every round's reference
            raise oom
        return quick_forward(self, cfg)

    monkeypatch.setattr(RegimeBench, "cell_fn", failing_cell)
    monkeypatch.setattr(RegimeBench, "forward_fn", failing_forward)
    s = run_sweep(el, run / "profile", ProfileConfig(run=str(run), regime=("decode:b1:ctx32",), **FAST))
    key = "decode:b1:ctx32:float32:eager"
    n_rows = len(pd.read_parquet(run / "profile" / "layers.parquet")) + s["e2e_cells"]
    assert s["cells_by_status"] == {key: {"ok": n_rows - 2, "oom": 2, "error": 0}}
    json.dumps(s, allow_nan=False)  # the summary stays valid JSON with failed cells

    with pytest.raises(FlextronError, match=rf"regime {key}: 2 of {n_rows} profiled cells failed \(2 oom, 0 error; "
                                            rf"e\.g\. 'oom'\).*`flextron profile --run \S+ --regime {key} --restart`"
                                            r".*--allow-errors"):
        fit(FitConfig(run=str(run)))
    out = fit(FitConfig(run=str(run), allow_errors=True))
    assert out[key]["cells_by_status"]["oom"] == 2
    assert any("--allow-errors" in w and "cannot be predicted" in w for w in out["warnings"])
    assert "WARNING" in capsys.readouterr().err


@pytest.mark.parametrize("bad, flag", [
    ({"min_reps": 0}, "--min-reps"), ({"min_reps": 1.5}, "--min-reps"), ({"min_time_ms": -1.0}, "--min-time-ms"),
    ({"min_time_ms": math.nan}, "--min-time-ms"), ({"warmup": -1}, "--warmup"), ({"e2e_random": -1}, "--e2e-random"),
    ({"anchor_every": 0}, "--anchor-every"), ({"energy_s": -0.5}, "--energy-s"), ({"energy_s": math.inf}, "--energy-s"),
    ({"seed": 0.5}, "--seed"), ({"device": "cuda:x"}, "--device"), ({"device": "gpu"}, "--device"),
    ({"dtype": "float8"}, "--dtype"), ({"mode": "graph"}, "--mode"), ({"regime": ()}, "--regime"),
    ({"regime": ("decode:b1:ctx32", "decode:b1:ctx32:float32")}, "--regime"),
])
def test_profile_flags_are_validated(bad, flag):
    with pytest.raises(FlextronError, match=flag):
        ProfileConfig(**{"run": "r", "regime": ("decode:b1:ctx32",), **bad})


def test_cpu_refuses_cuda_graph_mode(tiny_run):
    with pytest.raises(FlextronError, match="cuda_graph mode needs --device cuda"):
        ProfileConfig(run="r", regime=("decode:b1:ctx32:cuda_graph",)).regimes()


@pytest.mark.gpu
def test_gpu_sweep_records_telemetry(tiny_run, tmp_path):
    el = ElasticModel.load(tiny_run / "elastic")
    cfg = ProfileConfig(run="r", device="cuda", regime=("decode:b4:ctx64",), **FAST)
    run_sweep(el, tmp_path / "g", cfg)
    layers = pd.read_parquet(tmp_path / "g" / "layers.parquet")
    assert layers["sm_clock_mhz"].notna().all()
    assert (layers["status"] == "ok").all()


def test_end_to_end_set_is_measured_in_interleaved_rounds_and_resumes_by_round(tiny_run, tmp_path):
    """Every config (the full model included) once per round; rows carry statistics over rounds and
    the ratio to the full model; raw samples keep their round; a sweep killed between rounds resumes
    with the rounds it lacks; the split-half noise floor is written per regime."""
    el = ElasticModel.load(tiny_run / "elastic")
    cfg = ProfileConfig(run=str(tiny_run), regime=("decode:b1:ctx32",), **{**FAST, "e2e_random": 3, "max_rounds": 4},
                        rounds=4, reps=2)

    class DyingBar:
        def __init__(self, total=None, desc=""):
            self.n, self.desc = 0, desc

        def update(self, k=1):
            self.n += k
            if self.desc.startswith("end-to-end") and self.n == 2 * n_cfgs + 1:  # inside the third round
                raise Kill()

        def close(self):
            pass

    def progress(items=None, desc="", total=None):
        return items if items is not None else DyingBar(total, desc)

    n_cfgs = len(el.spec.uniform_configs()) + 3 + FAST["e2e_depth"]
    with pytest.raises(Kill):
        run_sweep(el, tmp_path / "p", cfg, progress=progress)
    rounds = sorted((tmp_path / "p" / "parts").glob("e2e_round-*.parquet"))
    assert len(rounds) == 2  # two whole rounds were written; the one in flight was lost
    run_sweep(el, tmp_path / "p", cfg)
    assert_each_cell_written_once(tmp_path / "p")
    assert run_sweep(el, tmp_path / "p", cfg)["measured_now"] == 0  # a finished sweep run again measures nothing
    assert_each_cell_written_once(tmp_path / "p")
    samples = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "p" / "parts").glob("e2e_round-*.parquet"))])
    assert sorted(samples["round"].unique()) == [0, 1, 2, 3]
    per = samples.groupby("round")["key"].nunique()
    assert (per == n_cfgs).all()  # every config in every round, the full model among them
    assert (samples.groupby(["round", "key"]).size() == 2).all()  # reps per round
    orders = samples[samples["sample"] == 0].sort_values(["round", "order"]).groupby("round")["key"].apply(tuple)
    assert orders.nunique() > 1  # a fresh order per round
    e2e = pd.read_parquet(tmp_path / "p" / "e2e.parquet")
    full = e2e[e2e["config_key"] == el.spec.full().key].iloc[0]
    assert full["ratio_to_full"] == 1.0 and (e2e["rounds"] == 4).all()
    assert {"ratio_to_full_hi", "latency_ms_p90", "latency_ms_p99", "cv_rounds"} <= set(e2e.columns)
    noise = json.loads((tmp_path / "p" / NOISE_FILE).read_text())["decode:b1:ctx32:float32:eager"]
    assert noise["noise_floor_pct"] >= 0 and noise["rounds"] == 4
    # the session's steal and load figures stand in device.json too (the per-round log only in noise.json)
    device = json.loads((tmp_path / "p" / "device.json").read_text())
    load = device["interference"]["decode:b1:ctx32:float32:eager"]
    assert load == {k: v for k, v in noise["interference"].items() if k != "log"} and "log" not in load


def test_layer_cells_are_corrected_for_the_drift_their_anchors_saw():
    """A machine slowing down 2x over a sweep: the anchor, re-measured through it, scales each cell
    back to the anchor's median level at the time the cell was measured."""
    rows = []
    for t in range(0, 101, 10):  # the anchor, true 1.0 ms, measured every 10 s as the machine slows
        rows.append({"regime": "r", "anchor": True, "status": "ok", "measured_at": t,
                     "latency_ms_median": 1.0 + t / 100})
    true = {5: 0.5, 42: 2.0, 97: 0.3}
    for t, ms in true.items():
        rows.append({"regime": "r", "anchor": False, "status": "ok", "measured_at": t,
                     "latency_ms_median": ms * (1 + t / 100)})
    out = drift_corrected(pd.DataFrame(rows))
    cells = out[~out["anchor"]].set_index("measured_at")["latency_ms_corrected"]
    for t, ms in true.items():
        assert cells[t] == pytest.approx(ms * 1.5, rel=1e-9)  # the anchors' median level is 1.5
    raw = out[~out["anchor"]].set_index("measured_at")["latency_ms_median"]
    assert raw[97] / raw[5] == pytest.approx(0.3 * 1.97 / (0.5 * 1.05))  # uncorrected: drift mixed into the ratio


def test_restart_without_the_llamacpp_binding_keeps_the_profile(tiny_run, tmp_path, monkeypatch):
    """`profile --restart --engine llamacpp` where llama.cpp is not installed is refused before the
    profile is removed."""
    import profiler.llamacpp as lc

    monkeypatch.setattr(RegimeBench, "forward_fn", quick_forward)
    el = ElasticModel.load(tiny_run / "elastic")
    out = tmp_path / "profile"
    cfg = ProfileConfig(run=str(tiny_run), regime=("decode:b1:ctx32",), layers_only=True, **FAST)
    run_sweep(el, out, cfg)
    before = sorted(p.name for p in out.iterdir())

    def missing():
        raise FlextronError("llama-cpp-python is not installed; `make setup` builds it")

    monkeypatch.setattr(lc, "require_binding", missing)
    with pytest.raises(FlextronError, match="llama-cpp-python is not installed"):
        run_sweep(el, out, replace(cfg, restart=True, engine="llamacpp", regime=("decode:b1:ctx32:q8_0:llamacpp",),
                                   device="cpu"))
    assert sorted(p.name for p in out.iterdir()) == before
