"""`flextron export --out`: which folders it may write, crash safety, and the errors users see."""

import hashlib
import json
import shutil

import pytest

from flextron.errors import FlextronError
from flextron.hf_export import SUBNET_FILE, load_subnet
from search.export import ExportConfig, export


@pytest.fixture
def run(tiny_run, tmp_path):
    """A private copy of the tiny run (these tests try to write into its checkpoints), with a
    trained/ folder like `flextron train` leaves."""
    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst)
    shutil.copytree(dst / "elastic", dst / "trained")
    return dst


def _checksums(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _export(run, out, config="smallest", **kw):
    return export(ExportConfig(run=str(run), config=config, out=str(out), **kw))


@pytest.mark.parametrize("target", ["elastic", "trained", "elastic/sub", "trained/x/y"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_export_never_writes_into_a_runs_checkpoint(run, target, overwrite):
    before = {stage: _checksums(run / stage) for stage in ("elastic", "trained")}
    names = sorted(p.name for p in run.iterdir())
    with pytest.raises(FlextronError, match="elastic checkpoint"):
        _export(run, run / target, overwrite=overwrite)
    assert {stage: _checksums(run / stage) for stage in ("elastic", "trained")} == before  # byte-identical
    assert sorted(p.name for p in run.iterdir()) == names  # no temp folder beside them either


def test_export_refuses_an_unrelated_model_even_with_overwrite(run, tmp_path):
    other = tmp_path / "someone_elses_model"
    shutil.copytree(run / "elastic", other)
    (other / "elastic_spec.json").unlink()  # an ordinary transformers model folder: config.json, weights
    before = _checksums(other)
    for overwrite in (False, True):
        with pytest.raises(FlextronError, match="not a flextron export"):
            _export(run, other, overwrite=overwrite)
    assert _checksums(other) == before


def test_export_replaces_a_previous_export_only_with_overwrite(run, tmp_path):
    out = tmp_path / "sub"
    out.mkdir()  # an empty folder is fine
    _export(run, out, "smallest")
    smallest = json.loads((out / SUBNET_FILE).read_text())["config"]
    with pytest.raises(FlextronError, match="--overwrite"):
        _export(run, out, "full")
    assert json.loads((out / SUBNET_FILE).read_text())["config"] == smallest
    _export(run, out, "full", overwrite=True)
    full = json.loads((out / SUBNET_FILE).read_text())["config"]
    assert full != smallest and load_subnet(out).config.intermediate_size == max(full["mlp_width"])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("sub")) == ["sub"]  # no temp left


def test_failed_export_leaves_the_previous_one_intact(run, tmp_path, monkeypatch):
    out = tmp_path / "sub"
    _export(run, out, "smallest")
    before = _checksums(out)

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        _export(run, out, "full", overwrite=True)
    assert _checksums(out) == before
    monkeypatch.undo()
    _export(run, out, "full", overwrite=True)  # the partial folder is no obstacle to the next try
    assert json.loads((out / SUBNET_FILE).read_text())["config_arg"] == "full"


def test_export_keeps_an_unrelated_sibling_named_like_its_temp_folder(run, tmp_path):
    (tmp_path / "sub.old").mkdir()
    (tmp_path / "sub.old" / "notes.txt").write_text("mine")
    with pytest.raises(FlextronError, match="sub.old"):
        _export(run, tmp_path / "sub")
    assert (tmp_path / "sub.old" / "notes.txt").read_text() == "mine"


def test_out_pointing_at_a_file_is_a_clear_error(run, tmp_path):
    f = tmp_path / "model.bin"
    f.write_text("x")
    with pytest.raises(FlextronError, match="is a file"):
        _export(run, f)
    assert f.read_text() == "x"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_budget_ms_must_be_finite_and_not_negative(value):
    with pytest.raises(FlextronError, match="--budget-ms must"):
        ExportConfig(run="r", budget_ms=value, out="o")


@pytest.mark.parametrize("text", ["{\"rows\": [", "{\"rows\": [{\"regime\": 1}]}"])
def test_corrupt_lookup_names_the_file_and_its_rebuild_command(run, tmp_path, text):
    (run / "export").mkdir()
    (run / "export" / "lookup.json").write_text(text)
    with pytest.raises(FlextronError, match=r"lookup\.json.*flextron export --run .* --lookup"):
        export(ExportConfig(run=str(run), budget_ms=1.0, out=str(tmp_path / "sub")))
