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


from flextron.devices import native_bf16 as real_native_bf16  # noqa: E402  (before conftest patches it per test)


def test_eval_dtype_auto_is_bfloat16_only_where_the_device_has_it_natively(tmp_path, monkeypatch):
    from flextron import devices

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert {"avx512f", "avx512_bf16"} <= devices.cpu_flags(str(info))
    assert devices.cpuinfo("model name", str(info)) == "AMD EPYC" and devices.cpuinfo("model", str(info)) is None
    assert devices.cpu_flags(str(tmp_path / "none")) == set()  # no /proc/cpuinfo (not Linux): no flags, no error
    for flags, native in (({"avx2", "avx512f"}, False), ({"avx512_bf16"}, True), ({"amx_bf16"}, True), (set(), False)):
        monkeypatch.setattr(devices, "cpu_flags", lambda flags=flags: flags)
        assert real_native_bf16("cpu") is native
    from types import SimpleNamespace

    import torch

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for major, native in ((7, False), (8, True), (9, True)):  # Volta/Turing emulate bfloat16; Ampere on do not
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda d, major=major: asked.append(str(d)) or SimpleNamespace(major=major))
        assert real_native_bf16("cuda:1") is native
    assert set(asked) == {"cuda:1"}  # the device asked about, not the current one
    for native, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(devices, "native_bf16", lambda device, native=native: native)
        assert devices.resolve_eval_dtype("auto", "cpu") == expected
        assert devices.resolve_eval_dtype("float32", "cpu") == "float32"  # asked: as asked
        assert devices.resolve_eval_dtype("bfloat16", "cpu") == "bfloat16"


def test_eval_dtype_auto_keeps_the_dtype_of_the_stages_kept_results(tmp_path, monkeypatch):
    import json

    from flextron import devices

    monkeypatch.setattr(devices, "native_bf16", lambda device: True)
    kept = tmp_path / "search_config.json"
    assert devices.resolve_eval_dtype("auto", "cpu", kept) == "bfloat16"  # nothing kept: the device's choice
    kept.write_text(json.dumps({"eval_windows": 8}))  # saved before the choice existed: float32
    assert devices.resolve_eval_dtype("auto", "cpu", kept) == "float32"
    kept.write_text(json.dumps({"eval_dtype": "float32"}))
    assert devices.resolve_eval_dtype("auto", "cpu", kept) == "float32"
    assert devices.resolve_eval_dtype("bfloat16", "cpu", kept) == "bfloat16"  # asked: the stage refuses a mix
    kept.write_text("{not json")
    assert devices.resolve_eval_dtype("auto", "cpu", kept) == "bfloat16"  # damaged: the stage's own checks say so


@pytest.mark.parametrize("bad", ["fp16", "float16", "", "BF16", None])
def test_bad_eval_dtypes_are_refused_naming_the_choices(bad):
    from flextron.cli.run import RunConfig
    from search.quality_fit import QualityConfig

    for make in (lambda: RunConfig(out="r", eval_dtype=bad), lambda: QualityConfig(run="r", eval_dtype=bad)):
        with pytest.raises(FlextronError, match="--eval-dtype must be one of.*bfloat16"):
            make()
