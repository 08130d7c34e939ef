"""`flextron convert`: a source model in, a permuted nested elastic checkpoint out, with measured parity."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace

import torch

from flextron import bridges as bridging
from flextron.data import BUILTIN_CORPUS, resolve_corpus, token_windows
from flextron.elastic import (
    IMPORTANCE_FILE,
    MLP_SCORES,
    SPEC_FILE,
    ElasticModel,
    identity_order,
    importance_order,
    measure_importance,
    permute_weights,
    spec_from_model,
)
from flextron.errors import FlextronError
from flextron.models import DEFAULT_MODEL, adapter_for, load_source
from flextron.progress import progress
from flextron.rundir import RunDir, fresh_tmp_dir, read_json, swap_in, write_json_atomic
from flextron.spec import DEFAULT_ALIGNMENT, DEFAULT_HEAD_CHOICES, DEFAULT_MLP_CHOICES

CONFIG_FILE = "convert_config.json"
PARITY_TOLERANCE = 1e-4
PARITY_TOLERANCE_FP64 = 1e-8
FP64_FLIP_SHARE = 0.25  # of the model's own fp32-vs-fp64 error: what fp32 roundings inside an fp64 run may add

#: What a run converted before a field existed did, so its directory is still "the same conversion"
#: (runs before --mlp-score ranked neurons by mean absolute activation).
PRE_FIELD_VALUES = {"mlp_score": "activation", "bridges": False}


@dataclass(frozen=True)
class ConvertConfig:
    out: str  #: the run directory to create (or reuse, when it holds this same conversion)
    #: a built-in name (smollm2-135m, gemma3-270m, tiny-*), a transformers folder or a .gguf file
    model: str = DEFAULT_MODEL
    alignment: int = DEFAULT_ALIGNMENT  #: elastic MLP widths are multiples of this (64 runs well on GPUs)
    mlp_choices: int = DEFAULT_MLP_CHOICES  #: how many nested MLP widths each layer may take
    head_choices: int = DEFAULT_HEAD_CHOICES  #: how many nested attention head counts each layer may take
    #: rank neurons and heads by importance on calibration text so prefixes keep the most important
    #: ones; --no-rank keeps the stored order (first-k slicing, the baseline ranking is measured against)
    rank: bool = True
    #: how MLP neurons are ranked: `output` (activation RMS times the neuron's down_proj column norm,
    #: what it adds to the residual stream) or `activation` (mean absolute activation, Minitron's)
    mlp_score: str = "output"
    #: calibration, training and evaluation text: `wiki` (Wikipedia summaries, the default), `pydoc`, a text
    #: file (paragraphs split at blank lines) or a folder of .txt files; a path is stored absolute
    corpus: str = BUILTIN_CORPUS
    #: fit a linear bridge per layer (flextron.bridges) on --calib-windows windows of the train split, kept
    #: where it predicts the calibration windows: what a sub-network that skips the layer runs in its place;
    #: --no-bridges: a skipped layer is the identity
    bridges: bool = True
    calib_windows: int = 32  #: calibration windows for the importance ranking (and train windows for the bridges)
    calib_seq_len: int = 256  #: tokens per calibration window
    overwrite: bool = False  #: replace another conversion in --out (removes every later stage's results)

    def __post_init__(self):
        for name in ("alignment", "mlp_choices", "head_choices", "calib_windows", "calib_seq_len"):
            if getattr(self, name) < 1:
                raise FlextronError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.mlp_score not in MLP_SCORES:
            raise FlextronError(f"--mlp-score {self.mlp_score!r} is not one of {list(MLP_SCORES)}")


def _check_out_dir(run: RunDir, cfg: ConvertConfig) -> dict | None:
    """Return the existing convert config if this run already converted the same thing; refuse a
    directory that holds another run or unrelated files (unless --overwrite)."""
    prev_cfg = run / CONFIG_FILE
    if prev_cfg.is_file() and (run.elastic / SPEC_FILE).is_file():
        prev = read_json(prev_cfg, run.root)
        # Fields added since the run was converted take the value the conversion had then.
        prev = {**PRE_FIELD_VALUES, **prev}
        now = {k: v for k, v in asdict(cfg).items() if k not in ("out", "overwrite")}
        differ = {k: (prev.get(k), v) for k, v in now.items() if prev.get(k) != v}
        if not differ and not cfg.overwrite:
            return prev
        if not cfg.overwrite:
            def flag(k, v):
                name = k.replace("_", "-")
                return (f"--{name}" if v else f"--no-{name}") if isinstance(v, bool) else f"--{name} {v!r}"

            said = ", ".join(f"{flag(k, a)} there, {flag(k, b)} now" for k, (a, b) in differ.items())
            raise FlextronError(
                f"{run.root} already holds a run converted from {prev.get('model')!r} with other settings ({said}); "
                "choose a new --out, pass those settings to keep using it, or pass --overwrite to replace it (its "
                "later stages are removed too)"
            )
    elif run.root.exists() and any(run.root.iterdir()) and not cfg.overwrite:
        raise FlextronError(
            f"{run.root} exists and is not an empty flextron run directory; choose a new --out or pass --overwrite"
        )
    return None


@torch.no_grad()
def _logits64(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits in float64 with eager attention (the model is cast there and back; fp32 -> fp64 ->
    fp32 is lossless). Eager, because PyTorch's CPU SDPA kernel keeps ~1e-5 of error even in fp64,
    which would hide whether the permutation itself is exact."""
    impl = model.config._attn_implementation
    model.to(torch.float64)
    model.set_attn_implementation("eager")
    try:
        return model(input_ids=ids, use_cache=False).logits
    finally:
        model.set_attn_implementation(impl)
        model.to(torch.float32)


@torch.no_grad()
def convert(cfg: ConvertConfig) -> dict:
    """Convert `cfg.model` into `cfg.out/elastic`. Returns the JSON summary (spec, parity, seconds)."""
    cfg = replace(cfg, corpus=resolve_corpus(cfg.corpus))  # saved and compared absolute
    run = RunDir(cfg.out)
    prev = _check_out_dir(run, cfg)
    if prev is not None:
        report = read_json(run.elastic / "convert_report.json", run.root)
        return {**report, "reused": True}
    t0 = time.perf_counter()
    model, tok = load_source(cfg.model)
    adapter = adapter_for(model.config)
    spec = spec_from_model(model, cfg.alignment, cfg.mlp_choices, cfg.head_choices)
    t_load = time.perf_counter() - t0

    parity_ids = token_windows(tok, adapter, "validation", 128, max_windows=2, corpus=cfg.corpus)
    ref_logits = model(input_ids=parity_ids, use_cache=False).logits
    ref_logits64 = _logits64(model, parity_ids)

    # The bridges are fitted on windows of the train split (text no one-shot stage reads: the quality table
    # measures on calibration windows) and checked against the calibration windows of the importance pass
    # (a layer's input and output do not depend on the order of its neurons).
    stats = bridging.BridgeStats(model, adapter.layers(model), bridging.eps_of(model.config)) \
        if cfg.bridges else contextlib.nullcontext()
    calib = token_windows(tok, adapter, "calibration", cfg.calib_seq_len, cfg.calib_windows, corpus=cfg.corpus) \
        if cfg.rank or cfg.bridges else None
    with stats:
        if cfg.bridges:
            stats.held_out = True
        if cfg.rank:
            importance = measure_importance(model, calib, progress=lambda it: progress(it, desc="importance"),
                                            mlp_score=cfg.mlp_score)
            order = importance_order(importance, spec.num_kv_heads)
        else:
            importance, order = None, identity_order(spec)
            if cfg.bridges:
                for ids in progress(list(calib.split(4)), desc="bridges (held out)"):
                    model(input_ids=ids, use_cache=False)
        if cfg.bridges:
            stats.held_out = False
            fit_text = token_windows(tok, adapter, "train", cfg.calib_seq_len, cfg.calib_windows, corpus=cfg.corpus)
            for ids in progress(list(fit_text.split(4)), desc="bridges"):
                model(input_ids=ids, use_cache=False)
    bridges, gains = stats.fit() if cfg.bridges else (None, None)
    permute_weights(model, order)

    # Write the new checkpoint beside the old one and swap at the end: a failure leaves the
    # previous run untouched.
    run.root.mkdir(parents=True, exist_ok=True)
    tmp = fresh_tmp_dir(run.elastic)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    spec.save(tmp / SPEC_FILE)
    if importance is not None:
        (tmp / IMPORTANCE_FILE).write_text(json.dumps({**importance, "order": order}))
    if bridges is not None:
        bridging.save_bridges(tmp, bridges)

    # Parity is measured on the checkpoint as written, reloaded the way every later stage loads it.
    elastic = ElasticModel.load(tmp)
    full_logits = elastic(input_ids=parity_ids, use_cache=False).logits
    parity = (full_logits - ref_logits).abs().max().item()
    parity64 = (_logits64(elastic.model, parity_ids) - ref_logits64).abs().max().item()
    fp32_floor = (ref_logits.double() - ref_logits64).abs().max().item()
    # The permutation reorders sums, which is exact in real arithmetic: in fp64 the difference
    # must vanish. In fp32 it may not exceed 1e-4 or, for deep models whose own fp32 rounding
    # already exceeds that, twice the original's distance from its own fp64 result.
    fp32_bound = max(PARITY_TOLERANCE, 2 * fp32_floor)
    # In fp64 the difference vanishes unless the model rounds to fp32 inside (transformers 5.x takes
    # RMSNorm and the eager softmax in fp32 whatever the dtype): a 1e-16 summation-order difference
    # can then flip one fp32 rounding, which the layers grow (1.3e-5 measured on SmolLM2, against its
    # own fp32 error of 1.1e-4). A wrong permutation is off by O(1), far above either bound.
    fp64_bound = max(PARITY_TOLERANCE_FP64, FP64_FLIP_SHARE * fp32_floor)
    if parity64 > fp64_bound or parity > fp32_bound:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FlextronError(
            f"full-width elastic logits differ from the original by {parity:.3g} in fp32 (bound {fp32_bound:.3g}) "
            f"and {parity64:.3g} in fp64 (bound {fp64_bound:.3g}); the conversion was not written. "
            "Please report this model with its config.json"
        )
    report = {
        "model": cfg.model,
        "family": spec.family,
        "spec": spec.summary(),
        "parity_max_abs_diff": parity,
        "parity_fp64_max_abs_diff": parity64,
        "parity_fp64_bound": fp64_bound,
        "fp32_noise_floor": fp32_floor,
        "parity_tokens": parity_ids.numel(),
        "ranked": cfg.rank,
        "mlp_score": cfg.mlp_score if cfg.rank else None,
        "calibration_tokens": int(calib.numel()) if calib is not None else 0,
        # per layer, the share of its held-out update the bridge predicts (0 or less: no bridge, identity)
        "bridges": None if gains is None else {"heldout_gain": gains, "layers": sum(g > 0 for g in gains),
                                               "fit_tokens": stats.tokens[0], "heldout_tokens": stats.tokens[1]},
        "load_s": round(t_load, 2),
        "convert_s": round(time.perf_counter() - t0, 2),
    }
    (tmp / "convert_report.json").write_text(json.dumps(report, indent=1))
    # Every later stage (trained weights, profile, search, verify, lookup, ...) describes the old
    # weights and would silently mix with the new ones: remove them all, then swap the new in.
    removed = run.remove_stages_after_convert()
    swap_in(tmp, run.elastic)
    write_json_atomic(run / CONFIG_FILE, asdict(cfg))
    return {**report, "reused": False, "removed_stages": removed}
