import json
import shutil

import pandas as pd
import pytest

from flextron.elastic import ElasticModel
from flextron.errors import FlextronError
from profiler.profile import Profile, profiled_regimes

KEY = "decode:b1:ctx32:float32:eager"


@pytest.fixture(scope="module")
def profiled(tiny_run, tmp_path_factory, profiled_copy):
    return profiled_copy(tiny_run, tmp_path_factory.mktemp("profile") / "run", "decode:b1:ctx32", 6, fit=False)


@pytest.fixture(scope="module")
def spec(profiled):
    return ElasticModel.load(profiled / "elastic").spec


@pytest.fixture
def run(profiled, tmp_path):
    """A copy of the profiled run that a test may damage."""
    shutil.copytree(profiled, tmp_path / "run")
    return tmp_path / "run"


def rewrite(run, name, change):
    """Replace a table of the run's profile with `change(table)`."""
    path = run / "profile" / name
    change(pd.read_parquet(path)).to_parquet(path)


def test_load_reads_the_profile_of_a_run(profiled, spec):
    prof = Profile.load(profiled)
    layers = pd.read_parquet(profiled / "profile" / "layers.parquet")
    e2e = pd.read_parquet(profiled / "profile" / "e2e.parquet")
    assert prof.layers.equals(layers) and prof.e2e.equals(e2e)
    assert prof.regimes == [KEY] and prof.engine == "torch"
    assert prof.device_name == json.loads((profiled / "profile" / "device.json").read_text())["device_name"]
    assert prof.device_name == layers["device_name"].iloc[0]
    assert set(prof.noise) == {KEY} and prof.noise[KEY]["noise_floor_pct"] >= 0
    assert profiled_regimes(profiled) == {KEY}


def test_full_ms_is_the_full_models_end_to_end_median(run, spec):
    """Pinned on known medians: every config gets its own (10, 11, 12, ... ms in file order)."""
    rewrite(run, "e2e.parquet", lambda df: df.assign(latency_ms_median=10.0 + df.index))
    e2e = pd.read_parquet(run / "profile" / "e2e.parquet")
    row = e2e.index[e2e["config_key"] == spec.full().key][0]
    assert Profile.load(run).full_ms(KEY, spec) == 10.0 + row
    rewrite(run, "e2e.parquet", lambda df: df.assign(status=df["status"].where(df.index != row, "oom")))
    with pytest.raises(FlextronError, match=f"full model was not measured end to end for {KEY}.*flextron profile"):
        Profile.load(run).full_ms(KEY, spec)


def test_uniform_gives_the_ok_uniform_configs_fastest_first(run, spec):
    def change(df):  # the slowest medians to the first rows, and one uniform config out of memory
        df["latency_ms_median"] = 100.0 - df.index
        df.loc[df.index[df["uniform"]][1], "status"] = "oom"
        return df

    rewrite(run, "e2e.parquet", change)
    e2e = pd.read_parquet(run / "profile" / "e2e.parquet")
    want = e2e[e2e["uniform"] & (e2e["status"] == "ok")].sort_values("latency_ms_median")
    got = Profile.load(run).uniform(KEY)
    n_uniform = len(spec.uniform_configs())
    assert list(got["config_key"]) == list(want["config_key"]) and len(got) == n_uniform - 1
    assert got["uniform"].all() and (got["status"] == "ok").all()
    assert got["latency_ms_median"].is_monotonic_increasing and list(got.index) == list(range(len(got)))


def test_tail_factor_is_the_median_tail_over_median(profiled, run):
    prof = Profile.load(profiled)
    assert prof.tail_factor(KEY, "p50") == 1.0
    ok = prof.e2e[prof.e2e["status"] == "ok"]
    p90 = prof.tail_factor(KEY, "p90")
    assert p90 >= 1 and p90 == pytest.approx(float((ok["latency_ms_p90"] / ok["latency_ms_median"]).median()))

    def tails(df):  # every config's p99 is 1.2 times its median, but one config's 100 times: a median, not a mean
        return df.assign(latency_ms_p99=df["latency_ms_median"] * (1.2 + 98.8 * (df.index == 0)))

    rewrite(run, "e2e.parquet", tails)
    assert Profile.load(run).tail_factor(KEY, "p99") == pytest.approx(1.2)
    rewrite(run, "e2e.parquet", lambda df: df.drop(columns=["latency_ms_p99"]))
    with pytest.raises(FlextronError, match=f"{KEY} has no p99 latencies.*--restart"):
        Profile.load(run).tail_factor(KEY, "p99")


def test_regime_resolves_a_short_form_and_refuses_an_unknown_or_ambiguous_one(run):
    assert Profile.load(run).regime("decode:b1:ctx32") == KEY
    assert Profile.load(run).regime(None) == KEY  # the only one
    with pytest.raises(FlextronError, match=rf"prefill:b1:s16 was not profiled \(profiled: \['{KEY}'\]\).*"
                                            r"flextron profile --run .* --regime prefill:b1:s16"):
        Profile.load(run).regime("prefill:b1:s16")
    other = "decode:b1:ctx32:bfloat16:eager"  # the same short form in another dtype
    rewrite(run, "layers.parquet", lambda df: df.assign(regime=df["regime"].where(df.index % 2 == 0, other)))
    prof = Profile.load(run)
    assert prof.regimes == [other, KEY] and prof.regime(KEY) == KEY
    with pytest.raises(FlextronError, match=rf"decode:b1:ctx32 matches several profiled regimes "
                                            rf"\['{other}', '{KEY}'\]"):
        prof.regime("decode:b1:ctx32")
    with pytest.raises(FlextronError, match=rf"several regimes were profiled \(\['{other}', '{KEY}'\]\).*--regime"):
        prof.regime(None)


def test_a_device_record_naming_another_device_is_corrupt(run):
    path = run / "profile" / "device.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "device_name": "NVIDIA H100 80GB HBM3"}))
    with pytest.raises(FlextronError, match=r"device.json is corrupt .*names 'NVIDIA H100 80GB HBM3' but the "
                                            r"profile's rows were measured on .*flextron profile --run"):
        Profile.load(run)
    path.write_text(json.dumps({"engine": "torch"}))
    with pytest.raises(FlextronError, match="device.json is corrupt .*no device_name"):
        Profile.load(run)


def test_a_device_record_naming_another_engine_is_corrupt(run):
    path = run / "profile" / "device.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "engine": "llamacpp"}))
    with pytest.raises(FlextronError, match=rf"device.json is corrupt .*engine llamacpp but regimes \['{KEY}'\]"):
        Profile.load(run)


def test_a_profile_mixing_devices_is_refused(run):
    rewrite(run, "layers.parquet",
            lambda df: df.assign(device_name=df["device_name"].where(df.index > 0, "NVIDIA H100")))
    with pytest.raises(FlextronError, match=r"mixes devices \[.*'NVIDIA H100'.*\]; fit one device per run"):
        Profile.load(run)


def test_missing_tables_name_the_command_that_makes_them(run):
    (run / "profile" / "e2e.parquet").unlink()
    with pytest.raises(FlextronError, match=rf"e2e.parquet is missing; run `flextron profile --run {run}` "
                                            "without --layers-only"):
        Profile.load(run)
    prof = Profile.load(run, need_e2e=False)  # a layers-only profile, for the stages that need no more
    assert prof.e2e.empty and prof.regimes == [KEY]
    (run / "profile" / "layers.parquet").unlink()
    with pytest.raises(FlextronError, match=r"layers.parquet does not exist yet; run `flextron profile --run"):
        Profile.load(run)


def test_profiled_regimes_include_a_sweep_in_progress(run):
    for name in ("layers.parquet", "e2e.parquet", "e2e_samples.parquet"):
        (run / "profile" / name).unlink()
    assert profiled_regimes(run) == {KEY}  # from the parts of the sweep
    shutil.rmtree(run / "profile" / "parts")
    assert profiled_regimes(run) == set()
