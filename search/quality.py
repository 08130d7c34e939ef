"""Quality of sub-networks: validation loss on held-out windows, cached by config on disk.

The cache lives in the run directory, keyed by config and evaluation settings, so no config is
evaluated twice, across searches, workers (one JSON line per result, appended) and restarts.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from flextron.spec import SubnetConfig

QUALITY_CACHE = "quality_cache.jsonl"


def read_quality_cache(path: str | Path, setting: str | None = None) -> dict[str, float]:
    """{config key: loss} from a quality cache file (torch-free, so reports can read it too).
    Lines cut by a kill are skipped; those configs are simply evaluated again."""
    path = Path(path)
    out: dict[str, float] = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if setting is None or rec.get("setting") == setting:
            out[rec["key"]] = rec["loss"]
    return out


def quality_setting(split: str, corpus: str, windows: int, seq_len: int, weights: str = "elastic",
                    dtype: str = "float32") -> str:
    """The cache key of an evaluation setting. The corpus is named with its content id (`corpus@id`), so
    losses on an edited text never mix with the old ones; the weights' tag is part of it, so trained and
    one-shot losses never mix (one-shot keeps the untagged form); so is a dtype other than float32
    (`:bfloat16`), so losses of two precisions never mix either (float32 keeps the untagged form)."""
    from flextron.data import corpus_label

    base = f"{split}:{corpus_label(corpus)}:{windows}x{seq_len}"
    base = base if dtype == "float32" else f"{base}:{dtype}"
    return base if weights == "elastic" else f"{base}:{weights}"


def search_quality_setting(run_root: str | Path, regime: str | None = None, weights: str | None = None) -> str | None:
    """The quality setting (split, corpus, windows, dtype, weights) the run's search used for `regime` and
    `weights` (any when None), from its `best.json` files; None when nothing was searched."""
    from flextron.rundir import read_json

    for p in sorted((Path(run_root) / "search").glob("*/*/best.json")):
        best = read_json(p, run_root)
        if (regime is None or best.get("regime") == regime) and (weights is None or best.get("weights") == weights):
            if best.get("quality_setting"):
                return best["quality_setting"]
    return None


class QualityEvaluator:
    def __init__(self, elastic, cache_path: str | Path, windows: int = 8, seq_len: int = 128,
                 split: str = "validation", corpus: str = "wiki", batch_size: int = 8, tag: str = "elastic"):
        from flextron.data import token_windows

        self.elastic = elastic
        self.cache_path = Path(cache_path)
        self.dtype = str(elastic.model.dtype).removeprefix("torch.")  # the losses' precision: part of the setting
        self.setting = quality_setting(split, corpus, windows, seq_len, tag, self.dtype)
        self.batch_size = batch_size
        self._windows = token_windows(elastic.tokenizer, elastic.adapter, split, seq_len, windows, corpus)
        self.evaluations = 0  # real forward evaluations made by this process
        self._cache: dict[str, float] = {}
        self._read()

    def _read(self) -> None:
        self._cache.update(read_quality_cache(self.cache_path, self.setting))

    def cached(self, cfg: SubnetConfig) -> float | None:
        if cfg.key not in self._cache:
            self._read()  # another worker may have evaluated it meanwhile
        return self._cache.get(cfg.key)

    def loss(self, cfg: SubnetConfig) -> float:
        hit = self.cached(cfg)
        if hit is not None:
            return hit
        from flextron.evaluate import mean_loss

        value = mean_loss(self.elastic, cfg, self._windows, self.batch_size)
        self.evaluations += 1
        self._cache[cfg.key] = value
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"key": cfg.key, "setting": self.setting, "loss": value, "config": cfg.to_dict()}) + "\n"
        fd = os.open(self.cache_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode())  # one append per line: atomic for lines this short
        finally:
            os.close(fd)
        return value

    def ppl(self, cfg: SubnetConfig) -> float:
        return math.exp(self.loss(cfg))

    @property
    def tokens(self) -> int:
        return int(self._windows[:, 1:].numel())
