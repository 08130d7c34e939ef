import argparse
import dataclasses
import json

import pytest

from flextron.cli import _add_dataclass_args, build_parser, field_docs, main
from flextron.cli.stages import STAGES


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

@pytest.mark.parametrize("command", sorted(STAGES))
def test_every_flag_has_help_from_its_field_doc(command):
    """--help explains every flag in words from the config's `#:` field docs, not just its default."""
    cls = STAGES[command].load()[0]
    docs = field_docs(cls)
    undocumented = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert undocumented == [], f"{cls.__name__} fields without a #: doc: {undocumented}"
    text = build_parser(command)._subparsers._group_actions[0].choices[command].format_help()
    for f in dataclasses.fields(cls):
        assert docs[f.name].split()[0] in text

def test_field_docs_read_trailing_and_leading_comments_only():
    @dataclasses.dataclass(frozen=True)
    class C:
        a: int = 1  #: trailing doc
        #: leading doc
        #: over two lines
        b: str = "x"
        c: float = 0.5  # a plain comment is not help
        # a plain comment
        d: tuple[int, ...] = ()

    assert field_docs(C) == {"a": "trailing doc", "b": "leading doc over two lines"}

def test_run_is_required_and_lists_take_several_values(capsys):
    for argv in (["eval"], ["search"], ["convert"], ["run"], ["profile"], ["verify"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert "required: --" in capsys.readouterr().err

    @dataclasses.dataclass(frozen=True)
    class C:
        run: str  #: the run
        budget_frac: tuple[float, ...] = (0.7,)  #: fractions

    parser = argparse.ArgumentParser()
    _add_dataclass_args(parser, C)
    assert parser.parse_args(["--run", "r", "--budget-frac", "0.5", "0.6"]).budget_frac == [0.5, 0.6]
    assert parser.parse_args(["--run", "r", "--budget-frac", "0.5", "--budget-frac", "0.6"]).budget_frac == [0.5, 0.6]
    assert parser.parse_args(["--run", "r"]).budget_frac is None  # the dataclass default applies
    help_ = parser.format_help()
    assert "the run (required)" in help_ and "fractions (default: 0.7)" in help_

def test_convert_eval_export_through_the_cli(tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["convert", "--model", "tiny-qwen2", "--out", str(run), "--calib-windows", "2"]) == 0
    assert last_json(capsys)["parity_max_abs_diff"] <= 1e-4
    assert main(["eval", "--run", str(run), "--config", "uniform:0.5", "--windows", "2", "--seq-len", "64"]) == 0
    res = last_json(capsys)
    assert res["ppl"] > 1 and res["tokens"] == 2 * 63
    assert main(["export", "--run", str(run), "--config", "smallest", "--out", str(tmp_path / "x")]) == 0
    assert (tmp_path / "x" / "model.safetensors").is_file()
    # re-running the same conversion reuses it
    assert main(["convert", "--model", "tiny-qwen2", "--out", str(run), "--calib-windows", "2"]) == 0
    assert last_json(capsys)["reused"]

def test_bad_inputs_get_clear_errors_and_keep_results(tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["convert", "--model", "tiny-llama", "--out", str(run), "--calib-windows", "2"]) == 0
    before = (run / "elastic" / "model.safetensors").read_bytes()
    capsys.readouterr()

    def err(argv):
        assert main(argv) == 2
        return capsys.readouterr().err

    assert "neither a built-in name" in err(
        ["convert", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]
    )
    (tmp_path / "m").mkdir()
    assert "no config.json" in err(["convert", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o")])
    (tmp_path / "m" / "config.json").write_text('{"model_type": "bert", "hidden_size": 8}')
    msg = err(["convert", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o")])
    assert "unsupported architecture 'bert'" in msg and "llama" in msg and "qwen3" in msg
    (tmp_path / "m" / "config.json").write_text("{corrupt")
    assert "cannot read" in err(["convert", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o")])
    # another run in the output dir is refused, and left as it was
    assert "already holds a run" in err(["convert", "--model", "tiny-qwen3", "--out", str(run)])
    assert (run / "elastic" / "model.safetensors").read_bytes() == before
    # configs outside the spec and non-JSON files
    assert "layer 0: MLP width" in err(
        ["eval", "--run", str(run), "--config", '{"mlp_width": [7,7,7], "heads": [8,8,8]}']
    )
    (tmp_path / "c.json").write_text("not json")
    assert "not valid JSON" in err(["eval", "--run", str(run), "--config", str(tmp_path / "c.json")])
    assert "run `flextron convert" in err(["eval", "--run", str(tmp_path / "empty")])
    # a typo'd length beyond the model's 512 positions is refused up front, naming the limit
    assert "--seq-len 100000 is beyond the 512 positions" in err(["eval", "--run", str(run), "--seq-len", "100000"])
    assert "--seq-len 100000 is beyond the 512 positions" in err(
        ["synth", "--run", str(run), "--seq-len", "100000", "--sequences", "1"])
    assert (run / "elastic" / "model.safetensors").read_bytes() == before


def test_config_files_and_run_paths_that_are_not_what_they_should_be(tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["convert", "--model", "tiny-llama", "--out", str(run), "--calib-windows", "2"]) == 0
    capsys.readouterr()
    (tmp_path / "bin.json").write_bytes(bytes(range(256)))
    assert main(["eval", "--run", str(run), "--config", str(tmp_path / "bin.json")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    assert main(["eval", "--run", str(tmp_path / "f")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert main(["eval", "--run", str(run), "--windows", "0"]) == 2
    assert "--windows must be positive" in capsys.readouterr().err


def test_summaries_are_strict_json_with_missing_numbers_as_null(capsys, monkeypatch):
    """A summary holding NaN or an infinity (a lookup row without a p99, say) prints as null, never as
    `NaN` / `-Infinity`, which JSON readers reject."""
    import numpy as np

    from flextron.cli import stages

    real = STAGES["lookup"]

    class Fake:
        help = real.help

        def load(self):
            return real.load()[0], lambda cfg: {"p99": float("nan"), "rows": [np.float64("-inf"), 1.5]}

    monkeypatch.setitem(stages.STAGES, "lookup", Fake())
    assert main(["lookup", "--run", "x", "--budget-ms", "1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"p99": None, "rows": [None, 1.5]}
