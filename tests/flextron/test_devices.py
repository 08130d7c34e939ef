"""flextron/devices.py: --device checked once, `auto` made concrete."""

import pytest

from flextron.errors import FlextronError


def test_device_auto_picks_cuda_when_present_and_says_so(monkeypatch, capsys):
    import torch

    from flextron import devices

    for cuda, expected in ((False, "cpu"), (True, "cuda")):
        devices._auto_device.cache_clear()
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Fake GPU")
        assert devices.resolve_device("auto") == expected
        assert "--device auto: " in capsys.readouterr().err
        assert devices.resolve_device("auto", cpu_only=True) == "cpu"  # the llama.cpp engine
    devices._auto_device.cache_clear()
    from flextron.cli.run import RunConfig
    from flextron.evaluate import EvalConfig

    assert EvalConfig(run="r").device == "cuda"  # resolved when the config is made, so it is saved concrete
    assert RunConfig(out="r", engine="llamacpp").device == "cpu"
    devices._auto_device.cache_clear()


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "CPU", "cuda:x", "", 0])
def test_bad_device_names_are_refused_naming_the_choices(bad):
    from flextron.devices import resolve_device

    with pytest.raises(FlextronError, match="cpu, cuda, cuda:N or auto"):
        resolve_device(bad)


def test_pinning_to_a_core_is_restored_after_and_a_core_that_does_not_exist_is_refused():
    import os

    from flextron.devices import pinned

    before = os.sched_getaffinity(0)
    core = min(before)
    with pinned(core) as got:
        assert got == core and os.sched_getaffinity(0) == {core}
    assert os.sched_getaffinity(0) == before
    with pinned(-1) as got:
        assert got is None and os.sched_getaffinity(0) == before
    with pytest.raises(FlextronError, match="--pin-core 4096: this process may use cores"):
        with pinned(4096):
            pass
    with pytest.raises(FlextronError, match="--pin-core must be -2"):
        with pinned(-3):
            pass
    # the default (auto): the last core, when measuring on the CPU with one thread; else not pinned
    with pinned(-2, "cpu", 0) as got:
        assert got == max(before) and os.sched_getaffinity(0) == {max(before)}
    for device, threads in (("cpu", 2), ("cuda", 1)):
        with pinned(-2, device, threads) as got:
            assert got is None and os.sched_getaffinity(0) == before
    assert os.sched_getaffinity(0) == before
