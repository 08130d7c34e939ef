import pandas as pd
import pytest

from flextron.elastic import ElasticModel
from flextron.errors import FlextronError
from profiler.sweep import ProfileConfig, run_sweep

FAST = dict(min_reps=2, min_time_ms=1, warmup=1, e2e_random=6, anchor_every=10)


def test_sweep_covers_every_layer_and_choice(tiny_run, tmp_path):
    el = ElasticModel.load(tiny_run / "elastic")
    cfg = ProfileConfig(run=str(tiny_run), regime=("decode:b1:ctx32", "prefill:b1:s16"), **FAST)
    s = run_sweep(el, tmp_path / "p", cfg)
    layers = pd.read_parquet(tmp_path / "p" / "layers.parquet")
    spec = el.spec
    per_regime = 2 + sum(len(w) + len(h) for w, h in zip(spec.mlp_widths, spec.head_counts))
    cells = layers[~layers["anchor"]]
    assert len(cells) == 2 * per_regime == s["layer_cells"]
    assert cells["cell_key"].is_unique
    assert {"latency_ms_median", "latency_ms_p10", "latency_ms_p90", "cv", "n", "samples_ms", "device_name",
            "sm_clock_mhz", "throttled"} <= set(layers.columns)
    assert (cells["latency_ms_median"] > 0).all()
    assert layers["anchor"].sum() >= 2  # drift anchors re-measured
    e2e = pd.read_parquet(tmp_path / "p" / "e2e.parquet")
    n_uniform = len(spec.mlp_widths[0]) * len(spec.head_counts[0])
    assert len(e2e) == 2 * (n_uniform + 6) and e2e["uniform"].sum() == 2 * n_uniform
    # prefill of 16 tokens costs more than decoding one
    full = e2e[e2e["config_key"] == spec.full().key].set_index("phase")["latency_ms_median"]
    assert full["prefill"] > full["decode"] * 0.5


def test_killed_sweep_resumes_without_lost_or_duplicated_rows(tiny_run, tmp_path):
    el = ElasticModel.load(tiny_run / "elastic")
    cfg = ProfileConfig(run=str(tiny_run), regime=("decode:b1:ctx32",), **FAST)

    class Kill(Exception):
        pass

    def dying_progress(items, desc=""):
        for i, x in enumerate(items):
            if i == 21:
                raise Kill()
            yield x

    with pytest.raises(Kill):
        run_sweep(el, tmp_path / "p", cfg, progress=dying_progress)
    parts = list((tmp_path / "p" / "parts").glob("layers-*.parquet"))
    done_before = sum(len(pd.read_parquet(p)) for p in parts)
    assert done_before >= 16  # flushed parts survived the kill
    s = run_sweep(el, tmp_path / "p", cfg)
    assert s["measured_now"] < s["layer_cells"] + s["e2e_cells"]  # finished cells were not re-measured
    layers = pd.read_parquet(tmp_path / "p" / "layers.parquet")
    fresh = ProfileConfig(run=str(tiny_run), regime=("decode:b1:ctx32",), **FAST)
    reference = run_sweep(el, tmp_path / "q", fresh)
    assert s["layer_cells"] == reference["layer_cells"]
    assert layers["cell_key"].is_unique


def test_cpu_refuses_cuda_graph_mode(tiny_run):
    with pytest.raises(FlextronError, match="cuda_graph mode needs --device cuda"):
        ProfileConfig(regime=("decode:b1:ctx32:cuda_graph",)).regimes()


@pytest.mark.gpu
def test_gpu_sweep_records_telemetry(tiny_run, tmp_path):
    el = ElasticModel.load(tiny_run / "elastic")
    cfg = ProfileConfig(device="cuda", regime=("decode:b4:ctx64",), **FAST)
    run_sweep(el, tmp_path / "g", cfg)
    layers = pd.read_parquet(tmp_path / "g" / "layers.parquet")
    assert layers["sm_clock_mhz"].notna().all()
    assert (layers["status"] == "ok").all()
