"""`flextron profile`: every layer at every allowed width, plus whole sub-networks end to end.

Layer cells run the model's own attention and MLP modules, sliced to the cell's width, with the
exact arguments the model passes them (captured from a real forward: rotary embeddings, masks, a
real static KV cache for decode). End-to-end cells run the whole sliced model. Results are written
in parts as the sweep goes, so a killed sweep resumes with no lost or duplicated rows.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

from flextron.errors import FlextronError
from flextron.spec import Regime, SubnetConfig

LAYERS_FILE = "layers.parquet"
E2E_FILE = "e2e.parquet"
DEVICE_FILE = "device.json"


@dataclass(frozen=True)
class ProfileConfig:
    run: str = "runs/demo"
    device: str = "cpu"
    regime: tuple[str, ...] = ("decode:b1:ctx256", "prefill:b1:s128")
    dtype: str = ""  # applied to regimes that name none; default float32 on CPU, bfloat16 on CUDA
    mode: str = ""  # likewise; default eager on CPU, cuda_graph on CUDA
    e2e_random: int = 16  # random heterogeneous sub-networks measured end to end (plus the uniform ones)
    seed: int = 0
    min_reps: int = 10
    min_time_ms: float = 30.0
    warmup: int = 3
    anchor_every: int = 40  # re-measure the anchor cell after this many cells, to expose drift
    energy_s: float = 0.5  # GPU: length of each energy-per-token measurement (uniform configs); 0 skips
    layers_only: bool = False

    def __post_init__(self):
        if not self.regime:
            raise FlextronError("give at least one --regime, e.g. --regime decode:b1:ctx1024")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise FlextronError(f"--device must be cpu or cuda[:N], got {self.device!r}")
        if self.e2e_random < 0 or self.min_reps < 1 or self.anchor_every < 1:
            raise FlextronError("--e2e-random must be >= 0, --min-reps and --anchor-every >= 1")

    def regimes(self) -> list[Regime]:
        cuda = self.device.startswith("cuda")
        dtype = self.dtype or ("bfloat16" if cuda else "float32")
        mode = self.mode or ("cuda_graph" if cuda else "eager")
        out = [Regime.parse(r, dtype=dtype, mode=mode) for r in self.regime]
        for r in out:
            if r.mode == "cuda_graph" and not cuda:
                raise FlextronError(f"regime {r.key}: cuda_graph mode needs --device cuda; use eager on CPU")
        return out


def random_configs(spec, n: int, seed: int) -> list[SubnetConfig]:
    rng = random.Random(seed)
    out, seen = [], set(spec.uniform_configs())
    for _ in range(20 * n + 20):  # capped: small specs have few distinct configs
        if len(out) == n:
            break
        cfg = spec.random_config(rng)
        if cfg not in seen:
            seen.add(cfg)
            out.append(cfg)
    return out


class _PartWriter:
    """Rows go to numbered Parquet parts (temp file + rename), so a killed sweep loses at most the
    cell in flight and never leaves a half-written part."""

    def __init__(self, folder: Path, prefix: str, flush_every: int = 16):
        self.folder, self.prefix, self.flush_every = folder, prefix, flush_every
        folder.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []

    def done_keys(self) -> set[str]:
        import pandas as pd

        keys = set()
        for p in sorted(self.folder.glob(f"{self.prefix}-*.parquet")):
            keys.update(pd.read_parquet(p, columns=["cell_key"])["cell_key"])
        return keys

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        import pandas as pd

        if not self.rows:
            return
        n = len(list(self.folder.glob(f"{self.prefix}-*.parquet")))
        path = self.folder / f"{self.prefix}-{n:05d}-{time.time_ns()}.parquet"
        tmp = path.with_suffix(".tmp")
        pd.DataFrame(self.rows).to_parquet(tmp, index=False)
        tmp.rename(path)
        self.rows = []

    def combine(self, out: Path) -> "pd.DataFrame":  # noqa: F821
        import pandas as pd

        parts = sorted(self.folder.glob(f"{self.prefix}-*.parquet"))
        df = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True) if parts else pd.DataFrame()
        if len(df):
            df = df.drop_duplicates("cell_key", keep="last")
            tmp = out.with_suffix(".tmp")
            df.to_parquet(tmp, index=False)
            tmp.rename(out)
        return df


class RegimeBench:
    """Inputs and captured per-layer call arguments for one regime on one device."""

    def __init__(self, elastic, regime: Regime, device: str):
        import torch

        self.torch = torch
        self.elastic, self.regime, self.device = elastic, regime, torch.device(device)
        vocab = elastic.spec.vocab_size
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (regime.batch, regime.new_tokens), generator=g).to(self.device)
        self._captures: dict[int, tuple] = {}

    def _new_cache(self):
        """A static KV cache of context+1 slots whose write position is reset by one op per call."""
        from transformers import StaticCache

        return StaticCache(config=self.elastic.model.config, max_cache_len=self.regime.seq_len + 1)

    def _pin_position(self, cache):
        torch = self.torch
        pos = torch.full((len(cache.layers),), self.regime.seq_len, dtype=torch.long, device=self.device)
        for i, layer in enumerate(cache.layers):
            layer.cumulative_length = pos[i]
        return lambda: pos.fill_(self.regime.seq_len)

    def model_kwargs(self, cache=None) -> dict:
        torch = self.torch
        kw = {"input_ids": self.ids, "logits_to_keep": 1}
        if self.regime.phase == "decode":
            ctx = self.regime.seq_len
            kw.update(past_key_values=cache, use_cache=True,
                      cache_position=torch.tensor([ctx], device=self.device),
                      position_ids=torch.full((self.regime.batch, 1), ctx, device=self.device))
        else:
            kw.update(use_cache=False)
        return kw

    def forward_fn(self, cfg: SubnetConfig):
        """A zero-argument callable running the whole sub-network once (cache initialised)."""
        el = self.elastic
        el.set_config(cfg)
        cache = self._new_cache() if self.regime.phase == "decode" else None
        kw = self.model_kwargs(cache)
        with self.torch.inference_mode():
            el.model(**kw)  # initialises the cache lazily at this config's head counts
        reset = self._pin_position(cache) if cache is not None else (lambda: None)

        def run():
            reset()
            return el.model(**kw)

        return run

    def capture(self, head_idx: int):
        """Arguments every attention and MLP module receives under uniform head choice `head_idx`."""
        if head_idx in self._captures:
            return self._captures[head_idx]
        el = self.elastic
        spec = el.spec
        cfg = SubnetConfig(spec.full().mlp_width, tuple(hs[head_idx] for hs in spec.head_counts))
        el.set_config(cfg)
        cache = self._new_cache() if self.regime.phase == "decode" else None
        attn_calls, mlp_inputs, head_in = {}, {}, {}
        hooks = []
        for i, layer in enumerate(el.adapter.layers(el.model)):
            def attn_hook(mod, args, kwargs, i=i):
                attn_calls[i] = (args, dict(kwargs))
            def mlp_hook(mod, args, i=i):
                mlp_inputs[i] = args[0].clone()
            hooks.append(el.adapter.attn_of(layer).register_forward_pre_hook(attn_hook, with_kwargs=True))
            hooks.append(el.adapter.mlp_of(layer).register_forward_pre_hook(mlp_hook))
        hooks.append(el.model.lm_head.register_forward_pre_hook(lambda m, a: head_in.setdefault("x", a[0].clone())))
        try:
            with self.torch.inference_mode():
                el.model(**self.model_kwargs(cache))
        finally:
            for h in hooks:
                h.remove()
        reset = self._pin_position(cache) if cache is not None else (lambda: None)
        self._captures[head_idx] = (attn_calls, mlp_inputs, head_in["x"], reset)
        return self._captures[head_idx]

    def cell_fn(self, layer: int, kind: str, width: int):
        el, spec = self.elastic, self.elastic.spec
        model = el.model
        if kind == "embed":
            emb = model.get_input_embeddings()
            return lambda: emb(self.ids)
        if kind == "head":
            _, _, head_x, _ = self.capture(len(spec.head_counts[0]) - 1)
            norm = model.model.norm  # the final norm sits on the inner model in every supported family
            return lambda: model.lm_head(norm(head_x))
        layer_mod = el.adapter.layers(model)[layer]
        if kind == "attn":
            head_idx = spec.head_counts[layer].index(width)
            attn_calls, _, _, reset = self.capture(head_idx)
            args, kwargs = attn_calls[layer]
            attn = el.adapter.attn_of(layer_mod)
            el.set_config(SubnetConfig(spec.full().mlp_width, tuple(hs[head_idx] for hs in spec.head_counts)))

            def run():
                reset()
                return attn(*args, **kwargs)

            return run
        if kind == "mlp":
            _, mlp_inputs, _, _ = self.capture(len(spec.head_counts[0]) - 1)
            x = mlp_inputs[layer]
            mlp = el.adapter.mlp_of(layer_mod)
            el.set_config(SubnetConfig(tuple(width if i == layer else ws[-1] for i, ws in enumerate(spec.mlp_widths)),
                                       spec.full().heads))
            return lambda: mlp(x)
        raise ValueError(kind)


def _layer_cells(spec) -> list[tuple[int, str, int]]:
    cells = [(-1, "embed", 0), (-1, "head", 0)]
    for layer in range(spec.num_layers):
        cells += [(layer, "mlp", w) for w in spec.mlp_widths[layer]]
        cells += [(layer, "attn", h) for h in spec.head_counts[layer]]
    return cells


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_sweep(elastic, out_dir: str | Path, cfg: ProfileConfig, progress=None) -> dict:
    """Measure `elastic` on cfg.device for every regime; write layers/e2e Parquet + device.json."""
    import pandas as pd
    import torch

    from profiler.telemetry import Telemetry
    from profiler.timer import Timer, TimerConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tele = Telemetry(cfg.device)
    info = tele.device_info()
    prev_info = out_dir / DEVICE_FILE
    if prev_info.is_file():
        prev = json.loads(prev_info.read_text())
        if prev.get("device_name") != info["device_name"]:
            raise FlextronError(
                f"{out_dir} holds a profile from {prev.get('device_name')!r}; this device is {info['device_name']!r}. "
                "Profile each device into its own run directory"
            )
    prev_info.write_text(json.dumps(info, indent=1))
    spec = elastic.spec
    regimes = cfg.regimes()
    rng = random.Random(cfg.seed)
    layers_w = _PartWriter(out_dir / "parts", "layers")
    e2e_w = _PartWriter(out_dir / "parts", "e2e", flush_every=4)
    done = layers_w.done_keys() | e2e_w.done_keys()
    base = {"device": str(tele.device), "device_name": info["device_name"], "model_family": spec.family}
    e2e_cfgs = spec.uniform_configs() + random_configs(spec, cfg.e2e_random, cfg.seed)
    tcfg = TimerConfig(warmup=cfg.warmup, min_reps=cfg.min_reps, min_time_s=cfg.min_time_ms / 1e3)
    n_measured = 0

    for regime in regimes:
        dtype = getattr(torch, regime.dtype)
        elastic.to(device=cfg.device, dtype=dtype)
        timer = Timer(cfg.device, regime.mode, tcfg)
        bench = RegimeBench(elastic, regime, cfg.device)
        rbase = {**base, "regime": regime.key, **{k: v for k, v in regime.to_dict().items()}}

        def measure(fn_factory, key, extra):
            nonlocal n_measured
            row = {**rbase, **extra, "cell_key": key}
            try:
                fn = fn_factory()
                before = tele.sample()
                timing = timer.measure(fn)
                after = tele.sample()
                row.update(timing.row(), status="ok")
                row.update({k: after[k] for k in ("sm_clock_mhz", "mem_clock_mhz", "power_w", "temp_c", "throttle_reasons")})
                row["throttled"] = bool(before["throttled"] or after["throttled"])
            except Exception as e:  # noqa: BLE001 - an OOM or capture failure is recorded, not fatal
                if not (_is_oom(e) or regime.mode == "cuda_graph"):
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                row.update(status="oom" if _is_oom(e) else f"error: {type(e).__name__}: {str(e)[:200]}",
                           latency_ms_median=float("nan"), n=0, samples_ms=[])
            n_measured += 1
            return row

        cells = _layer_cells(spec)
        rng.shuffle(cells)  # random order: clock drift spreads over all widths instead of biasing some
        anchor = (0, "mlp", spec.mlp_widths[0][-1])
        todo = [c for c in cells if f"{regime.key}|{c[0]}|{c[1]}|{c[2]}" not in done]
        it = progress(todo, desc=f"layers {regime.key}") if progress else todo
        for idx, (layer, kind, width) in enumerate(it):
            key = f"{regime.key}|{layer}|{kind}|{width}"
            layers_w.add(measure(lambda: bench.cell_fn(layer, kind, width), key,
                                 {"layer": layer, "kind": kind, "width": width, "anchor": False, "order": idx}))
            if (idx + 1) % cfg.anchor_every == 0:
                akey = f"{regime.key}|anchor|{time.time_ns()}"
                layers_w.add(measure(lambda: bench.cell_fn(*anchor), akey,
                                     {"layer": anchor[0], "kind": anchor[1], "width": anchor[2], "anchor": True, "order": idx}))
        layers_w.flush()

        if cfg.layers_only:
            continue
        todo = [c for c in e2e_cfgs if f"{regime.key}|{c.key}" not in done]
        it = progress(todo, desc=f"end-to-end {regime.key}") if progress else todo
        for sub in it:
            extra = {"config": sub.to_json(), "config_key": sub.key,
                     "uniform": len(set(sub.mlp_width)) == 1 and len(set(sub.heads)) == 1,
                     "params": sub.param_count(spec), "flops": sub.flops(spec, regime),
                     "bytes": sub.bytes_moved(spec, regime)}
            row = measure(lambda: bench.forward_fn(sub), f"{regime.key}|{sub.key}", extra)
            if row["status"] == "ok":
                med_s = row["latency_ms_median"] / 1e3
                row["achieved_tflops"] = extra["flops"] / med_s / 1e12
                row["achieved_gbps"] = extra["bytes"] / med_s / 1e9
                row["energy_mj_per_token"] = (_energy_per_token(tele, timer.prepare(bench.forward_fn(sub)), regime, cfg.energy_s)
                                              if extra["uniform"] and cfg.energy_s > 0 else None)
            e2e_w.add(row)
        e2e_w.flush()

    layers = layers_w.combine(out_dir / LAYERS_FILE)
    e2e = e2e_w.combine(out_dir / E2E_FILE) if not cfg.layers_only else pd.DataFrame()
    elastic.set_config(spec.full())
    anchors = layers[layers["anchor"]] if len(layers) else layers
    drift = {}
    for rk, g in (anchors.groupby("regime") if len(anchors) else []):
        med = g["latency_ms_median"]
        drift[rk] = round(float(med.std() / med.mean()), 4) if len(med) > 1 else 0.0
    return {
        "device": info["device_name"],
        "regimes": [r.key for r in regimes],
        "layer_cells": int((~layers["anchor"]).sum()) if len(layers) else 0,
        "e2e_cells": int(len(e2e)),
        "measured_now": n_measured,
        "throttled_cells": int(layers["throttled"].fillna(False).sum()) if "throttled" in layers else 0,
        "anchor_cv": drift,
    }


def _energy_per_token(tele, fn, regime: Regime, seconds: float) -> float | None:
    """mJ per generated/processed token from the NVML energy counter over >= `seconds` of runs
    (the counter updates every few ms, so short spans would read as zero or one step)."""
    import torch

    if tele.energy_mj() is None:
        return None
    torch.cuda.synchronize()
    e0, t0, runs = tele.energy_mj(), time.perf_counter(), 0
    with torch.inference_mode():
        while time.perf_counter() - t0 < seconds:
            for _ in range(10):
                fn()
            runs += 10
            torch.cuda.synchronize()
    e1 = tele.energy_mj()
    return (e1 - e0) / (runs * regime.batch * regime.new_tokens)


def profile(cfg: ProfileConfig) -> dict:
    from flextron.elastic import ElasticModel
    from flextron.progress import progress
    from flextron.rundir import RunDir, save_stage_config

    run = RunDir(cfg.run)
    cfg.regimes()  # validate before loading anything
    if cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise FlextronError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    elastic = ElasticModel.load(run.require("elastic"))
    out = run / "profile"
    t0 = time.perf_counter()
    summary = run_sweep(elastic, out, cfg, progress=progress)
    save_stage_config(out / "profile_config.json", cfg)
    return {**summary, "seconds": round(time.perf_counter() - t0, 1)}
