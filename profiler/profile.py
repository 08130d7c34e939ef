"""The Profile: what `flextron profile` measured in a run, read back for every later stage.

`RUN/profile/` holds `layers.parquet` (one row per layer cell), `e2e.parquet` (one row per
sub-network measured end to end, with its ratio to the full model from interleaved rounds),
`device.json` (device name, engine, environment), `noise.json` (noise floors per regime) and, while
a sweep runs, `parts/`. Only this module knows those names: fit, search, route, report and the
benchmarks load a `Profile` and ask it (`full_ms`, `uniform`, `tail_factor`, `regime`), so no stage
reaches into another stage's files by path. Imports no torch (the report reads it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flextron.errors import FlextronError
from flextron.spec import resolve_regime

PROFILE_DIR = "profile"
LAYERS_FILE = "layers.parquet"
E2E_FILE = "e2e.parquet"
DEVICE_FILE = "device.json"
NOISE_FILE = "noise.json"
SAMPLES_FILE = "e2e_samples.parquet"
PARTS_DIR = "parts"

LAYER_COLUMNS = ["regime", "device_name", "anchor", "status", "kind", "layer", "width", "latency_ms_median"]
E2E_COLUMNS = ["regime", "device_name", "status", "config", "config_key", "uniform", "params", "latency_ms_median",
               "cv"]


def profile_dir(run_root: str | Path) -> Path:
    return Path(run_root) / PROFILE_DIR


def profile_id(run_root: str | Path) -> str | None:
    """The content id of the run's finished profile tables (None: no finished profile). The latency
    model records the id it was fitted on; a re-profile changes it."""
    from flextron.rundir import content_id

    prof = profile_dir(run_root)
    if not (prof / LAYERS_FILE).is_file():
        return None
    return content_id(prof / LAYERS_FILE, prof / E2E_FILE)


def profiled_regimes(run_root: str | Path) -> set[str]:
    """Regime keys with rows in the run's profile: finished tables and the parts of a sweep in progress
    (so a stage can say "profiled but not fitted" while a sweep is still running)."""
    from flextron.rundir import read_parquet

    prof = profile_dir(run_root)
    keys: set[str] = set()
    for path in sorted(prof.glob("*.parquet")) + sorted((prof / PARTS_DIR).glob("*.parquet")):
        df = read_parquet(path, run_root)
        if "regime" in df.columns:
            keys.update(df["regime"].astype(str))
    return keys


@dataclass
class Profile:
    """A finished profile: the layer and end-to-end tables, the device record and the noise floors."""

    root: Path
    layers: "pd.DataFrame"  # noqa: F821
    e2e: "pd.DataFrame"  # noqa: F821
    device: dict
    noise: dict

    @classmethod
    def load(cls, run_root: str | Path, need_e2e: bool = True) -> "Profile":
        """Read `RUN/profile/`. Missing files name the command that makes them; corrupt ones the
        command that rebuilds them; a profile that mixes devices is refused."""
        import pandas as pd

        from flextron.rundir import RunDir, corrupt_error, read_json, read_parquet, require_columns

        run = RunDir(run_root)
        prof = run.require(PROFILE_DIR, LAYERS_FILE)
        layers = require_columns(read_parquet(prof / LAYERS_FILE, run.root), prof / LAYERS_FILE, LAYER_COLUMNS,
                                 run.root)
        if (prof / E2E_FILE).is_file():
            e2e = require_columns(read_parquet(prof / E2E_FILE, run.root), prof / E2E_FILE, E2E_COLUMNS, run.root)
        elif need_e2e:
            raise FlextronError(f"{prof / E2E_FILE} is missing; run `flextron profile --run {run.root}` "
                                "without --layers-only")
        else:
            e2e = pd.DataFrame(columns=E2E_COLUMNS)
        device_path = run.require(PROFILE_DIR, DEVICE_FILE) / DEVICE_FILE
        device = read_json(device_path, run.root)
        if not isinstance(device.get("device_name"), str):
            raise corrupt_error(device_path, run.root, "no device_name")
        noise = read_json(prof / NOISE_FILE, run.root) if (prof / NOISE_FILE).is_file() else {}
        devices = set(layers["device_name"]) | set(e2e["device_name"])
        if len(devices) > 1:
            raise FlextronError(f"the profile mixes devices {sorted(devices)}; fit one device per run directory")
        if devices and devices != {device["device_name"]}:
            raise corrupt_error(device_path, run.root, f"it names {device['device_name']!r} but the profile's rows "
                                f"were measured on {sorted(devices)[0]!r}")
        prof = cls(Path(run.root), layers, e2e, device, noise)
        # A regime's engine is its mode (`...:q8_0:llamacpp`); keys are data, so read, not parsed.
        other = sorted(k for k in prof.regimes if (k.endswith(":llamacpp")) != (prof.engine == "llamacpp"))
        if other:
            raise corrupt_error(device_path, run.root, f"engine {prof.engine} but regimes {other} run elsewhere")
        return prof

    @property
    def device_name(self) -> str:
        return str(self.device["device_name"])

    @property
    def engine(self) -> str:
        return str(self.device.get("engine", "torch"))

    @property
    def regimes(self) -> list[str]:
        return sorted(set(self.layers["regime"].astype(str)))

    def regime(self, regime: str | None) -> str:
        """The profiled regime key `regime` names (full key, short form, or None when only one)."""
        return resolve_regime(self.regimes, regime, "profiled",
                              fix=f"measure it with `flextron profile --run {self.root} --regime {regime}`")

    def _ok_e2e(self, regime_key: str):
        return self.e2e[(self.e2e["regime"] == regime_key) & (self.e2e["status"] == "ok")]

    def full_ms(self, regime_key: str, spec) -> float:
        """The full model's measured end-to-end median step in this regime (the reference of fractions)."""
        rows = self._ok_e2e(regime_key)
        row = rows[rows["config_key"] == spec.full().key]
        if row.empty:
            raise FlextronError(f"the full model was not measured end to end for {regime_key}; "
                                f"re-run `flextron profile --run {self.root}`")
        return float(row["latency_ms_median"].iloc[0])

    def uniform(self, regime_key: str):
        """The uniform sub-networks measured end to end in this regime (ok rows), fastest first."""
        rows = self._ok_e2e(regime_key)
        return rows[rows["uniform"].astype(bool)].sort_values("latency_ms_median").reset_index(drop=True)

    def tail_factor(self, regime_key: str, quantile: str) -> float:
        """How much longer the `quantile` of a step is than its median in this regime: the median over
        the end-to-end configs of their quantile over their median (1 for p50). The latency model
        predicts medians; a tail budget is met when median x this factor fits."""
        if quantile == "p50":
            return 1.0
        col = f"latency_ms_{quantile}"
        rows = self._ok_e2e(regime_key)
        if col not in rows.columns or rows[col].isna().all():
            raise FlextronError(f"the profile of {regime_key} has no {quantile} latencies; "
                                f"re-run `flextron profile --run {self.root} --restart`")
        return float((rows[col] / rows["latency_ms_median"]).median())
