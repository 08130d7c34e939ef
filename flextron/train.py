"""`flextron train`: elastic continued training ("sandwich" distillation).

Each optimiser step trains the full model, the smallest sub-network and a few sampled
heterogeneous ones on the same batch of train-split tokens; the sampled ones also skip up to
`--max-skip-frac` of the layers (depth), so that skipping layers is trained too. The loss of every
sub-network is a mix of distillation from the frozen original model's logits (KL at temperature T)
and the plain LM loss. One set of weights comes out that serves every width: `RUN/trained/`, in the same format
as `RUN/elastic/`, which later stages use by default (`--weights auto`).

Checkpoints (`RUN/train/ckpt/`: model, AdamW state and the step, all safetensors/JSON) are built
aside and swapped in every `checkpoint_every` steps; a run killed or stopped resumes from the last
one and trains up to `--steps` in total. The config is saved when training starts
(`RUN/train/train_config.json`) and a resume must repeat every flag that shapes the result
(`RESUME_FIELDS`, `--steps` included: it sets the cosine schedule); `--restart` starts again.
`RUN/train/metrics.csv` has one row per step; tokens used (the paper's cost measure) are counted
and reported.

Launched by `torchrun --nproc-per-node N -m flextron -- train ...`, training is data-parallel
(`flextron.distributed`, DistributedDataParallel): `--batch-size` stays the global micro-batch and
each process trains its contiguous share of the windows one process would take, so a step updates
the weights as one process would (up to float summation order), and a run may resume under another
process count. Rank 0 alone writes files; the logged losses are means over all processes. A
sub-network that skips layers gives their weights no gradient, so DDP then looks for unused
parameters in each step's synchronising backward.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from flextron.devices import set_device_field
from flextron.errors import FlextronError
from flextron.rundir import check_finite
from flextron.spec import SubnetConfig

TRAIN_DIR = "train"
TRAINED_DIR = "trained"
METRICS = "metrics.csv"
CONFIG_FILE = "train_config.json"
# Flags a resumed run must repeat: each changes the weights it ends with (`--steps` through the
# cosine schedule). `checkpoint_every` and `device` may change between runs (moving a run to
# another machine is a resume).
RESUME_FIELDS = ("steps", "batch_size", "seq_len", "grad_accum", "random_configs", "max_skip_frac", "lr",
                 "weight_decay", "warmup", "distill_weight", "temperature", "seed", "corpus", "teacher_data",
                 "teacher_mix", "grad_clip", "min_lr_frac")


@dataclass(frozen=True)
class TrainConfig:
    run: str  #: the run directory (made by `flextron convert`); writes RUN/train/ and RUN/trained/
    steps: int = 40  #: optimiser steps in total; a resumed run continues up to this (and must repeat it)
    batch_size: int = 4  #: windows per micro-batch, over all processes when torchrun starts several
    seq_len: int = 128  #: tokens per window
    grad_accum: int = 1  #: micro-batches per optimiser step
    random_configs: int = 2  #: sampled heterogeneous sub-networks per step, besides the full and the smallest
    #: largest share of the layers a sampled sub-network skips (each skips 0 up to this many, rounded down, drawn
    #: uniformly; Minitron prunes up to half the depth); 0: widths only
    max_skip_frac: float = 0.4
    lr: float = 5e-5  #: AdamW peak learning rate (linear warm-up, then cosine decay)
    weight_decay: float = 0.0  #: AdamW weight decay
    warmup: int = 4  #: warm-up steps
    min_lr_frac: float = 0.1  #: the cosine decays to this share of --lr (0 to 1)
    grad_clip: float = 1.0  #: largest global gradient norm (clipped above it); 0: no clipping
    distill_weight: float = 0.9  #: share of the KL-to-teacher term in the loss; the rest is the LM loss
    temperature: float = 1.0  #: distillation temperature
    checkpoint_every: int = 10  #: write a resumable checkpoint every this many steps
    device: str = "auto"  #: cpu, cuda, cuda:N, or auto (CUDA when present, and says so)
    seed: int = 0  #: seed of data order and sampled sub-networks
    corpus: str = ""  #: training text; empty: the corpus the run was converted with
    #: a `flextron synth` set (its folder name under RUN/data/teacher/, e.g. seed0) mixed into the windows
    teacher_data: str = ""
    teacher_mix: float = 0.0  #: share of the training windows taken from --teacher-data (0 to 1); 0: real text only
    restart: bool = False  #: start again (removes RUN/train/ and RUN/trained/) instead of resuming

    def __post_init__(self):
        for name, low in (("steps", 1), ("batch_size", 1), ("seq_len", 2), ("grad_accum", 1), ("random_configs", 0),
                          ("warmup", 0), ("checkpoint_every", 1), ("weight_decay", 0), ("grad_clip", 0)):
            check_finite(name, getattr(self, name), low=low)
        check_finite("lr", self.lr, low=0, low_inclusive=False)
        check_finite("temperature", self.temperature, low=0, low_inclusive=False)
        check_finite("distill_weight", self.distill_weight, low=0, high=1)
        check_finite("min_lr_frac", self.min_lr_frac, low=0, high=1)
        check_finite("seed", self.seed)
        check_finite("teacher_mix", self.teacher_mix, low=0, high=1)
        check_finite("max_skip_frac", self.max_skip_frac, low=0, high=1)
        if self.max_skip_frac == 1:
            raise FlextronError("--max-skip-frac must be below 1: a sampled sub-network keeps at least one layer")
        if self.teacher_mix and not self.teacher_data:
            raise FlextronError("--teacher-mix takes its windows from --teacher-data: name a `flextron synth` set "
                                "(e.g. seed0)")
        if self.teacher_data and not self.teacher_mix:
            raise FlextronError(f"--teacher-data {self.teacher_data} is unused at --teacher-mix 0; give the share "
                                "of windows it should fill (e.g. --teacher-mix 0.5)")
        set_device_field(self)


def max_skip_layers(max_skip_frac: float, num_layers: int) -> int:
    """The most layers a sampled sub-network of `num_layers` skips: the share rounded down, so never
    more than it (the epsilon keeps 0.29 x 100 at 29), and never all of them."""
    return min(math.floor(max_skip_frac * num_layers + 1e-9), num_layers - 1)


def step_rng(seed: int, step: int) -> random.Random:
    """The RNG of one step's sampled sub-networks: a resumed run samples the same configs."""
    return random.Random(seed * 1_000_003 + step)


def sandwich_configs(spec, rng: random.Random, n_random: int, max_skip: int = 0) -> list[tuple[str, SubnetConfig]]:
    """The sub-networks of one step: the full one, the smallest widths, and `n_random` drawn with `rng`
    (each skipping 0..`max_skip` layers). The smallest keeps every layer: skip sets are not nested (a
    run without layer 3 does not contain one without layer 5), so no one depth bounds the others as the
    smallest widths do, and skipping layers too would train a network far below any deployed one."""
    return [("full", spec.full()), ("smallest", spec.smallest())] + [
        ("random", spec.random_config(rng, max_skip)) for _ in range(n_random)
    ]


def distill_loss(student_logits, teacher_logits, labels, distill_weight: float, temperature: float):
    """distill_weight * T^2 * KL(teacher || student) at temperature T + (1 - distill_weight) * CE."""
    import torch.nn.functional as F

    s = student_logits[:, :-1].float()
    v = s.shape[-1]
    ce = F.cross_entropy(s.reshape(-1, v), labels[:, 1:].reshape(-1))
    if distill_weight == 0:
        return ce
    t = teacher_logits[:, :-1].float()
    kl = F.kl_div(F.log_softmax(s / temperature, -1).reshape(-1, v), F.log_softmax(t / temperature, -1).reshape(-1, v),
                  log_target=True, reduction="batchmean") * temperature ** 2
    return distill_weight * kl + (1 - distill_weight) * ce


# ---- checkpoints (safetensors + JSON, never pickle) -------------------------------------------------
def save_optimizer(opt, path: Path) -> None:
    from safetensors.torch import save_file

    sd = opt.state_dict()
    tensors = {f"{idx}.{k}": v.detach().contiguous().cpu() for idx, st in sd["state"].items() for k, v in st.items()}
    save_file(tensors, str(path / "optimizer.safetensors"))
    (path / "optimizer.json").write_text(json.dumps({"param_groups": sd["param_groups"]}))


def load_optimizer(opt, path: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path / "optimizer.safetensors"))
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict(
        {"state": state, "param_groups": json.loads((path / "optimizer.json").read_text())["param_groups"]}
    )


def save_checkpoint(folder: Path, elastic, opt=None, state: dict | None = None) -> None:
    """Write weights (and optimizer and state, when given) to a temp folder, then swap it in: a kill
    never leaves half of one, and one between the swap's renames is resolved by `recover_swap`."""
    from flextron.rundir import fresh_tmp_dir, swap_in, write_json_atomic

    tmp = fresh_tmp_dir(folder)
    elastic.save(tmp)
    if opt is not None:
        save_optimizer(opt, tmp)
    if state is not None:
        write_json_atomic(tmp / "state.json", state)
    swap_in(tmp, folder)


def _unresumable(err: Exception, path: Path, run_root) -> FlextronError:
    """`path` cannot be resumed from: what is wrong with it (a FlextronError already says) and the way out."""
    if isinstance(err, FlextronError) and err.__cause__ is None:
        what = str(err)
    else:  # a library error, possibly wrapped by a loader whose advice (re-convert) does not apply here
        cause = err.__cause__ or err
        what = f"{path} is corrupt or unreadable ({type(cause).__name__}: {str(cause)[:160]})"
    return FlextronError(
        f"{what}: the checkpoint cannot be resumed; start again with `flextron train --run {run_root} --restart`"
    )


def load_checkpoint(ckpt: Path, run_root, device: str):
    """(state, student model) of checkpoint `ckpt`, or a FlextronError naming what is damaged and the
    way out (`--restart`)."""
    from flextron.elastic import ElasticModel
    from flextron.rundir import read_json

    try:
        state = read_json(ckpt / "state.json")
    except FlextronError as e:
        raise _unresumable(e, ckpt / "state.json", run_root) from None
    if not all(type(state.get(k)) in (int, float) for k in ("step", "tokens", "seconds")):
        lacking = FlextronError(f"{ckpt / 'state.json'} lacks the checkpoint's step, tokens or seconds")
        raise _unresumable(lacking, ckpt, run_root)
    try:
        return state, ElasticModel.load(ckpt, device=device)
    except Exception as e:  # noqa: BLE001 - transformers and safetensors raise many types for a damaged file
        raise _unresumable(e, ckpt, run_root) from None


def kept_metrics(path: Path, step: int) -> list[dict]:
    """The rows of `path` for steps 1..`step` (those a checkpoint at `step` has done), in order. Rows
    after it (steps run after the last checkpoint, which will run again) and a row cut short by a
    kill are dropped."""
    if not path.is_file():
        return []
    kept: list[dict] = []
    for row in csv.DictReader(path.read_text().splitlines()):
        if len(kept) == step or row.get("step") != str(len(kept) + 1) or None in row.values() or None in row:
            break
        kept.append(row)
    return kept


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    low = cfg.min_lr_frac
    return cfg.lr * (low + (1 - low) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def train(cfg: TrainConfig) -> dict:
    """Train `cfg.run`; data-parallel when torchrun started several processes. Returns the summary."""
    from flextron.distributed import World, process_group

    world = World.from_env()
    if cfg.batch_size % world.size:
        raise FlextronError(
            f"--batch-size {cfg.batch_size} is the global batch and must split evenly over the {world.size} "
            f"processes torchrun started; use a multiple of {world.size} (such as "
            f"{cfg.batch_size + world.size - cfg.batch_size % world.size}) or a --nproc-per-node that divides it"
        )
    device = world.device(cfg.device)
    with process_group(world, device):
        return _train(cfg, world, device)


def _train(cfg: TrainConfig, world, device: str) -> dict:
    import torch

    from flextron.data import check_corpus, token_windows
    from flextron.devices import check_device
    from flextron.elastic import ElasticModel
    from flextron.progress import progress
    from flextron.rundir import RunDir, check_resume, read_json, recover_swap, save_stage_config, write_text_atomic

    run = RunDir(cfg.run)
    run.require("elastic")
    check_device(device)
    cfg = dataclasses.replace(cfg, corpus=run.corpus(cfg.corpus))  # saved and compared as resolved
    check_corpus(cfg.corpus)  # what could refuse the run is checked before --restart removes anything
    if cfg.teacher_data:
        from flextron.teacher_data import META, teacher_folder

        if not (teacher_folder(run.root, cfg.teacher_data) / META).is_file():
            raise FlextronError(f"--teacher-data {cfg.teacher_data}: {teacher_folder(run.root, cfg.teacher_data)} "
                                f"holds no teacher data; make it with `flextron synth --run {run.root}`")
    out = run / TRAIN_DIR
    ckpt = out / "ckpt"
    trained = run / TRAINED_DIR
    # the trained weights go too (the config that made them is gone), and what was built on them
    if cfg.restart and world.is_main:
        built_on = [*run.root.glob("search/*/trained"), *run.root.glob("router/*/trained")]
        for path in (
            out,
            trained,
            trained.with_name(TRAINED_DIR + ".tmp"),
            trained.with_name(TRAINED_DIR + ".old"),
            *built_on,
        ):
            shutil.rmtree(path, ignore_errors=True)
    if world.is_main:
        recover_swap(ckpt)  # a kill between a checkpoint swap's renames: the complete version wins
    world.barrier()  # the others look for a checkpoint once rank 0 has removed or repaired it
    resume = (ckpt / "state.json").is_file()
    if resume:
        if not (out / CONFIG_FILE).is_file():
            raise FlextronError(
                f"{ckpt} has no {CONFIG_FILE} beside it (written by an older flextron), so a resume "
                f"cannot be checked; start again with `flextron train --run {run.root} --restart`"
            )
        try:
            saved = read_json(out / CONFIG_FILE)
        except FlextronError as e:
            raise _unresumable(e, out / CONFIG_FILE, run.root) from None
        if isinstance(saved, dict) and "max_skip_frac" not in saved and cfg.max_skip_frac:
            # saved before depth sampling existed, so trained at 0; `check_resume` skips fields it lacks
            raise FlextronError(
                f"training in {out} was started before depth sampling (its {CONFIG_FILE} has no max_skip_frac), "
                f"that is with --max-skip-frac 0, now {cfg.max_skip_frac}; resuming would mix the two. Pass "
                "--max-skip-frac 0 to resume, or --restart to start again (its results are removed)"
            )
        check_resume(out / CONFIG_FILE, cfg, RESUME_FIELDS, what=f"training in {out}")
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_stage_config(out / CONFIG_FILE, cfg)  # at the start: a killed run is resumed against it
    teacher = ElasticModel.load(run.elastic, device=device)
    teacher.check_positions(cfg.seq_len)
    for p in teacher.model.parameters():
        p.requires_grad_(False)
    if resume:
        state, student = load_checkpoint(ckpt, run.root, device)
    else:
        state, student = {"step": 0, "tokens": 0, "seconds": 0.0}, ElasticModel.load(run.elastic, device=device)
    state["world_size"] = world.size  # recorded, not compared: the global batch is the same at any count
    student.model.train()
    spec = student.spec
    params = [p for p in student.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if resume:  # a checkpoint without its AdamW moments would resume as a fresh optimizer: refused, said
        try:
            if not (ckpt / "optimizer.safetensors").is_file():
                raise FlextronError(f"{ckpt} holds no optimizer state (optimizer.safetensors is missing)")
            load_optimizer(opt, ckpt)
        except Exception as e:  # noqa: BLE001 - a damaged or missing optimizer file
            raise _unresumable(e, ckpt / "optimizer.safetensors", run.root) from None
    max_skip = max_skip_layers(cfg.max_skip_frac, spec.num_layers)
    net, no_sync = student.model, contextlib.nullcontext
    if world.size > 1:
        # A narrower width slices a prefix of the same weight, so every parameter gets a gradient in a
        # backward unless its layer is skipped. DDP all-reduces in a step's last backward only (the
        # others run under no_sync): without unused-parameter search, a skipped layer there leaves its
        # bucket unreduced (processes silently diverge, the next step fails). With it, the skipped
        # weights' gradients (summed over the step: the full model is in every step) are all-reduced
        # too; the search walks the autograd graph once per step.
        net = torch.nn.parallel.DistributedDataParallel(
            student.model, device_ids=[world.local_rank] if device.startswith("cuda") else None,
            find_unused_parameters=max_skip > 0,
        )
        no_sync = net.no_sync
    per_step = cfg.batch_size * cfg.grad_accum
    windows = token_windows(student.tokenizer, student.adapter, "train", cfg.seq_len, cfg.steps * per_step, cfg.corpus)
    teacher_windows = 0
    if cfg.teacher_mix:  # a share of the windows from the teacher's continuations, the rest real text
        from flextron.teacher_data import mixed_windows
        from flextron.teacher_data import teacher_windows as read_teacher

        total = cfg.steps * per_step
        teacher_windows = round(total * cfg.teacher_mix)
        windows = mixed_windows(windows, read_teacher(run.root, cfg.teacher_data, teacher_windows, cfg.seq_len),
                                total, cfg.seed)
    cuda = device.startswith("cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    metrics_path = out / METRICS
    fields = ["step", "tokens", "lr", "loss_full", "loss_smallest", "loss_random", "grad_norm", "seconds"]
    # the rows a resume keeps replace the file atomically (a kill now loses none), then rows are appended
    if world.is_main:
        head = io.StringIO()
        writer = csv.DictWriter(head, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept_metrics(metrics_path, state["step"]) if resume else [])
        write_text_atomic(metrics_path, head.getvalue())
    with open(metrics_path, "a", newline="") if world.is_main else contextlib.nullcontext() as fh:
        writer = csv.DictWriter(fh, fieldnames=fields) if world.is_main else None
        t0 = time.perf_counter() - state["seconds"]
        bar = progress(total=cfg.steps, desc="train", initial=state["step"], disable=not world.is_main)
        start_step = state["step"]
        for step in range(start_step, cfg.steps):
            configs = sandwich_configs(spec, step_rng(cfg.seed, step), cfg.random_configs, max_skip)
            lr = _lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            sums = {"full": 0.0, "smallest": 0.0, "random": 0.0}
            for micro in range(cfg.grad_accum):
                i0 = ((step * cfg.grad_accum + micro) * cfg.batch_size) % len(windows)
                # this process's rows; weight 1, unless a short last batch of a wrapped corpus splits unevenly
                ids, weight = world.shard(windows[i0 : i0 + cfg.batch_size])
                ids = ids.to(device)
                with torch.no_grad(), autocast:
                    t_logits = teacher(input_ids=ids, use_cache=False).logits
                for k, (name, sub) in enumerate(configs):
                    # DDP all-reduces (and averages over processes) the gradients summed over the step's
                    # backward passes once, in its last one
                    last = micro == cfg.grad_accum - 1 and k == len(configs) - 1
                    with contextlib.nullcontext() if last else no_sync():
                        with student.use(sub), autocast:  # the config is set on the modules `net` runs
                            s_logits = net(input_ids=ids, use_cache=False).logits
                        loss = distill_loss(s_logits, t_logits, ids, cfg.distill_weight, cfg.temperature)
                        (loss * weight / (len(configs) * cfg.grad_accum)).backward()
                    share = cfg.random_configs if name == "random" else 1
                    sums[name] += weight * loss.item() / (cfg.grad_accum * share)
            sums = dict(zip(sums, world.all_reduce_mean(list(sums.values()))))
            # the norm is the same everywhere, as the gradients are; with --grad-clip 0 it is measured, not clipped
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf))
            opt.step()
            opt.zero_grad(set_to_none=True)
            state["step"] = step + 1
            state["tokens"] += per_step * cfg.seq_len
            state["seconds"] = time.perf_counter() - t0
            if world.is_main:
                writer.writerow(
                    {
                        "step": step + 1,
                        "tokens": state["tokens"],
                        "lr": lr,
                        "loss_full": sums["full"],
                        "loss_smallest": sums["smallest"],
                        "loss_random": sums["random"] if cfg.random_configs else "",
                        "grad_norm": gnorm,
                        "seconds": round(state["seconds"], 2),
                    }
                )
                fh.flush()
            bar.update(1)
            bar.set_postfix(full=f"{sums['full']:.3f}", smallest=f"{sums['smallest']:.3f}")
            if state["step"] % cfg.checkpoint_every == 0 or state["step"] == cfg.steps:
                if world.is_main:
                    save_checkpoint(ckpt, student, opt, state)
                world.barrier()  # all processes leave a checkpoint step together, with the checkpoint on disk
        bar.close()
    student.model.eval()
    steps_now = state["step"] - start_step
    # unchanged weights keep their identity (weights_tag)
    if world.is_main and (steps_now or not (trained / "config.json").is_file()):
        save_checkpoint(trained, student)
    world.barrier()  # no process returns before the trained weights are there
    return {
        "run": str(run.root),
        "steps": state["step"],
        "tokens": state["tokens"],
        "world_size": world.size,
        "max_skip_layers": max_skip,  # --max-skip-frac as a layer count for this model
        "teacher_tokens": teacher_windows * cfg.seq_len,  # over the whole run (the windows it reads)
        "resumed": resume,
        "seconds": round(state["seconds"], 1),
        "trained": str(trained),
        "metrics": str(metrics_path),
    }
