"""`flextron quality`: measure the per-layer quality table of the run's weights, fit the quality
model, and report how well it ranks configs it was not fitted on.

The table (flextron/quality_model.py) is measured on calibration windows once per weights and
kept in RUN/quality/<weights>/ under a key of what it was measured from (weights tag, corpus,
windows, spec): a later run with the same key reuses it, another key measures it again. Then real
validation losses of sampled configs (their choices spread like what a search proposes: layers
skipped from the cheaper part of the ranking, narrower widths and heads in a random share of
layers) fit the model's form on `fit_configs` of them and score it on `heldout_configs` others:
Spearman rank correlation, mean absolute error. The folder is built aside and swapped in whole.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from flextron.data import corpus_label
from flextron.errors import FlextronError
from flextron.quality_model import MLP_TABLES, TABLE_FILE, quality_dir
from flextron.spec import SubnetConfig

MODEL_FILE = "quality_model.json"
EVAL_FILE = "evaluations.parquet"
CONFIG_FILE = "quality_config.json"


@dataclass(frozen=True)
class QualityConfig:
    run: str  #: the run directory (converted); the quality model goes to RUN/quality/<weights>/
    weights: str = "auto"  #: elastic (one-shot) | trained | auto (trained when `flextron train` made it)
    corpus: str = ""  #: text; empty: the corpus the run was converted with
    calib_windows: int = 2  #: calibration windows (one batch) the per-layer table is measured on
    calib_seq_len: int = 128  #: tokens per calibration window
    eval_windows: int = 4  #: validation windows per real evaluation of a sampled config
    eval_seq_len: int = 128  #: tokens per validation window
    fit_configs: int = 12  #: sampled configs whose real losses choose and fit the model's form
    #: then, with a latency model, this many rounds of: the knapsack's picks at 0.5-0.9x of the full model under
    #: the model so far are evaluated and join the fit (the configs a search starts from, where it must be right)
    calibration_rounds: int = 2
    heldout_configs: int = 30  #: other sampled configs the model is scored on (Spearman, error)
    seed: int = 0  #: seed of the sampled configs
    device: str = "auto"  #: cpu, cuda, cuda:N, or auto (CUDA when present)
    #: the precision the table and the evaluations are computed in: float32 | bfloat16 | auto (the kept quality
    #: model's, else bfloat16 where the device computes it natively: flextron.devices.resolve_eval_dtype; saved
    #: resolved)
    eval_dtype: str = "auto"
    #: the narrower MLP widths the table measures: alternate (flextron.quality_model.measured_mlp; the others
    #: filled in between them: fill_mlp) | all
    mlp_table: str = "alternate"
    #: steps of the greedy depth path measured with the table (the layers skipping costs least together, in
    #: order; it ranks layers for `depth:N` and seeds the search); -1: half of the layers; 0: none
    depth_path: int = -1
    restart: bool = False  #: measure the table again even when one with the same key is kept

    def __post_init__(self):
        from flextron.devices import check_eval_dtype, set_device_field
        from flextron.rundir import check_finite

        for name, low in (("calib_windows", 1), ("calib_seq_len", 2), ("eval_windows", 1), ("eval_seq_len", 2),
                          ("fit_configs", 0), ("heldout_configs", 3), ("seed", 0), ("calibration_rounds", 0),
                          ("depth_path", -1)):
            check_finite(name, getattr(self, name), low=low, whole=True)
        set_device_field(self)
        check_eval_dtype(self.eval_dtype)
        if self.mlp_table not in MLP_TABLES:
            raise FlextronError(f"--mlp-table must be one of {list(MLP_TABLES)}, got {self.mlp_table!r}")


def table_key(spec, wtag: str, corpus: str, windows: int, seq_len: int, dtype: str = "float32",
              mlp_table: str = "all") -> dict:
    spec_id = hashlib.sha1(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    # float32 and every MLP width: what tables made before either choice measured
    return {"weights_tag": wtag, "corpus": corpus_label(corpus), "calibration": f"{windows}x{seq_len}",
            "spec": spec_id, **({} if dtype == "float32" else {"dtype": dtype}),
            **({} if mlp_table == "all" else {"mlp_table": mlp_table})}


def sample_configs(spec, ranking: list[int], n: int, seed: int) -> list[SubnetConfig]:
    """`n` distinct configs spread like a search's candidates: 0 to half of the layers skipped, drawn
    from the cheaper two thirds of `ranking`, and a random share of the other layers at a random
    narrower MLP width or head count."""
    rng = random.Random(f"quality:{seed}")
    L = spec.num_layers
    pool = ranking[: max(1, (2 * L) // 3)]
    out, seen = [], set()
    for _ in range(50 * n + 50):
        if len(out) == n:
            break
        k = rng.randint(0, min(len(pool), L // 2))
        share = rng.uniform(0.0, 0.7)
        full = spec.full()
        widths = [rng.choice(ws) if rng.random() < share else full.mlp_width[l] for l, ws in enumerate(spec.mlp_widths)]
        heads = [rng.choice(hs) if rng.random() < share else full.heads[l] for l, hs in enumerate(spec.head_counts)]
        cfg = spec.canonical(SubnetConfig(tuple(widths), tuple(heads), tuple(rng.sample(pool, k))))
        if cfg not in seen and cfg != full:
            seen.add(cfg)
            out.append(cfg)
    return out


def path_steps(depth_path: int, num_layers: int) -> int:
    """The depth path's length: `depth_path` steps, or half of the layers for -1 (the budgets of 0.5-0.7x of
    SmolLM2's step need 11-15 of its 30 layers skipped, where the path beats single-layer deltas most)."""
    return num_layers // 2 if depth_path < 0 else depth_path


def spearman_interval(y, p, seed: int = 0, n: int = 2000) -> list[float | None]:
    """The 5th and 95th percentiles of the Spearman correlation of `y` and `p` over bootstrap resamples of
    the configs: how much the score depends on which configs happened to be held out (30 configs leave
    several hundredths either way)."""
    from scipy.stats import rankdata

    y, p = np.asarray(y, float), np.asarray(p, float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(y), size=(n, len(y)))
    ry, rp = rankdata(y[idx], axis=1), rankdata(p[idx], axis=1)
    ry, rp = ry - ry.mean(1, keepdims=True), rp - rp.mean(1, keepdims=True)
    den = np.sqrt((ry ** 2).sum(1) * (rp ** 2).sum(1))
    rho = np.divide((ry * rp).sum(1), den, out=np.full(n, np.nan), where=den > 0)
    rho = rho[np.isfinite(rho)]
    if not len(rho):  # every resample tied (too few distinct configs): no interval
        return [None, None]
    return [round(float(v), 4) for v in np.quantile(rho, [0.05, 0.95])]


def _latency_models(run_root: Path) -> list:
    """The run's fitted latency models (one per regime) when `flextron fit` made them, else []."""
    from profiler.latency_model import LatencyModels

    if not LatencyModels.fitted(run_root):
        return []
    return list(LatencyModels.load(run_root).models.values())


def _knapsack_picks(lat_models, model, spec, fractions=(0.5, 0.6, 0.7, 0.8, 0.9)) -> list[SubnetConfig]:
    """The knapsack's best config under `model` at each fraction of each regime's full model."""
    from search.knapsack import LayerTables, best_under_budget

    out = []
    for lat in lat_models:
        tables = LayerTables.build(lat, model, spec)
        full = lat.predict_config(spec.full())
        out += [c for f in fractions if (c := best_under_budget(tables, f * full)) is not None]
    return out


def load_quality_model(run_root: str | Path, weights: str, wtag: str, spec, corpus: str | None = None):
    """(QualityModel, metrics) of `weights`, or a FlextronError naming the command that (re)builds it
    when there is none or it was measured on other weights (or, with `corpus`, on another text)."""
    from flextron.quality_model import QualityModel, QualityTable
    from flextron.rundir import read_json, recover_swap

    folder = quality_dir(run_root, weights)
    recover_swap(folder)
    if not (folder / MODEL_FILE).is_file():
        raise FlextronError(f"no quality model for the {weights} weights in {folder}; run "
                            f"`flextron quality --run {run_root} --weights {weights}`")
    table = QualityTable.load(folder / TABLE_FILE)
    if table.key.get("weights_tag") != wtag:
        raise FlextronError(f"the quality model in {folder} was measured on other {weights} weights (re-trained "
                            f"since); run `flextron quality --run {run_root} --weights {weights}` again")
    if corpus is not None and table.key.get("corpus") != corpus_label(corpus):
        raise FlextronError(f"the quality model in {folder} was measured on {table.key.get('corpus')!r}, not on "
                            f"{corpus_label(corpus)!r} (another corpus, or the text changed); run `flextron quality "
                            f"--run {run_root} --weights {weights} --corpus {corpus}`")
    d = read_json(folder / MODEL_FILE, run_root)
    return QualityModel.from_dict(d.get("model", {}), table, spec), d.get("metrics", {})


def quality(cfg: QualityConfig) -> dict:
    import pandas as pd
    from scipy.stats import spearmanr

    from flextron.data import token_windows
    from flextron.devices import check_device, resolve_eval_dtype
    from flextron.elastic import ElasticModel
    from flextron.progress import progress
    from flextron.quality_model import QualityModel, QualityTable, measure_table, with_depth_path
    from flextron.rundir import (
        RunDir,
        rebuild,
        recover_swap,
        save_stage_config,
        write_json_atomic,
        write_parquet_atomic,
    )
    from search.quality import QUALITY_CACHE, QualityEvaluator

    run = RunDir(cfg.run)
    wname, wdir = run.weights(cfg.weights)
    check_device(cfg.device)
    corpus = run.corpus(cfg.corpus)
    folder = quality_dir(run.root, wname)
    recover_swap(folder)
    dtype = resolve_eval_dtype(cfg.eval_dtype, cfg.device, None if cfg.restart else folder / CONFIG_FILE)
    cfg = replace(cfg, corpus=corpus, eval_dtype=dtype)  # saved as resolved: an absolute path, or wiki / pydoc
    t0 = time.perf_counter()
    elastic = ElasticModel.load(wdir, device=cfg.device, dtype=dtype)
    elastic.check_positions(cfg.calib_seq_len, "--calib-seq-len")
    elastic.check_positions(cfg.eval_seq_len, "--eval-seq-len")
    spec = elastic.spec
    wtag = run.weights_tag(wname)
    key = table_key(spec, wtag, corpus, cfg.calib_windows, cfg.calib_seq_len, dtype, cfg.mlp_table)
    table = None
    if (folder / TABLE_FILE).is_file() and not cfg.restart:
        try:
            kept = QualityTable.load(folder / TABLE_FILE)
            # a table that measured every MLP width (one made before the choice, too) serves an alternate one
            every = table_key(spec, wtag, corpus, cfg.calib_windows, cfg.calib_seq_len, dtype, "all")
            table = kept if kept.key in (key, every) else None
        except FlextronError as e:
            print(f"flextron quality: measuring the table again: {e}", file=sys.stderr)
    reused = table is not None
    steps = path_steps(cfg.depth_path, spec.num_layers)
    if table is None or len(table.path) != min(steps, spec.num_layers - 1):  # new, or kept without this path
        windows = token_windows(elastic.tokenizer, elastic.adapter, "calibration", cfg.calib_seq_len,
                                cfg.calib_windows, corpus)
        table = (measure_table(elastic, windows, key, progress=progress, path_steps=steps, mlp_table=cfg.mlp_table)
                 if table is None
                 else with_depth_path(table, elastic, windows, steps, progress))
    evaluator = QualityEvaluator(elastic, run / "search" / QUALITY_CACHE, cfg.eval_windows, cfg.eval_seq_len,
                                 corpus=corpus, tag=wtag)
    # sampled along the single-layer ranking, as before the depth path (held-out scores stay comparable)
    configs = sample_configs(spec, table.solo_ranking(), cfg.fit_configs + cfg.heldout_configs, cfg.seed)
    if len(configs) < cfg.fit_configs + 3:
        raise FlextronError(f"only {len(configs)} distinct configs to sample in this model; lower --fit-configs")
    losses = np.array([evaluator.loss(c) for c in progress(configs, desc="quality: real evaluations")])
    fit_idx = np.arange(min(cfg.fit_configs, len(configs)))
    test_idx = np.arange(len(fit_idx), len(configs))
    fit_cfgs, fit_y = [configs[i] for i in fit_idx], list(losses[fit_idx])
    model = QualityModel(table, spec).fit(fit_cfgs, fit_y)
    lat_models = _latency_models(run.root)
    heldout = {configs[i] for i in test_idx}  # never fitted on, whatever the knapsack picks
    for _ in range(cfg.calibration_rounds if lat_models else 0):
        picks = [c for c in dict.fromkeys(_knapsack_picks(lat_models, model, spec))
                 if c not in fit_cfgs and c not in heldout]
        if not picks:
            break
        fit_cfgs += picks
        fit_y += [evaluator.loss(c) for c in picks]
        model = QualityModel(table, spec).fit(fit_cfgs, fit_y)
    n_calibration = len(fit_cfgs) - len(fit_idx)
    configs = [configs[i] for i in test_idx] + fit_cfgs  # held-out first, then everything fitted on
    losses = np.concatenate([losses[test_idx], fit_y])
    test_idx = np.arange(len(test_idx))
    fit_idx = np.arange(len(test_idx), len(configs))
    pred = model.predict(configs)
    additive = QualityModel(table, spec, forms=("additive",)).fit([], []).predict(configs)
    y, p = losses[test_idx], pred[test_idx]
    metrics = {
        "weights": wname, "weights_tag": wtag, "corpus": corpus, "quality_setting": evaluator.setting,
        "form": model.form_, "scales": [round(float(v), 4) for v in model.scales()], "cv_mae": model.cv_mae_,
        "heldout": {"n": int(len(y)), "spearman": round(float(spearmanr(y, p).statistic), 4),
                    "spearman_ci90": spearman_interval(y, p, cfg.seed),
                    "mae_loss": round(float(np.mean(np.abs(p - y))), 4),
                    "spearman_additive": round(float(spearmanr(y, additive[test_idx]).statistic), 4)},
        "fit_configs": int(len(fit_idx)), "calibration_configs": n_calibration, "table_seconds": table.seconds,
        "table_reused": reused,
        "layer_ranking": table.layer_ranking(), "base_loss": table.base_loss,
        "depth_path": {"layers": list(table.path), "loss": [round(v, 4) for v in table.path_loss],
                       "seconds": table.path_seconds},
    }
    with rebuild(folder) as out:  # concurrent builders swap in turn, never share .tmp
        write_json_atomic(out / TABLE_FILE, table.to_dict())
        write_json_atomic(out / MODEL_FILE, {"model": model.to_dict(), "metrics": metrics})
        write_parquet_atomic(pd.DataFrame({
            "config_key": [c.key for c in configs], "config": [c.to_json() for c in configs],
            "skipped_layers": [len(c.skip) for c in configs], "loss": losses, "predicted_loss": pred,
            "additive_loss": additive, "heldout": [i in set(test_idx.tolist()) for i in range(len(configs))]}),
            out / EVAL_FILE)
        save_stage_config(out / CONFIG_FILE, cfg)
    held = metrics["heldout"]
    lo, hi = held["spearman_ci90"]
    interval = "no interval: too few distinct configs" if lo is None else f"90% interval {lo} to {hi}"
    print(f"flextron quality: held-out Spearman {held['spearman']} ({interval} over which configs were held out) "
          f"on {held['n']} configs it was not fitted on "
          f"(additive alone {held['spearman_additive']}), mean abs error {held['mae_loss']} nats; form {model.form_}",
          file=sys.stderr)
    if table.path:
        print(f"flextron quality: depth path {list(table.path)} (loss +{table.path_loss[-1]:.3f} nats with all "
              f"{len(table.path)} skipped; {table.path_seconds:.0f} s)", file=sys.stderr)
    return {"folder": str(folder), **{k: metrics[k] for k in ("weights", "form", "scales", "heldout", "fit_configs",
                                                               "table_seconds", "table_reused", "depth_path")},
            "quality_evaluations": evaluator.evaluations, "seconds": round(time.perf_counter() - t0, 1)}
