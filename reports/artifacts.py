"""Everything the report reads from a run directory, each through the reader that names a corrupt
file and the command that rebuilds it. Imports no torch: JSON, Parquet and CSV only.

The profile is read through its noun (`profiler.profile.Profile`) and the lookup through its own
(`search.lookup.Lookup`); routers (`RUN/router/<regime>/<weights>/router.json`) and training
(`RUN/train/metrics.csv`) are read as the JSON and CSV they are, since their nouns load torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from flextron.errors import FlextronError

WEIGHTS_LABEL = {"elastic": "one-shot, untrained", "trained": "trained elastic model"}


def weights_label(weights: str) -> str:
    return WEIGHTS_LABEL.get(weights, weights)


@dataclass
class RouterRun:
    """One `flextron route` result: its regime, weights and `router.json` record."""

    regime: str
    weights: str
    meta: dict
    path: Path


class Artifacts:
    """A run's artifacts for the report. Optional stages are empty (None, {} or an empty table)."""

    def __init__(self, run: Path):
        import pandas as pd

        from flextron.rundir import read_json, read_parquet, require_columns
        from flextron.spec import ElasticSpec
        from profiler.profile import Profile

        self.run = run
        self.profile = Profile.load(run)
        self.layers, self.e2e, self.device = self.profile.layers, self.profile.e2e, self.profile.device_name
        self.spec = None
        for folder in ("elastic", "trained"):
            if (run / folder / "elastic_spec.json").is_file():
                self.spec = ElasticSpec.load(run / folder / "elastic_spec.json")
                break
        self.convert = read_json(run / "convert_config.json", run) if (run / "convert_config.json").is_file() else {}
        report = run / "elastic" / "convert_report.json"
        self.convert_report = read_json(report, run) if report.is_file() else {}

        # quality models, one per weights: (weights, quality_model.json record, evaluations table)
        self.quality = []
        for path in sorted((run / "quality").glob("*/quality_model.json")):
            ev = path.with_name("evaluations.parquet")
            self.quality.append((path.parent.name, read_json(path, run),
                                 read_parquet(ev, run) if ev.is_file() else pd.DataFrame()))

        lm = run / "latency_model"
        self.preds, self.metrics = None, {}
        if (lm / "predictions.parquet").is_file() and (lm / "metrics.json").is_file():  # `fit` writes both
            self.preds = require_columns(read_parquet(lm / "predictions.parquet", run), lm / "predictions.parquet",
                                         ["regime", "measured_ms", "predicted_ms", "heldout"], run)
            self.metrics = read_json(lm / "metrics.json", run)

        # Search results, one folder per regime and weights: RUN/search/<regime>/<weights>/.
        self.searches = []  # (regime, weights, trials DataFrame, quality setting or None)
        for path in sorted(run.glob("search/*/*/trials.parquet")):
            trials = require_columns(read_parquet(path, run), path, ["study", "trial", "evaluated", "loss"], run)
            best_path = path.with_name("best.json")
            best = read_json(best_path, run) if best_path.is_file() else {}
            regime = str(best.get("regime") or (trials["regime"].iloc[0] if "regime" in trials and len(trials)
                                                 else path.parent.parent.name))
            weights = str(best.get("weights") or (trials["weights"].iloc[0] if "weights" in trials and len(trials)
                                                   else path.parent.name))
            self.searches.append((regime, weights, trials, best.get("quality_setting")))
        self.losses = self._losses()

        self.lookup = []  # LookupRow, as a deployment reads them
        if (run / "export" / "lookup.json").is_file():
            from search.lookup import Lookup

            self.lookup = Lookup.load(run).rows

        self.noise = {}
        if self.profile.noise:
            self.noise["profile"] = self.profile.noise
        if (run / "verify" / "noise.json").is_file():
            d = read_json(run / "verify" / "noise.json", run)
            self.noise["verify"] = d.get("regimes", d)

        vpath = run / "verify" / "verified.parquet"
        self.verified = pd.DataFrame()
        if vpath.is_file():
            self.verified = require_columns(read_parquet(vpath, run), vpath,
                                            ["regime", "budget_ms", "predicted_latency_ms", "measured_latency_ms",
                                             "ppl", "within_budget", "source"], run)
            for col, default in (("weights", "elastic"), ("quantile", "p50"), ("budget_frac", math.nan),
                                 ("ratio", math.nan), ("ratio_hi", math.nan), ("rounds", 0), ("verdict", ""),
                                 ("config", "")):
                if col not in self.verified.columns:
                    self.verified = self.verified.assign(**{col: default})

        self.routers = [self._router(p) for p in sorted(run.glob("router/*/*/router.json"))]
        self.training, self.train_config = self._training()

    def _losses(self) -> dict[tuple[str, str], dict[str, float]]:
        """Losses of every evaluated config per (regime, weights): each search's own quality setting,
        so trained and one-shot qualities are never mixed."""
        from flextron.rundir import rebuild_command
        from search.quality import QUALITY_CACHE, read_quality_cache

        cache = self.run / "search" / QUALITY_CACHE
        losses = {}
        for regime, weights, _, setting in self.searches:
            if setting:
                try:
                    losses[(regime, weights)] = read_quality_cache(cache, str(setting))
                except (KeyError, TypeError, AttributeError, ValueError) as e:  # lines of the wrong shape
                    raise FlextronError(f"{cache} is corrupt ({type(e).__name__}: {str(e)[:160]}); rebuild it with "
                                        f"`{rebuild_command(self.run, cache)}`") from None
        return losses

    def _router(self, path: Path) -> RouterRun:
        from flextron.rundir import corrupt_error, read_json

        meta = read_json(path, self.run)
        for key in ("static_answers", "dynamic_calibration", "static_history", "dynamic_history"):
            if not isinstance(meta.get(key) or [], list) or not all(isinstance(x, dict) for x in meta.get(key) or []):
                raise corrupt_error(path, self.run, f"{key} is not a list of records")
        return RouterRun(str(meta.get("regime") or path.parent.parent.name), str(meta.get("weights") or
                                                                                 path.parent.name), meta, path)

    def _training(self):
        """(metrics.csv as a DataFrame, train_config.json) of `flextron train`; (None, {}) when the run
        was never trained."""
        import pandas as pd

        from flextron.rundir import corrupt_error, read_json

        folder = self.run / "train"
        path = folder / "metrics.csv"
        if not path.is_file():
            return None, {}
        try:
            df = pd.read_csv(path)
        except Exception as e:  # noqa: BLE001 - pandas raises many types for a damaged file
            raise corrupt_error(path, self.run, e) from None
        if not {"step", "loss_full"} <= set(df.columns):
            raise corrupt_error(path, self.run, "no step or loss_full column")
        cfg = read_json(folder / "train_config.json", self.run) if (folder / "train_config.json").is_file() else {}
        return df, cfg

    @property
    def trained(self) -> bool:
        return (self.run / "trained" / "config.json").is_file()

    def heldout(self, regime: str) -> dict:
        """The latency model's held-out metrics for `regime`, or a corrupt-file error for metrics.json."""
        from flextron.rundir import rebuild_command

        path = self.run / "latency_model" / "metrics.json"
        try:
            m = self.metrics[regime]
            return {**{k: m["heldout"][k] for k in ("mape_pct", "max_ape_pct", "spearman", "n")},
                    "naive_mape_pct": m["naive_sum_heldout"]["mape_pct"],
                    "noise_floor_pct": m.get("ratio_noise_floor_pct") if m.get("target") == "ratio_to_full"
                    else m.get("noise_floor_pct"), "verdict": m.get("verdict", "no noise floor measured"),
                    "form": m.get("form", "scaled")}
        except (KeyError, TypeError) as e:
            raise FlextronError(f"{path} is corrupt (no held-out metrics for {regime!r}: {type(e).__name__} {e}); "
                                f"rebuild it with `{rebuild_command(self.run, path)}`") from None

    def full_ms(self, regime: str) -> float | None:
        """The full model's measured median step in `regime` (the reference of every fraction)."""
        ok = self.e2e[(self.e2e["regime"] == regime) & (self.e2e["status"] == "ok")]
        if ok.empty:
            return None
        if self.spec is not None and (ok["config_key"] == self.spec.full().key).any():
            return self.profile.full_ms(regime, self.spec)
        return float(ok.sort_values("params")["latency_ms_median"].iloc[-1])

    def measured_date(self) -> str:
        """When the profile was measured: device.json's date when it records one, else the last layer
        cell's timestamp (UTC); empty when neither is there."""
        import datetime as dt

        for key in ("date", "measured_at", "started_at", "created"):
            if self.profile.device.get(key):
                return str(self.profile.device[key])
        if "measured_at" in self.layers.columns and self.layers["measured_at"].notna().any():
            t = float(self.layers["measured_at"].max())
            return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return ""
