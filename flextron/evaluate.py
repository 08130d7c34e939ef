"""Quality of a sub-network: mean next-token loss and perplexity on held-out windows."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from flextron.data import token_windows
from flextron.devices import check_device, set_device_field
from flextron.elastic import ElasticModel
from flextron.errors import FlextronError
from flextron.spec import ElasticSpec, SubnetConfig

ROUTERS = ("none", "static", "dynamic")


@dataclass(frozen=True)
class EvalConfig:
    run: str  #: the run directory (made by `flextron convert`)
    #: the sub-network: full | smallest | uniform:F (F of every width) | skip:L1,L2 (those layers skipped) |
    #: depth:K (the K layers whose removal costs least skipped) | a JSON file or string
    config: str = "full"
    split: str = "validation"  #: the corpus split to score (validation never overlaps training or calibration)
    seq_len: int = 256  #: tokens per window
    windows: int = 32  #: windows scored; 32 x 256 = 8192 tokens is a fast CPU default
    batch_size: int = 8  #: windows per forward
    corpus: str = ""  #: text to score; empty: the corpus the run was converted with
    device: str = "auto"  #: cpu, cuda, cuda:N, or auto (CUDA when present, and says so)
    weights: str = "auto"  #: elastic (one-shot) | trained | auto (trained when `flextron train` made it)
    #: none: score --config; static or dynamic: serve --budget-ms with the run's routers (`flextron route`)
    #: as a deployment would (dynamic: the calibrated verdict, dynamic routing or the static config that
    #: measured better) and also measure its step latency beside the full model
    router: str = "none"
    budget_ms: float = 0.0  #: with --router: the latency budget in ms of the regime's step
    regime: str = ""  #: with --router: the regime the routers serve; empty: the run's only fitted regime
    rounds: int = 5  #: with --router: interleaved timing rounds (the full model in each)
    reps: int = 5  #: with --router: timed steps per config per round
    threads: int = 0  #: CPU: torch intra-op threads while timing; 0 = one (steady on small, shared CPUs)

    def __post_init__(self):
        if self.split in ("calibration", "train"):
            raise FlextronError(
                f"--split {self.split} was seen while building the model; evaluate on validation or test"
            )
        for name in ("seq_len", "windows", "batch_size"):
            if getattr(self, name) < 1:
                raise FlextronError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise FlextronError(f"--seq-len must be at least 2 (one token predicts the next), got {self.seq_len}")
        if self.router not in ROUTERS:
            raise FlextronError(f"--router must be one of {list(ROUTERS)}, got {self.router!r}")
        if self.router != "none":
            if self.config != "full":
                raise FlextronError("--router serves a budget: give --budget-ms instead of --config")
            if not (isinstance(self.budget_ms, (int, float)) and math.isfinite(self.budget_ms) and self.budget_ms > 0):
                raise FlextronError(f"--router {self.router} needs --budget-ms above 0, got {self.budget_ms!r}")
            if self.rounds < 2 or self.reps < 1 or self.threads < 0:
                raise FlextronError("--rounds must be at least 2 (the noise floor needs two), --reps at least 1, "
                                    "--threads 0 or more")
        elif self.budget_ms:
            raise FlextronError("--budget-ms is served by a router: add --router dynamic (or static)")
        set_device_field(self)


def parse_config(spec: ElasticSpec, text: str, layer_ranking: list[int] | None = None) -> SubnetConfig:
    """`full`, `smallest`, `uniform:F` (MLP fraction), `uniform:F:H` (MLP and heads fractions),
    `skip:L1,L2,...` (the full model without those layers), `depth:K` (without the K layers whose
    removal costs the least loss: `layer_ranking`, cheapest first, from the run's quality table),
    a JSON object, or a path to a JSON file holding one."""
    text = text.strip()
    if text.startswith("skip:"):
        try:
            layers = [int(p) for p in text[5:].split(",") if p.strip()]
        except ValueError:
            raise FlextronError(f"cannot read {text!r}; write skip:LAYER,LAYER,... (e.g. skip:3,7,12)") from None
        if not layers:
            raise FlextronError(f"{text!r} names no layer; write skip:LAYER,LAYER,... (e.g. skip:3,7,12)")
        return spec.validate(spec.depth(layers))
    if text.startswith("depth:"):
        try:
            k = int(text[6:])
        except ValueError:
            raise FlextronError(f"cannot read {text!r}; write depth:K, K layers to skip (e.g. depth:6)") from None
        if not 0 <= k < spec.num_layers:
            raise FlextronError(f"{text!r}: skip between 0 and {spec.num_layers - 1} of the {spec.num_layers} layers")
        if layer_ranking is None:
            raise FlextronError(
                f"{text!r} skips the layers whose removal costs the least, which needs the run's quality table: "
                "run `flextron quality --run RUN` first, or name the layers with skip:L1,L2,..."
            )
        return spec.validate(spec.depth(layer_ranking[:k]))
    if text == "full":
        return spec.full()
    if text == "smallest":
        return spec.smallest()
    if text.startswith("uniform:"):
        parts = text.split(":")[1:]
        try:
            fracs = [float(p) for p in parts]
        except ValueError:
            raise FlextronError(f"cannot read {text!r}; write uniform:0.5 or uniform:0.5:0.67") from None
        if len(fracs) not in (1, 2):
            raise FlextronError(f"cannot read {text!r}; write uniform:MLP_FRACTION[:HEADS_FRACTION]")
        return spec.uniform(*fracs)
    if text.startswith("{"):
        return spec.validate(SubnetConfig.from_json(text))
    path = Path(text)
    if not path.is_file():
        raise FlextronError(
            f"config {text!r} is not full, smallest, uniform:FRACTION, skip:LAYERS, depth:K, a JSON object, or an "
            "existing JSON file"
        )
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FlextronError(f"config file {path} is not valid JSON ({type(e).__name__}: {str(e)[:120]})") from None
    if isinstance(obj, dict) and "config" in obj and isinstance(obj["config"], dict):
        obj = obj["config"]  # accept lookup rows and export records, which wrap the config
    return spec.validate(SubnetConfig.from_dict(obj))


@torch.no_grad()
def mean_loss(
    elastic: ElasticModel, cfg: SubnetConfig, windows: torch.Tensor, batch_size: int = 8, after_batch=None
) -> float:
    """Mean next-token cross-entropy (nats) of `cfg` over `windows` [n, seq_len]; `after_batch()`,
    when given, runs after each batch's forward (e.g. to read what routing modules recorded)."""
    total, count = 0.0, 0
    with elastic.use(cfg):
        for ids in windows.split(batch_size):
            ids = ids.to(elastic.device)
            logits = elastic(input_ids=ids, use_cache=False).logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
            total += loss.item()
            count += ids[:, 1:].numel()
            if after_batch is not None:
                after_batch()
    return total / count


def perplexity(loss: float) -> float:
    return math.exp(loss)


def evaluate(cfg: EvalConfig) -> dict:
    from flextron.rundir import RunDir

    run = RunDir(cfg.run)
    wname, wdir = run.weights(cfg.weights)
    check_device(cfg.device)
    elastic = ElasticModel.load(wdir, device=cfg.device)
    elastic.check_positions(cfg.seq_len)
    from flextron.quality_model import layer_ranking

    ranking = layer_ranking(run.root, wname) if cfg.config.strip().startswith("depth:") else None
    sub = parse_config(elastic.spec, cfg.config, ranking)
    corpus = run.corpus(cfg.corpus)
    windows = token_windows(elastic.tokenizer, elastic.adapter, cfg.split, cfg.seq_len, cfg.windows, corpus)
    loss = mean_loss(elastic, sub, windows, cfg.batch_size)
    return {
        "config": cfg.config,
        "weights": wname,
        "split": cfg.split,
        "corpus": corpus,
        "loss": round(loss, 5),
        "ppl": round(perplexity(loss), 4),
        "tokens": int(windows[:, 1:].numel()),
        "params": sub.param_count(elastic.spec),
    }
