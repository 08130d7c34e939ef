"""`flextron train`: what it writes, what a resume must repeat, the distillation loss, and crash tests
(real kills (SIGKILL), then a resume, then a comparison with a run that was never interrupted)."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flextron.errors import FlextronError

REPO = Path(__file__).resolve().parents[2]
KW = dict(batch_size=2, seq_len=32, lr=1e-3, warmup=1)
# Subprocesses and the test itself run torch on one thread: on a busy 2-core machine more threads
# oversubscribe (several times slower), and a run split across processes computes as one would.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}




def _rows(run: Path) -> list[dict]:
    return list(csv.DictReader(open(run / "train" / "metrics.csv")))


def _kill_inside_rename(script: str) -> None:
    """Run `script` in a fresh interpreter where Path.rename SIGKILLs the process right after renaming
    a folder named by `KILL_AFTER` (the first rename of a crash-safe swap); assert it died so."""
    prelude = textwrap.dedent("""
        import os, signal
        from pathlib import Path
        real_rename = Path.rename
        def rename(self, target):
            out = real_rename(self, target)
            if self.name == KILL_AFTER and Path(target).name == KILL_AFTER + ".old":
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        Path.rename = rename
    """)
    p = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script)], cwd=REPO, capture_output=True,
                       text=True, env=ONE_THREAD)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]


def test_kill_between_checkpoint_renames_resumes_from_the_checkpoint(tiny_run, tmp_path, one_thread):
    """SIGKILL after `ckpt` was renamed away and before the new one took its place: the next `train`
    resumes from the new checkpoint (not step 0) and keeps the metrics rows it already had."""
    from flextron.train import TrainConfig, train

    run = tmp_path / "r"
    shutil.copytree(tiny_run, run)
    kw = dict(run=str(run), steps=6, checkpoint_every=2, **KW)
    _kill_inside_rename(f"""
        KILL_AFTER = "ckpt"  # its first swap is the step-4 checkpoint (step 2 had nothing to replace)
        from flextron.train import TrainConfig, train
        train(TrainConfig(**{kw!r}))
    """)
    assert not (run / "train" / "ckpt").exists()  # only ckpt.old and the complete ckpt.tmp are left
    before = _rows(run)
    assert [int(r["step"]) for r in before] == [1, 2, 3, 4]
    out = train(TrainConfig(**kw))
    assert out["resumed"] and out["steps"] == 6
    after = _rows(run)
    assert after[:4] == before  # kept as written, not recomputed
    assert [int(r["step"]) for r in after] == [1, 2, 3, 4, 5, 6]
    assert not list((run / "train").glob("ckpt.*"))


def test_kill_between_trained_renames_keeps_the_new_weights(trained_run_for_swap):
    """SIGKILL in the middle of swapping in new `trained/` weights: `--weights auto` still finds
    trained weights, and they are the complete new version."""
    from flextron.elastic import ElasticModel
    from flextron.rundir import RunDir

    run = trained_run_for_swap
    _kill_inside_rename(f"""
        KILL_AFTER = "trained"
        from flextron.elastic import ElasticModel
        from flextron.train import save_checkpoint
        save_checkpoint(Path({str(run / "trained")!r}), ElasticModel.load(Path({str(run / "elastic")!r})))
    """)
    assert not (run / "trained").exists()
    name, folder = RunDir(run).weights("auto")
    assert name == "trained"
    new, one_shot = ElasticModel.load(folder).model, ElasticModel.load(run / "elastic").model
    assert all((a == b).all() for a, b in zip(new.parameters(), one_shot.parameters()))


@pytest.fixture
def trained_run_for_swap(tiny_run, tmp_path):
    from flextron.train import TrainConfig, train

    run = tmp_path / "r"
    shutil.copytree(tiny_run, run)
    train(TrainConfig(run=str(run), steps=1, **KW))
    return run


def test_training_killed_mid_step_resumes_to_the_uninterrupted_result(tiny_run, tmp_path, one_thread):
    """`flextron train` SIGKILLed while it trains (between checkpoints, normally with metrics rows past
    the last one), then resumed, ends with the weights and per-step losses of a run that never stopped
    and one metrics row per step."""
    from flextron.elastic import ElasticModel
    from flextron.train import TrainConfig, train

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_run, a)
    shutil.copytree(tiny_run, b)
    cfg = dict(steps=12, checkpoint_every=4, **KW)
    train(TrainConfig(run=str(a), **cfg))
    args = [f"--{k.replace('_', '-')}={v}" for k, v in cfg.items()]
    proc = subprocess.Popen([sys.executable, "-m", "flextron", "train", f"--run={b}", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ONE_THREAD)
    state, metrics = b / "train" / "ckpt" / "state.json", b / "train" / "metrics.csv"
    deadline = time.monotonic() + 120
    try:  # kill once step 6 is done: two steps past the first checkpoint, mid-way to the next one
        while not (state.is_file() and metrics.is_file() and len(metrics.read_text().splitlines()) >= 1 + 6):
            assert proc.poll() is None and time.monotonic() < deadline, "train ended before it could be killed"
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (b / "trained").exists()
    killed_at = json.loads(state.read_text())["step"]
    assert 4 <= killed_at < 12 and len(_rows(b)) >= 6  # rows past the checkpoint (5, 6, ...) will run again
    with pytest.raises(FlextronError, match="--lr"):  # the config was saved when training started
        train(TrainConfig(run=str(b), **{**cfg, "lr": 2e-3}))
    out = train(TrainConfig(run=str(b), **cfg))
    assert out["resumed"] and out["steps"] == 12
    rows_a, rows_b = _rows(a), _rows(b)
    assert [int(r["step"]) for r in rows_b] == list(range(1, 13))
    for ra, rb in zip(rows_a, rows_b):
        assert float(rb["loss_full"]) == pytest.approx(float(ra["loss_full"]), rel=1e-6)
    ma, mb = ElasticModel.load(a / "trained").model, ElasticModel.load(b / "trained").model
    assert max((x - y).abs().max().item() for x, y in zip(ma.parameters(), mb.parameters())) < 1e-6


def test_corrupt_checkpoint_names_the_file_and_restart(trained_run_for_swap):
    from flextron.train import TrainConfig, train

    run = trained_run_for_swap
    state = run / "train" / "ckpt" / "state.json"
    state.write_text('{"step": 1, "tok')
    with pytest.raises(FlextronError, match=r"state.json is corrupt.*flextron train --run .* --restart"):
        train(TrainConfig(run=str(run), steps=1, **KW))
    state.write_text('{"step": 1, "tokens": 64, "seconds": 0.1}')
    (run / "train" / "ckpt" / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(FlextronError, match=r"ckpt is corrupt.*--restart"):
        train(TrainConfig(run=str(run), steps=1, **KW))
    (run / "train" / "train_config.json").write_text("[1")
    with pytest.raises(FlextronError, match=r"train_config.json is corrupt.*--restart"):
        train(TrainConfig(run=str(run), steps=1, **KW))
    out = train(TrainConfig(run=str(run), steps=1, restart=True, **KW))
    assert not out["resumed"] and out["steps"] == 1
    # a checkpoint without its AdamW state would resume as a fresh optimizer: refused, never silent
    (run / "train" / "ckpt" / "optimizer.safetensors").unlink()
    with pytest.raises(FlextronError, match=r"no optimizer state.*flextron train --run .* --restart"):
        train(TrainConfig(run=str(run), steps=1, **KW))


@pytest.mark.parametrize("field,value", [
    ("steps", 0), ("batch_size", 0), ("seq_len", 1), ("grad_accum", 0), ("random_configs", -1), ("lr", 0.0),
    ("lr", float("nan")), ("weight_decay", -0.1), ("warmup", -1), ("distill_weight", 1.5), ("temperature", 0.0),
    ("temperature", float("inf")), ("checkpoint_every", 0), ("seed", float("nan")), ("device", "gpu0"),
    ("max_skip_frac", -0.1), ("max_skip_frac", 1.0), ("max_skip_frac", float("nan")),
])
def test_train_config_refuses_bad_flags_naming_them(field, value):
    from flextron.train import TrainConfig

    with pytest.raises(FlextronError, match="--" + field.replace("_", "-")):
        TrainConfig(run="r", **{field: value})


def test_train_refuses_a_device_this_machine_lacks(tiny_run):
    from flextron.train import TrainConfig, train

    with pytest.raises(FlextronError, match="--device cuda:99"):
        train(TrainConfig(run=str(tiny_run), device="cuda:99"))


def test_distill_loss_matches_a_hand_computed_value():
    """Two-token vocabulary, one predicted position: student logits (0, 0) give (1/2, 1/2), teacher
    logits (ln 3, 0) give (3/4, 1/4) at T=1; at T=2 the teacher is (√3, 1)/(√3 + 1)."""
    import math

    import torch

    from flextron.train import distill_loss

    student = torch.tensor([[[0.0, 0.0], [5.0, -5.0]]])  # the last position predicts nothing
    teacher = torch.tensor([[[math.log(3.0), 0.0], [-5.0, 5.0]]])
    labels = torch.tensor([[1, 0]])  # position 0 predicts token 0
    ce = math.log(2.0)
    kl_t1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    p = math.sqrt(3.0) / (math.sqrt(3.0) + 1.0)
    kl_t2 = (p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)) * 2.0 ** 2  # T^2 keeps gradients in scale
    assert distill_loss(student, teacher, labels, 0.0, 1.0).item() == pytest.approx(ce, abs=1e-6)
    assert distill_loss(student, teacher, labels, 1.0, 1.0).item() == pytest.approx(kl_t1, abs=1e-6)
    assert distill_loss(student, teacher, labels, 0.9, 1.0).item() == pytest.approx(0.9 * kl_t1 + 0.1 * ce, abs=1e-6)
    assert distill_loss(student, teacher, labels, 1.0, 2.0).item() == pytest.approx(kl_t2, abs=1e-6)


def test_train_writes_metrics_checkpoint_and_trained_weights(trained_run):
    from flextron.elastic import ElasticModel

    rows = list(csv.DictReader(open(trained_run / "train" / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert int(rows[-1]["tokens"]) == 4 * 2 * 64
    assert all(float(r["loss_full"]) > 0 and float(r["loss_smallest"]) > 0 for r in rows)
    trained = ElasticModel.load(trained_run / "trained")
    one_shot = ElasticModel.load(trained_run / "elastic")
    diff = max((a - b).abs().max().item() for a, b in zip(trained.model.parameters(), one_shot.model.parameters()))
    assert diff > 0  # the weights moved
    assert not list((trained_run / "train").glob("*.tmp"))


TRAIN_KW = dict(steps=4, batch_size=2, seq_len=64, checkpoint_every=2, lr=1e-3)  # as trained_run was trained


def test_resume_refuses_every_changed_flag_that_shapes_training(trained_run, tmp_path):
    """A resume must repeat every flag the result depends on (--steps too: it sets the cosine
    schedule); the error names the flag, and --restart starts again from step 0."""
    from flextron.train import TrainConfig, train

    run = tmp_path / "r"
    shutil.copytree(trained_run, run)
    changes = {"steps": 6, "batch_size": 1, "seq_len": 32, "grad_accum": 2, "random_configs": 1, "lr": 2e-3,
               "weight_decay": 0.1, "warmup": 2, "distill_weight": 0.5, "temperature": 2.0, "seed": 1,
               "corpus": "pydoc", "max_skip_frac": 0.0, "grad_clip": 0.5, "min_lr_frac": 0.2}
    for name, value in changes.items():
        flag = "--" + name.replace("_", "-")
        with pytest.raises(FlextronError, match=rf"{flag} .*, now {value}.*--restart"):
            train(TrainConfig(run=str(run), **{**TRAIN_KW, name: value}))
    # a resume that repeats the flags (checkpoint_every may change) trains nothing more
    out = train(TrainConfig(run=str(run), **{**TRAIN_KW, "checkpoint_every": 3}))
    assert out["resumed"] and out["steps"] == 4
    assert [int(r["step"]) for r in csv.DictReader(open(run / "train" / "metrics.csv"))] == [1, 2, 3, 4]
    out = train(TrainConfig(run=str(run), **{**TRAIN_KW, "steps": 2, "restart": True}))
    assert not out["resumed"] and out["steps"] == 2
    assert [int(r["step"]) for r in csv.DictReader(open(run / "train" / "metrics.csv"))] == [1, 2]
    assert json.loads((run / "train" / "train_config.json").read_text())["steps"] == 2


def test_resume_after_an_interruption_between_checkpoints_keeps_one_row_per_step(tiny_run, tmp_path, monkeypatch):
    """Metrics written after the last checkpoint (steps that will run again) are not duplicated."""
    import flextron.train as tr

    run = tmp_path / "r"
    shutil.copytree(tiny_run, run)
    real_save = tr.save_checkpoint

    def stop_at_step_4(folder, elastic, opt=None, state=None):
        if state is not None and state["step"] == 4:  # rows 3 and 4 are written; the checkpoint is at 2
            raise KeyboardInterrupt
        real_save(folder, elastic, opt, state)

    monkeypatch.setattr(tr, "save_checkpoint", stop_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        tr.train(tr.TrainConfig(run=str(run), **{**TRAIN_KW, "steps": 6}))
    metrics = run / "train" / "metrics.csv"
    assert [int(r["step"]) for r in csv.DictReader(open(metrics))] == [1, 2, 3, 4]
    monkeypatch.setattr(tr, "save_checkpoint", real_save)
    out = tr.train(tr.TrainConfig(run=str(run), **{**TRAIN_KW, "steps": 6}))
    assert out["resumed"] and out["tokens"] == 6 * 2 * 64
    assert [int(r["step"]) for r in csv.DictReader(open(metrics))] == [1, 2, 3, 4, 5, 6]


def test_train_uses_the_runs_corpus_unless_told(tiny_run, tmp_path, monkeypatch):
    import flextron.data
    from flextron.train import TrainConfig, train

    run = tmp_path / "r"
    shutil.copytree(tiny_run, run)
    convert_cfg = json.loads((run / "convert_config.json").read_text())
    (run / "convert_config.json").write_text(json.dumps({**convert_cfg, "corpus": "pydoc"}))
    seen, real = [], flextron.data.token_windows
    monkeypatch.setattr(flextron.data, "token_windows", lambda *a, **k: seen.append(a[5]) or real(*a, **k))
    train(TrainConfig(run=str(run), **{**TRAIN_KW, "steps": 1}))
    assert seen == ["pydoc"]
    assert json.loads((run / "train" / "train_config.json").read_text())["corpus"] == "pydoc"


def test_distill_loss_is_zero_kl_for_identical_logits():
    import torch

    from flextron.train import distill_loss

    logits = torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    ce = distill_loss(logits, logits, ids, 0.0, 1.0)
    assert distill_loss(logits, logits, ids, 1.0, 2.0).abs().item() < 1e-6
    assert abs(distill_loss(logits, logits, ids, 0.5, 1.0).item() - 0.5 * ce.item()) < 1e-5


@pytest.mark.gpu
def test_train_on_cuda(tiny_run, tmp_path):
    """The CUDA path: bf16 autocast training steps."""
    from flextron.train import TrainConfig, train

    run = tmp_path / "r"
    shutil.copytree(tiny_run, run)
    out = train(TrainConfig(run=str(run), steps=3, batch_size=2, seq_len=64, checkpoint_every=2, device="cuda"))
    assert out["steps"] == 3


def test_sandwich_samples_depth_within_the_share_and_replays_per_step():
    """With depth on, the random configs skip 0 up to the share of layers (rounded down), every count
    occurs, never all layers; full and smallest keep every layer; a step's seed gives the same configs."""
    from flextron.spec import ElasticSpec
    from flextron.train import max_skip_layers, sandwich_configs, step_rng

    spec = ElasticSpec.build("llama", 10, 64, 256, 8, 4, 16, 100)
    max_skip = max_skip_layers(0.45, spec.num_layers)
    assert max_skip == 4 and max_skip_layers(0.29, 100) == 29 and max_skip_layers(0.9, 2) == 1
    counts = []
    for step in range(50):
        configs = sandwich_configs(spec, step_rng(7, step), 3, max_skip)
        assert configs == sandwich_configs(spec, step_rng(7, step), 3, max_skip)
        assert [name for name, _ in configs] == ["full", "smallest", "random", "random", "random"]
        assert configs[0][1] == spec.full() and configs[1][1] == spec.smallest()
        counts += [len(sub.skip) for _, sub in configs[2:]]
    assert set(counts) == {0, 1, 2, 3, 4}
    assert sandwich_configs(spec, step_rng(7, 0), 3, max_skip) != sandwich_configs(spec, step_rng(7, 1), 3, max_skip)


def test_sandwich_without_depth_is_the_one_trained_before():
    """--max-skip-frac 0 samples exactly the configs of the widths-only sandwich (pinned: seed 0, step 3)."""
    from flextron.spec import ElasticSpec, SubnetConfig
    from flextron.train import max_skip_layers, sandwich_configs, step_rng

    spec = ElasticSpec.build("llama", 4, 64, 256, 8, 4, 16, 100)
    assert max_skip_layers(0.0, spec.num_layers) == 0
    assert sandwich_configs(spec, step_rng(0, 3), 2, 0) == [
        ("full", SubnetConfig((256,) * 4, (8,) * 4)),
        ("smallest", SubnetConfig((64,) * 4, (2,) * 4)),
        ("random", SubnetConfig((128, 128, 192, 256), (2, 2, 8, 6))),
        ("random", SubnetConfig((128, 128, 256, 256), (8, 4, 4, 4))),
    ]


def _configs_trained(monkeypatch, run, **kw) -> list:
    """Train `run` with `kw`, recording the config of every forward pass of the student."""
    import flextron.elastic
    from flextron.train import TrainConfig, train

    seen, real = [], flextron.elastic.ElasticModel.set_config
    monkeypatch.setattr(flextron.elastic.ElasticModel, "set_config", lambda self, c: seen.append(c) or real(self, c))
    out = train(TrainConfig(run=str(run), **kw))
    return out, seen


def test_training_runs_depth_configs_unless_max_skip_frac_is_0(tiny_run, tmp_path, monkeypatch, one_thread):
    """Default training runs sub-networks that skip a layer (tiny-llama: 3 layers, 0.4 -> at most 1);
    at --max-skip-frac 0 none does."""
    run = tmp_path / "r"
    shutil.copytree(tiny_run, run)
    out, seen = _configs_trained(monkeypatch, run, steps=2, **KW)
    assert out["max_skip_layers"] == 1 and {len(c.skip) for c in seen} == {0, 1}
    out, seen = _configs_trained(monkeypatch, run, steps=2, restart=True, max_skip_frac=0.0, **KW)
    assert out["max_skip_layers"] == 0 and seen and {len(c.skip) for c in seen} == {0}


def test_a_sub_network_that_skips_a_layer_trains_the_others_not_it(tiny_run, tmp_path, monkeypatch, one_thread):
    """Steps whose sub-networks all skip layer 1 leave its weights exactly as they were and move every
    other layer's (weight decay on: a skipped layer is not even decayed)."""
    import flextron.train as tr
    from flextron.elastic import ElasticModel

    run = tmp_path / "r"
    shutil.copytree(tiny_run, run)
    monkeypatch.setattr(tr, "sandwich_configs", lambda spec, rng, n, max_skip: [
        ("full", spec.depth([1])), ("smallest", spec.depth([1], spec.smallest()))])
    tr.train(tr.TrainConfig(run=str(run), steps=2, random_configs=0, weight_decay=0.1, **KW))
    before, after = (dict(ElasticModel.load(run / d).model.named_parameters()) for d in ("elastic", "trained"))
    moved = {name for name in before if not (before[name] == after[name]).all()}
    assert moved and not any(".layers.1." in name for name in moved)
    assert {int(name.split(".layers.")[1].split(".")[0]) for name in moved if ".layers." in name} == {0, 2}


def test_resuming_a_run_trained_before_depth_sampling_needs_max_skip_frac_0(trained_run, tmp_path):
    """A train_config.json without max_skip_frac was trained with widths only: resuming it at the
    default is refused, naming the flag and value that resume it; with them it resumes and records 0."""
    from flextron.train import TrainConfig, train

    run = tmp_path / "r"
    shutil.copytree(trained_run, run)
    path = run / "train" / "train_config.json"
    saved = json.loads(path.read_text())
    del saved["max_skip_frac"]
    path.write_text(json.dumps(saved))
    with pytest.raises(FlextronError, match=r"before depth sampling .* --max-skip-frac 0, now 0.4.*Pass "
                                            r"--max-skip-frac 0 to resume, or --restart"):
        train(TrainConfig(run=str(run), **TRAIN_KW))
    out = train(TrainConfig(run=str(run), **TRAIN_KW, max_skip_frac=0.0))
    assert out["resumed"] and out["steps"] == 4
    assert json.loads(path.read_text())["max_skip_frac"] == 0.0


def test_restart_with_a_flag_that_cannot_work_removes_nothing(trained_run, tmp_path):
    """`--restart` removes the training results only after every other flag was checked: a missing
    --teacher-data set or corpus is refused first, and train/ and trained/ are still there."""
    from flextron.train import TrainConfig, train

    run = tmp_path / "r"
    shutil.copytree(trained_run, run)
    before = sorted(p.relative_to(run) for p in (run / "trained").rglob("*"))
    with pytest.raises(FlextronError, match="--teacher-data seed9.*flextron synth"):
        train(TrainConfig(run=str(run), **{**TRAIN_KW, "restart": True, "teacher_data": "seed9", "teacher_mix": 0.5}))
    with pytest.raises(FlextronError, match="corpus .*missing.txt"):
        train(TrainConfig(run=str(run), **{**TRAIN_KW, "restart": True, "corpus": str(tmp_path / "missing.txt")}))
    assert sorted(p.relative_to(run) for p in (run / "trained").rglob("*")) == before
    assert (run / "train" / "metrics.csv").is_file()


def test_the_schedule_and_the_clip_are_flags():
    """Warm-up to --lr, cosine down to --min-lr-frac of it at the last step; --grad-clip and
    --min-lr-frac are validated (a saved train_config.json reproduces the run)."""
    from flextron.train import TrainConfig, _lr_at

    cfg = TrainConfig(run="r", steps=10, warmup=2, lr=1e-3, min_lr_frac=0.25)
    assert _lr_at(0, cfg) == pytest.approx(5e-4) and _lr_at(2, cfg) == pytest.approx(1e-3)
    assert _lr_at(10, cfg) == pytest.approx(2.5e-4) and _lr_at(6, cfg) == pytest.approx(6.25e-4)
    for bad in ({"grad_clip": -1.0}, {"min_lr_frac": 1.5}, {"min_lr_frac": float("nan")}):
        flag = "--" + next(iter(bad)).replace("_", "-")
        with pytest.raises(FlextronError, match=flag):
            TrainConfig(run="r", **bad)
