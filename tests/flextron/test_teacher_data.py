"""Teacher-generated continuations: prompts from the train split, deterministic shards that resume,
refused changes, and mixing them into training."""

import json
import shutil

import pytest
import torch

from flextron.errors import FlextronError
from flextron.teacher_data import SynthConfig, mixed_windows, synth, teacher_windows

KW = dict(seq_len=16, prompt_len=4, batch_size=2, device="cpu")


@pytest.fixture()
def run(tiny_run, tmp_path):
    shutil.copytree(tiny_run, tmp_path / "r")
    return tmp_path / "r"


def _tokens(run, name="seed0"):
    return teacher_windows(run, name, json.loads((run / "data/teacher" / name / "meta.json").read_text())["sequences"],
                           16)


def test_sequences_continue_train_split_prompts_in_full_length_shards(run):
    from flextron.data import token_windows
    from flextron.elastic import ElasticModel
    from flextron.rundir import RunDir

    out = synth(SynthConfig(run=str(run), sequences=5, **KW))
    assert out["shards"] == 3 and out["sequences"] == 6 and out["tokens"] == 6 * 16  # whole shards
    folder = run / "data" / "teacher" / "seed0"
    assert sorted(p.name for p in folder.glob("shard-*")) == [f"shard-0000{i}.safetensors" for i in range(3)]
    t = _tokens(run)
    el = ElasticModel.load(run / "elastic")
    assert t.shape == (6, 16) and t.min() >= 0 and t.max() < el.spec.vocab_size
    prompts = token_windows(el.tokenizer, el.adapter, "train", 4, 6, RunDir(run).corpus(""))
    assert torch.equal(t[:, :4], prompts)  # each sequence starts with the next train-split prompt
    assert not torch.equal(t[0, 4:], t[1, 4:])
    with pytest.raises(FlextronError, match="holds 6 sequences, training needs 7.*--sequences 7"):
        teacher_windows(run, "seed0", 7, 16)
    with pytest.raises(FlextronError, match="training uses --seq-len 32"):
        teacher_windows(run, "seed0", 2, 32)
    with pytest.raises(FlextronError, match="holds no teacher data.*flextron synth"):
        teacher_windows(run, "seed9", 2, 16)


def test_same_seed_same_tokens_even_when_extended_and_settings_cannot_change(run, tmp_path):
    synth(SynthConfig(run=str(run), sequences=6, **KW))
    other = tmp_path / "o"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("data"))
    synth(SynthConfig(run=str(other), sequences=2, **KW))  # a run stopped after its first shard ...
    synth(SynthConfig(run=str(other), sequences=6, **KW))  # ... and continued
    assert torch.equal(_tokens(other), _tokens(run))
    synth(SynthConfig(run=str(other), sequences=2, **{**KW, "seed": 1}))
    assert not torch.equal(_tokens(other, "seed1"), _tokens(run)[:2])
    with pytest.raises(FlextronError, match="--temperature 1.0, now 0.5.*--restart"):
        synth(SynthConfig(run=str(run), sequences=6, temperature=0.5, **KW))
    synth(SynthConfig(run=str(run), sequences=2, temperature=0.5, restart=True, **KW))
    assert len(_tokens(run)) == 2


def test_mixed_windows_hold_the_share_and_repeat_real_text_in_order():
    real = torch.arange(3 * 4).view(3, 4)
    teacher = -torch.arange(1, 1 + 4 * 4).view(4, 4)
    mixed = mixed_windows(real, teacher, 10, seed=0)
    from_teacher = mixed[:, 0] < 0
    assert int(from_teacher.sum()) == 4 and torch.equal(mixed[from_teacher], teacher)
    assert torch.equal(mixed[~from_teacher], real[torch.arange(6) % 3])  # in order, from the start again
    assert torch.equal(mixed_windows(real, teacher, 10, seed=0), mixed)
    assert not torch.equal(mixed_windows(real, teacher, 10, seed=1), mixed)
    with pytest.raises(FlextronError, match="do not fit"):
        mixed_windows(real, teacher, 3, seed=0)


def test_training_reads_the_share_of_teacher_windows(run, monkeypatch):
    import flextron.teacher_data
    from flextron.train import TrainConfig, train

    synth(SynthConfig(run=str(run), sequences=4, **KW))
    seen = []
    real = flextron.teacher_data.mixed_windows
    monkeypatch.setattr(flextron.teacher_data, "mixed_windows", lambda *a: seen.append(a) or real(*a))
    out = train(TrainConfig(run=str(run), steps=2, batch_size=4, seq_len=16, device="cpu", teacher_data="seed0",
                            teacher_mix=0.5, random_configs=0))
    assert out["teacher_tokens"] == 4 * 16 and len(seen) == 1
    assert torch.equal(seen[0][1], _tokens(run)[:4]) and seen[0][2] == 8
    with pytest.raises(FlextronError, match="--teacher-mix 0.5, now 0.25"):  # a resume must keep the mix
        train(TrainConfig(run=str(run), steps=2, batch_size=4, seq_len=16, device="cpu", teacher_data="seed0",
                          teacher_mix=0.25, random_configs=0))
    with pytest.raises(FlextronError, match="training needs 8"):
        train(TrainConfig(run=str(run), steps=2, batch_size=4, seq_len=16, device="cpu", teacher_data="seed0",
                          teacher_mix=1.0, random_configs=0, restart=True))


@pytest.mark.parametrize("kw,match", [
    (dict(teacher_mix=0.5), "name a `flextron synth` set"), (dict(teacher_data="seed0"), "unused at --teacher-mix 0"),
    (dict(teacher_data="seed0", teacher_mix=1.5), "--teacher-mix must be <= 1"),
])
def test_train_teacher_flags_are_checked(kw, match):
    from flextron.train import TrainConfig

    with pytest.raises(FlextronError, match=match):
        TrainConfig(run="r", **kw)


@pytest.mark.parametrize("kw,match", [
    (dict(prompt_len=16), "leaves no tokens"), (dict(top_p=0.0), "--top-p must be >"),
    (dict(sequences=0), "--sequences"),
])
def test_synth_flags_are_checked(kw, match):
    with pytest.raises(FlextronError, match=match):
        SynthConfig(run="r", **{**KW, **kw})


def test_restart_with_a_missing_corpus_keeps_the_shards(run, tmp_path):
    synth(SynthConfig(run=str(run), sequences=2, **KW))
    shards = sorted((run / "data" / "teacher" / "seed0").glob("shard-*"))
    with pytest.raises(FlextronError, match="corpus .*missing"):
        synth(SynthConfig(run=str(run), sequences=2, restart=True, corpus=str(tmp_path / "missing"), **KW))
    assert sorted((run / "data" / "teacher" / "seed0").glob("shard-*")) == shards and shards
