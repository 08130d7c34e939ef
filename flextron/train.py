"""`flextron train`: elastic continued training ("sandwich" distillation).

Each optimiser step trains the full model, the smallest sub-network and a few sampled
heterogeneous ones on the same batch of train-split tokens. The loss of every sub-network is a
mix of distillation from the frozen original model's logits (KL at temperature T) and the plain
LM loss. One set of weights comes out that serves every width: `RUN/trained/`, in the same format
as `RUN/elastic/`, which later stages use by default (`--weights auto`).

Checkpoints (`RUN/train/ckpt/`: model, AdamW state and the step, all safetensors/JSON) are written
atomically every `checkpoint_every` steps; a run killed or stopped resumes from the last one and
trains up to `--steps` in total. `RUN/train/metrics.csv` has one row per step; tokens used (the
paper's cost measure) are counted and reported.
"""

from __future__ import annotations

import csv
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from flextron.errors import FlextronError
from flextron.spec import SubnetConfig

TRAIN_DIR = "train"
TRAINED_DIR = "trained"
METRICS = "metrics.csv"


@dataclass(frozen=True)
class TrainConfig:
    run: str = "runs/demo"
    steps: int = 40  # optimiser steps in total (a resumed run continues up to this)
    batch_size: int = 4
    seq_len: int = 128
    grad_accum: int = 1
    random_configs: int = 2  # sampled heterogeneous sub-networks per step, besides full and smallest
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup: int = 4
    distill_weight: float = 0.9  # share of the KL-to-teacher term; the rest is the LM loss
    temperature: float = 1.0
    checkpoint_every: int = 10
    device: str = "cpu"
    seed: int = 0
    corpus: str = "wiki"
    overwrite: bool = False  # start again instead of resuming from RUN/train/ckpt

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1 or self.random_configs < 0:
            raise FlextronError("--steps, --batch-size and --grad-accum must be >= 1 and --random-configs >= 0")
        if not 0 <= self.distill_weight <= 1:
            raise FlextronError(f"--distill-weight must be in [0, 1], got {self.distill_weight}")
        if self.lr <= 0 or self.temperature <= 0:
            raise FlextronError("--lr and --temperature must be positive")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise FlextronError(f"--device must be cpu or cuda[:N], got {self.device!r}")


def sandwich_configs(spec, rng: random.Random, n_random: int) -> list[tuple[str, SubnetConfig]]:
    return [("full", spec.full()), ("smallest", spec.smallest())] + [("random", spec.random_config(rng))
                                                                     for _ in range(n_random)]


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
    opt.load_state_dict({"state": state, "param_groups": json.loads((path / "optimizer.json").read_text())["param_groups"]})


def save_checkpoint(folder: Path, elastic, opt=None, state: dict | None = None) -> None:
    """Write weights (and optimizer and state, when given) to a temp folder, then swap it in: a kill
    never leaves half of one."""
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    elastic.save(tmp)
    if opt is not None:
        save_optimizer(opt, tmp)
    if state is not None:
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def train(cfg: TrainConfig) -> dict:
    import torch

    from flextron.data import token_windows
    from flextron.elastic import ElasticModel
    from flextron.progress import progress
    from flextron.rundir import RunDir, save_stage_config

    run = RunDir(cfg.run)
    run.require("elastic")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise FlextronError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    out = run / TRAIN_DIR
    ckpt = out / "ckpt"
    if cfg.overwrite:
        shutil.rmtree(out, ignore_errors=True)
    resume = (ckpt / "state.json").is_file()
    state = json.loads((ckpt / "state.json").read_text()) if resume else {"step": 0, "tokens": 0, "seconds": 0.0}
    if resume and state.get("seq_len", cfg.seq_len) != cfg.seq_len:
        raise FlextronError(f"{ckpt} was trained with --seq-len {state['seq_len']}; resume with the same value or pass --overwrite")
    teacher = ElasticModel.load(run.elastic, device=cfg.device)
    for p in teacher.model.parameters():
        p.requires_grad_(False)
    student = ElasticModel.load(ckpt if resume else run.elastic, device=cfg.device)
    student.model.train()
    spec = student.spec
    params = [p for p in student.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if resume and (ckpt / "optimizer.safetensors").is_file():
        load_optimizer(opt, ckpt)
    per_step = cfg.batch_size * cfg.grad_accum
    windows = token_windows(student.tokenizer, student.adapter, "train", cfg.seq_len, cfg.steps * per_step, cfg.corpus)
    cuda = cfg.device.startswith("cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / METRICS
    fields = ["step", "tokens", "lr", "loss_full", "loss_smallest", "loss_random", "grad_norm", "seconds"]
    # Rows past the checkpoint (a kill between checkpoints) are dropped: those steps run again.
    kept = [r for r in csv.DictReader(metrics_path.read_text().splitlines())
            if int(r["step"]) <= state["step"]] if resume and metrics_path.is_file() else []
    with open(metrics_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)
        t0 = time.perf_counter() - state["seconds"]
        bar = progress(total=cfg.steps, desc="train", initial=state["step"])
        for step in range(state["step"], cfg.steps):
            rng = random.Random(cfg.seed * 1_000_003 + step)  # per-step RNG: a resumed run samples the same configs
            configs = sandwich_configs(spec, rng, cfg.random_configs)
            lr = _lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            sums = {"full": 0.0, "smallest": 0.0, "random": 0.0}
            for micro in range(cfg.grad_accum):
                i0 = ((step * cfg.grad_accum + micro) * cfg.batch_size) % len(windows)
                ids = windows[i0: i0 + cfg.batch_size].to(cfg.device)
                with torch.no_grad(), autocast:
                    t_logits = teacher(input_ids=ids, use_cache=False).logits
                for name, sub in configs:
                    with student.use(sub), autocast:
                        s_logits = student(input_ids=ids, use_cache=False).logits
                    loss = distill_loss(s_logits, t_logits, ids, cfg.distill_weight, cfg.temperature)
                    (loss / (len(configs) * cfg.grad_accum)).backward()
                    share = cfg.random_configs if name == "random" else 1
                    sums[name] += loss.item() / (cfg.grad_accum * share)
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
            opt.step()
            opt.zero_grad(set_to_none=True)
            state["step"] = step + 1
            state["tokens"] += per_step * cfg.seq_len
            state["seconds"] = time.perf_counter() - t0
            writer.writerow({"step": step + 1, "tokens": state["tokens"], "lr": lr, "loss_full": sums["full"],
                             "loss_smallest": sums["smallest"], "loss_random": sums["random"] if cfg.random_configs else "",
                             "grad_norm": gnorm, "seconds": round(state["seconds"], 2)})
            fh.flush()
            bar.update(1)
            bar.set_postfix(full=f"{sums['full']:.3f}", smallest=f"{sums['smallest']:.3f}")
            if state["step"] % cfg.checkpoint_every == 0 or state["step"] == cfg.steps:
                save_checkpoint(ckpt, student, opt, {**state, "seq_len": cfg.seq_len})
        bar.close()
    student.model.eval()
    trained = run / TRAINED_DIR
    save_checkpoint(trained, student)
    save_stage_config(out / "train_config.json", cfg)
    return {"run": str(run.root), "steps": state["step"], "tokens": state["tokens"], "resumed": resume,
            "seconds": round(state["seconds"], 1), "trained": str(trained), "metrics": str(metrics_path)}
