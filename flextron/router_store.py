"""Where trained routers live, and loading them back.

Everything is stored as safetensors plus JSON in `RUN/router/<regime>/<weights>/` (a folder built
aside and swapped in whole by `search/route.py`, the `flextron route` stage). `Routers` loads the
static router and the surrogate of one regime and one set of weights, and serves budgets with them
and with the dynamic router's calibration (`Routers.serve`: see `flextron/serving.py`).
"""

from __future__ import annotations

from pathlib import Path

from flextron.dynamic_router import calibrated_point
from flextron.errors import FlextronError
from flextron.serving import Served
from flextron.spec import SubnetConfig, regime_slug
from flextron.static_router import STATIC_HIDDEN, StaticRouter, answer_static
from flextron.surrogate import SURROGATE_HIDDEN, Surrogate

ROUTERS_DIR = "router"
ROUTER_WEIGHTS = ("elastic", "trained")  # resolved weight names (`--weights auto` is resolved first)


def regime_dir(run_root: str | Path, regime_key: str, *, weights: str) -> Path:
    """RUN/router/<regime>/<weights>/: routers are keyed by the weights they were trained on too, so
    routers trained on `trained/` never serve (or seed a search over) the one-shot `elastic/` weights."""
    if weights not in ROUTER_WEIGHTS:
        raise FlextronError(f"routers are stored per resolved weights {list(ROUTER_WEIGHTS)}, got {weights!r}")
    return Path(run_root) / ROUTERS_DIR / regime_slug(regime_key) / weights


def save_tensors(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path, run_root: str | Path | None = None) -> dict:
    """The tensors of a safetensors file, or a FlextronError naming the file (missing or corrupt) and,
    given the run, the command that rebuilds it."""
    from safetensors.torch import load_file

    from flextron.rundir import rebuild_command

    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
        fix = f"rebuild it with `{rebuild_command(run_root, path)}`" if run_root is not None else "rebuild it"
        what = ("is missing" if isinstance(e, FileNotFoundError)
                else f"is corrupt or unreadable ({type(e).__name__}: {str(e)[:160]})")
        raise FlextronError(f"{path} {what}; {fix}") from None


class Routers:
    """Trained routers of one regime and one set of weights, loaded from RUN/router/<regime>/<weights>/
    (safetensors + JSON)."""

    def __init__(self, folder: Path, spec, run_root: str | Path | None = None):
        from flextron.rundir import read_json, recover_swap

        folder = Path(folder)
        recover_swap(folder)  # a `flextron route` killed while swapping its folder in
        meta_path = folder / "router.json"
        if not meta_path.is_file():
            legacy = (" (those in its parent folder predate routers kept per weights)"
                      if (folder.parent / "router.json").is_file() else "")
            raise FlextronError(f"{folder} holds no routers{legacy}; run `flextron route --run {run_root or 'RUN'} "
                                f"--regime REGIME --weights {folder.name}` first")
        self.folder, self.spec, self.run_root = folder, spec, run_root
        self._dynamic_state: dict | None = None
        self.meta = read_json(meta_path, run_root)
        L, W, H = spec.num_layers, len(spec.mlp_widths[0]), len(spec.head_counts[0])
        arch = self.meta.get("architecture", {})  # routers trained before it was recorded: the default sizes
        self.static = StaticRouter(L, W, H, arch.get("static_hidden", STATIC_HIDDEN))
        self.static.load_state_dict(load_tensors(folder / "static_router.safetensors", run_root))
        self.static.eval()
        self.surrogate = Surrogate(L, W, H, arch.get("surrogate_hidden", SURROGATE_HIDDEN))
        self.surrogate.load_state_dict(load_tensors(folder / "surrogate.safetensors", run_root))
        self.surrogate.eval()

    @classmethod
    def load(cls, run_root: str | Path, regime_key: str, spec, *, weights: str) -> "Routers":
        """The routers trained for `regime_key` on `weights` ("elastic" or "trained", already resolved)."""
        return cls(regime_dir(run_root, regime_key, weights=weights), spec, run_root)

    def dynamic_point(self, t: float) -> dict:
        """How the routers serve router input t (a fraction of the latency table's full model): the
        calibrated point's `router_frac`, static `heads`, logit `shift` and `fixed_layers`, the Budget it
        stands for (`budget_ms`, `budget_frac` of `reference_full_ms`), and its serving verdict
        (`serve`: dynamic or static, with both measurements under `selection`)."""
        calib = self.meta.get("dynamic_calibration")
        if not calib:
            raise FlextronError(f"{self.folder} has no calibrated dynamic router; re-run `flextron route`")
        return calibrated_point(calib, t)

    def dynamic_point_for(self, budget_ms: float) -> dict:
        """The calibrated point serving a Budget of `budget_ms` (resolved like search and verify do)."""
        return self.dynamic_point(budget_ms / self.meta["table"]["full_ms"])

    def serve(self, elastic, budget_ms: float) -> Served:
        """The calibrated point for `budget_ms`, ready to attach to `elastic` (the model these routers
        were trained on): dynamic routing or the static config its calibration measured better."""
        point = self.dynamic_point_for(budget_ms)
        state = None
        if point.get("serve") == "dynamic":
            if self._dynamic_state is None:
                self._dynamic_state = load_tensors(self.folder / "dynamic_router.safetensors", self.run_root)
            state = self._dynamic_state
        return Served(elastic, point, state)

    def config_for(self, budget_ms: float, predict) -> SubnetConfig:
        """The static router's config for `budget_ms` (see `answer_static`)."""
        full = self.meta.get("table", {}).get("full_ms") if self.meta.get("table", {}).get("unit") == "ms" else None
        return answer_static(self.static, self.surrogate, self.spec, budget_ms, predict, full)
