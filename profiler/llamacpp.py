"""The llama.cpp engine: sub-networks measured as the GGUF files `flextron export --format gguf`
writes, run by llama.cpp (through `llama-cpp-python`) on the CPU.

`LlamaCppBench` has the interface of the transformers `RegimeBench` (profiler/bench.py) that the
sweep, verify and the benchmarks measure through: `forward_fn(cfg)` gives a zero-argument callable
running one step of the regime. A decode step appends one token to a KV cache holding `seq_len`
tokens and then drops it again (llama.cpp's `eval` truncates the cache to `n_tokens` first), so
every timed step sees the same context; a prefill step evaluates `seq_len` tokens on an empty cache.
Each config's GGUF is written once into a private temporary folder and loaded once (memory-mapped);
`close()` frees them.

Per-layer terms (the latency model's priors) come from probes, since llama.cpp runs whole models
only: a model whose every layer has MLP width `w` (heads full) gives the MLP terms, and one whose
every layer has `h` heads (MLP full) the attention terms; each is measured in interleaved rounds
beside the full model (`layer_terms`). An attention term is absolute: a probe with every layer's
attention dropped but the first (llama.cpp's `deci` layers without attention) is its zero. An MLP
term is relative to the narrowest width: llama.cpp cannot build FFN-free layers in this release
(its `deci` graph asserts), so the narrowest width's cost sits in the latency model's intercept,
which changes no prediction of the additive model.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from flextron.errors import FlextronError
from flextron.spec import GGUF_TYPE_OF, Regime, SubnetConfig

INSTALL = ("pip install llama-cpp-python==0.3.36 (builds llama.cpp from source: CMake and a C++ compiler, "
           "about 5-7 minutes on 2 cores; `make setup` does it)")


_QUIET = []  # the log callback: kept alive for as long as llama.cpp may call it


def require_binding():
    """The `llama_cpp` module, or a FlextronError naming the install command. llama.cpp's own log
    (which `verbose=False` does not silence everywhere) is dropped: errors still raise in Python."""
    try:
        import llama_cpp
    except ImportError:
        raise FlextronError(f"the llama.cpp engine needs its Python binding: {INSTALL}") from None
    if not _QUIET:
        _QUIET.append(llama_cpp.llama_log_callback(lambda level, text, user_data: None))
        llama_cpp.llama_log_set(_QUIET[0], None)
    return llama_cpp


class LlamaCppBench:
    """One regime's steps in llama.cpp, for any SubnetConfig of `elastic` (see the module doc)."""

    def __init__(self, elastic, regime: Regime, threads: int = 1, source_gguf: Path | None = None):
        if regime.engine != "llamacpp":
            raise FlextronError(f"regime {regime.key} is not a llama.cpp regime")
        self.llama_cpp = require_binding()
        from flextron.gguf_export import check_family

        check_family(elastic.spec.family)
        self.elastic, self.regime, self.threads = elastic, regime, max(1, threads)
        self.gguf_type = GGUF_TYPE_OF[regime.dtype]
        self.source_gguf = source_gguf
        self.dir = Path(tempfile.mkdtemp(prefix="flextron-llamacpp-"))
        if source_gguf is None:  # the tokenizer files the GGUF writer reads
            elastic.tokenizer.save_pretrained(self.dir / "tokenizer")
        self._models: dict[str, object] = {}
        n = regime.seq_len
        vocab = elastic.spec.vocab_size
        self.prompt = [(7 + 31 * i) % vocab for i in range(n)]  # any fixed tokens: timing only

    def _load(self, name: str, cfg: SubnetConfig, drop_attention: bool = False):
        if name in self._models:
            return self._models[name]
        from flextron.gguf_export import write_gguf

        path = self.dir / f"m{len(self._models)}.gguf"
        write_gguf(self.elastic, cfg, path, self.gguf_type, source_gguf=self.source_gguf,
                   elastic_dir=self.dir / "tokenizer", drop_attention=drop_attention)
        n = self.regime.seq_len
        llm = self.llama_cpp.Llama(model_path=str(path), n_ctx=n + 8, n_batch=max(n, 8), n_ubatch=max(n, 8),
                                   n_threads=self.threads, n_threads_batch=self.threads, logits_all=False,
                                   verbose=False)
        if self.regime.phase == "decode":
            llm.eval(self.prompt)  # the context every decode step attends to
        self._models[name] = llm
        return llm

    def _step(self, llm):
        n = self.regime.seq_len
        if self.regime.phase == "decode":
            def run():
                llm.n_tokens = n  # eval drops the cache past n first: every step sees the same context
                llm.eval([11])
        else:
            def run():
                llm.n_tokens = 0
                llm.eval(self.prompt)
        return run

    def forward_fn(self, cfg: SubnetConfig):
        self.elastic.spec.validate(cfg)
        return self._step(self._load(cfg.key, cfg))

    def probe_fn(self, kind: str, width: int):
        """One step of the probe for (kind, width): every layer's `kind` at `width`, the rest full;
        width 0 of `attn` is the probe without attention past layer 0 (see the module doc)."""
        spec = self.elastic.spec
        full = spec.full()
        L = spec.num_layers
        if kind == "attn":
            cfg = SubnetConfig(full.mlp_width, (width or spec.head_counts[0][0],) * L)
        else:
            cfg = SubnetConfig((width,) * L, full.heads)
        return self._step(self._load(f"probe|{kind}|{width}", cfg, drop_attention=kind == "attn" and width == 0))

    def close(self) -> None:
        for llm in self._models.values():
            llm.close()
        self._models.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def probe_keys(spec) -> list[tuple[str, int]]:
    """The probes of `layer_terms`: every attention head count and 0, every MLP width."""
    return [("attn", 0)] + [("attn", h) for h in spec.head_counts[0]] + [("mlp", w) for w in spec.mlp_widths[0]]


def layer_terms(stats, spec) -> dict[tuple[str, int], float]:
    """Per-layer ms of each (kind, width) from the probes' drift-free step times.

    `stats` maps (kind, width) and ("full", 0) to a step time, each the full model's median over
    every round times the probe's median ratio to the full model in the same round. Every layer has
    the same shapes, so one term serves all layers. With F the fixed cost and m the full MLP:
    T(attn h) = F + L*a(h) + L*m and T(attn 0) = F + a(h0) + L*m (layer 0 keeps the narrowest head
    count h0), so a(h0) = (T(h0) - T(0)) / (L - 1) and a(h) = (T(h) - T(0) + a(h0)) / L.
    MLP: m(w) = (T(w) - T(narrowest)) / L (relative; see the module doc)."""
    L = spec.num_layers
    h0, w0 = spec.head_counts[0][0], spec.mlp_widths[0][0]
    t0 = stats[("attn", 0)]
    a_h0 = (stats[("attn", h0)] - t0) / (L - 1)
    out = {}
    for (kind, width), ms in stats.items():
        if kind == "attn" and width:
            out[(kind, width)] = (ms - t0 + a_h0) / L
        elif kind == "mlp":
            out[(kind, width)] = (ms - stats[("mlp", w0)]) / L
    return out
