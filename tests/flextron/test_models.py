"""The built-in model cache: built once under concurrent first use, rebuilt only when damaged (saying why)."""

import os
import subprocess
import sys
import textwrap

import pytest

from flextron.models import _cached_checkpoint, tiny_model

# Each process imports first, then waits at a file barrier so both ask for the entry at the same
# moment; the loader records every build and is slow enough that the two would overlap.
_BUILDER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import flextron.models as m
    import transformers  # noqa: F401  (imported before the barrier, so both start together)

    root, me = Path(sys.argv[1]), sys.argv[2]
    (root / f"ready-{me}").touch()
    deadline = time.time() + 60
    while len(list(root.glob("ready-*"))) < 2 and time.time() < deadline:
        time.sleep(0.01)

    def loader():
        with open(root / "builds.txt", "a") as f:
            f.write(me + "\\n")
        time.sleep(0.5)
        return m.tiny_model("tiny-llama")

    model, tok = m._cached_checkpoint("tiny-key", loader)
    print(float(model.lm_head.weight.detach().sum()))
""")


def _weights_sum(model) -> float:
    return float(model.lm_head.weight.detach().sum())


def test_two_processes_build_one_cache_entry_once(tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "FLEXTRON_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", _BUILDER, str(tmp_path), str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert len((tmp_path / "builds.txt").read_text().split()) == 1  # the second waited and loaded
    expected = _weights_sum(tiny_model("tiny-llama")[0])
    for out, _ in outs:
        assert float(out.split()[-1]) == pytest.approx(expected)
    entries = sorted(p.name for p in (cache / "models").iterdir())
    assert entries == ["tiny-key", "tiny-key.lock"]  # no temp folder left behind


def _count_builds(builds):
    def loader():
        builds.append(1)
        return tiny_model("tiny-llama")
    return loader


def test_damaged_cache_is_rebuilt_saying_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLEXTRON_CACHE", str(tmp_path))
    builds = []
    _cached_checkpoint("k", _count_builds(builds))
    entry = tmp_path / "models" / "k"
    with open(entry / "model.safetensors", "r+b") as f:
        f.truncate(100)  # a disk that filled up, or a copy cut short
    capsys.readouterr()
    model, _ = _cached_checkpoint("k", _count_builds(builds))
    err = capsys.readouterr().err
    assert str(entry) in err and "SafetensorError" in err and "rebuilding" in err
    assert len(builds) == 2
    assert _weights_sum(model) == pytest.approx(_weights_sum(tiny_model("tiny-llama")[0]))
    _cached_checkpoint("k", _count_builds(builds))  # the rebuilt entry loads: no third build
    assert len(builds) == 2 and "rebuilding" not in capsys.readouterr().err


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, MemoryError])
def test_interrupted_load_keeps_the_cache(tmp_path, monkeypatch, interrupt):
    monkeypatch.setenv("FLEXTRON_CACHE", str(tmp_path))
    builds = []
    _cached_checkpoint("k", _count_builds(builds))
    before = sorted(p.name for p in (tmp_path / "models" / "k").iterdir())

    def boom(*a, **k):
        raise interrupt()

    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    with pytest.raises(interrupt):
        _cached_checkpoint("k", _count_builds(builds))
    assert len(builds) == 1
    assert sorted(p.name for p in (tmp_path / "models" / "k").iterdir()) == before
