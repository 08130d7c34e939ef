"""Data-parallel `flextron train` under torchrun (gloo on the CPU): two processes train what one
does (the same global batch, split between them, with sub-networks that skip layers), rank 0 alone
writes, and a run stopped under torchrun resumes, under torchrun or in one process."""

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flextron.errors import FlextronError

REPO = Path(__file__).resolve().parents[2]
# Every process computes on one thread: on a busy 2-core machine more threads oversubscribe, and one
# thread keeps each process's float summation order fixed.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
# Two micro-batches of four configs: eight backward passes per step, all-reduced once. Depth sampling
# on (tiny-llama: 3 layers, 0.4 -> the random configs skip up to 1).
KW = dict(steps=6, batch_size=4, grad_accum=2, seq_len=32, lr=1e-3, warmup=1, checkpoint_every=2, device="cpu",
          max_skip_frac=0.4)
# Measured: 1 and 2 processes differ by at most 1.3e-7 (relative) in a logged loss, 1.5e-6 in a
# weight (the weights move by 3.7e-3); with depth sampling on, 4.3e-7 and 3.9e-6 (they move by
# 4.2e-3). Training on the wrong windows (both processes on the first half of the batch) moves the
# step-1 losses by 5e-3 to 2e-2, and logging rank 0's own loss moves them by about 1e-2.
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-4
STOP_AFTER_STEP_4 = """
    import sys

    import flextron.train as tr
    from flextron.cli import main

    real_save = tr.save_checkpoint

    def save_then_stop(folder, elastic, opt=None, state=None):  # only rank 0 saves: it stops, the job ends
        real_save(folder, elastic, opt, state)
        if state is not None and state["step"] == 4:
            raise KeyboardInterrupt

    tr.save_checkpoint = save_then_stop
    sys.exit(main(sys.argv[1:]))
"""




def _torchrun(target: list[str], run: Path) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 TARGET -- train --run RUN ...` with this interpreter. The `--`
    keeps torchrun's own parser off `--run` (it reads it as an abbreviation of its `--run-path`)."""
    args = [f"--{k.replace('_', '-')}={v}" for k, v in KW.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *target, "--",
           "train", f"--run={run}", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=ONE_THREAD, timeout=300)


def _rows(run: Path) -> list[dict]:
    return list(csv.DictReader(open(run / "train" / "metrics.csv")))


def _assert_same_curve(rows: list[dict], reference: list[dict]) -> None:
    for r, ref in zip(rows, reference, strict=True):
        assert r["tokens"] == ref["tokens"] and r["lr"] == ref["lr"]
        for k in ("loss_full", "loss_smallest", "loss_random", "grad_norm"):
            assert float(r[k]) == pytest.approx(float(ref[k]), rel=LOSS_RTOL), (r["step"], k)


def test_two_processes_train_what_one_does_and_resume(tiny_run, tmp_path, one_thread):
    """torchrun with 2 processes, stopped after the step-4 checkpoint and resumed, logs the loss
    curve of one process (one row per step, written once), ends with its weights, and can be resumed
    by one process (the process count is no resume flag)."""
    from flextron.elastic import SPEC_FILE, ElasticModel
    from flextron.spec import ElasticSpec
    from flextron.train import TrainConfig, max_skip_layers, sandwich_configs, step_rng, train

    # DDP all-reduces in a step's last backward: where its sub-network skips a layer, that layer's
    # gradient (from the step's other backwards) must be all-reduced too, before the resume and after
    spec = ElasticSpec.load(tiny_run / "elastic" / SPEC_FILE)
    max_skip = max_skip_layers(KW["max_skip_frac"], spec.num_layers)
    last = [sandwich_configs(spec, step_rng(0, step), 2, max_skip)[-1][1] for step in range(KW["steps"])]
    assert any(cfg.skip for cfg in last[:4]) and any(cfg.skip for cfg in last[4:])

    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(tiny_run, one)
    shutil.copytree(tiny_run, two)
    train(TrainConfig(run=str(one), **KW))
    reference = _rows(one)

    script = tmp_path / "stop_after_step_4.py"
    script.write_text(textwrap.dedent(STOP_AFTER_STEP_4))
    p = _torchrun([str(script)], two)
    assert p.returncode != 0 and "flextron train: interrupted" in p.stderr, p.stderr[-3000:]
    state = json.loads((two / "train" / "ckpt" / "state.json").read_text())
    assert state["step"] == 4 and state["world_size"] == 2
    stopped = _rows(two)
    assert [int(r["step"]) for r in stopped] == [1, 2, 3, 4]  # written by rank 0 alone
    assert not (two / "trained").exists()
    _assert_same_curve(stopped, reference[:4])

    p = _torchrun(["-m", "flextron"], two)
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(p.stdout.strip().splitlines()) == 1  # one summary (rank 0's), not one per process
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["resumed"] and summary["steps"] == 6 and summary["world_size"] == 2
    assert summary["tokens"] == 6 * KW["batch_size"] * KW["grad_accum"] * KW["seq_len"]  # global tokens
    rows = _rows(two)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6] and rows[:4] == stopped
    _assert_same_curve(rows, reference)
    assert json.loads((two / "train" / "ckpt" / "state.json").read_text())["world_size"] == 2
    m1, m2 = ElasticModel.load(one / "trained").model, ElasticModel.load(two / "trained").model
    assert max((a - b).abs().max().item() for a, b in zip(m1.parameters(), m2.parameters())) < WEIGHT_ATOL

    out = train(TrainConfig(run=str(two), **KW))
    assert out["resumed"] and out["steps"] == 6 and out["world_size"] == 1


def test_a_batch_that_does_not_split_over_the_processes_is_refused(tiny_run, monkeypatch):
    """Refused by every process before any process group is made, naming the fix."""
    import torch.distributed as dist

    from flextron.train import TrainConfig, train

    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):  # as torchrun sets them
        monkeypatch.setenv(name, value)
    with pytest.raises(FlextronError, match=r"--batch-size 3 is the global batch .* 2 processes.*\(such as 4\)"):
        train(TrainConfig(run=str(tiny_run), batch_size=3, device="cpu"))
    assert not dist.is_initialized() and not (tiny_run / "train").exists()


def test_shards_are_contiguous_and_weighted_to_the_whole_batch_mean():
    """Even shares weigh 1; a short last batch splits unevenly, and the weights make the mean over
    processes of weight x the share's mean the whole batch's mean; a process left without rows runs
    one at weight 0."""
    import torch

    from flextron.distributed import World

    batch = torch.arange(4.0)[:, None]
    shards = [World(rank, 2).shard(batch) for rank in range(2)]
    assert [s.flatten().tolist() for s, _ in shards] == [[0.0, 1.0], [2.0, 3.0]] and [w for _, w in shards] == [1, 1]
    short = torch.tensor([[1.0], [2.0], [6.0]])
    shards = [World(rank, 2).shard(short) for rank in range(2)]
    assert [s.flatten().tolist() for s, _ in shards] == [[1.0, 2.0], [6.0]]
    assert sum(w * s.mean().item() for s, w in shards) / 2 == pytest.approx(3.0)
    assert World(1, 2).shard(short[:1]) == (short[:1], 0.0)
    assert World().shard(short) == (short, 1.0)
