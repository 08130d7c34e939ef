import time

import pytest
import torch

from profiler.timer import Timer, TimerConfig


def test_cpu_timer_meets_count_and_time():
    t = Timer("cpu", cfg=TimerConfig(warmup=1, min_reps=5, min_time_s=0.05)).measure(lambda: time.sleep(0.002))
    assert len(t.samples_ms) >= 5 and sum(t.samples_ms) >= 45
    assert 1.8 < t.median_ms < 100 and t.p10_ms <= t.median_ms <= t.p90_ms  # sleep(2 ms); busy box: more
    row = t.row()
    assert row["n"] == len(t.samples_ms)
    assert (row["latency_ms_p10"] <= row["latency_ms_median"] <= row["latency_ms_p90"] <= row["latency_ms_p99"]
            <= max(t.samples_ms))


def test_cuda_graph_mode_refused_on_cpu():
    with pytest.raises(ValueError, match="cuda_graph mode needs a CUDA device"):
        Timer("cpu", mode="cuda_graph")


@pytest.mark.gpu
def test_cuda_graph_replay_is_faster_than_eager_for_launch_bound_work():
    x = torch.randn(64, 64, device="cuda")

    def many_small():
        y = x
        for _ in range(50):
            y = y * 1.0001
        return y

    eager = Timer("cuda", "eager").measure(many_small).median_ms
    graph = Timer("cuda", "cuda_graph").measure(many_small).median_ms
    assert graph < eager


def test_end_to_end_warm_up_is_none_only_for_the_torch_engine_on_the_cpu():
    from profiler.timer import default_e2e_warmup

    assert default_e2e_warmup("cpu") == 0
    assert default_e2e_warmup("cuda:0") == 1 and default_e2e_warmup("cpu", "llamacpp") == 1
