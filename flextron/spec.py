"""The shared nouns: ElasticSpec (what may be cut), SubnetConfig (one cut), Regime (where it runs).

Every package uses these definitions; none keeps its own copy of a shape or a cost formula.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flextron.errors import FlextronError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "q8_0": 34 / 32}  # q8_0: 32 int8 + an f16 scale
# The engines a regime can be measured in: transformers (`torch`, modes eager and cuda_graph) and
# llama.cpp (`llamacpp`, its own mode, CPU, batch 1, GGUF weights in f32/f16/q8_0).
LLAMACPP_DTYPES = ("float32", "float16", "q8_0")
GGUF_TYPE_OF = {"float32": "f32", "float16": "f16", "q8_0": "q8_0"}
DEFAULT_ALIGNMENT = 64
DEFAULT_MLP_CHOICES = 8
DEFAULT_HEAD_CHOICES = 4


def aligned_widths(full: int, n_choices: int, alignment: int) -> tuple[int, ...]:
    """Widths k/n * full rounded to the alignment, plus the full width itself.

    Widths that are not a multiple of the alignment fall back to slower GEMM tiles on a GPU
    (several times slower on H100 for odd widths), so only aligned prefixes are offered. The full
    width is always kept even if the base model's own width is unaligned.
    """
    if n_choices < 1:
        raise FlextronError(f"--mlp-choices must be at least 1, got {n_choices}")
    out = {full}
    for k in range(1, n_choices):
        w = int(round(full * k / n_choices / alignment)) * alignment
        if alignment <= w < full:
            out.add(w)
    return tuple(sorted(out))


def group_head_counts(num_heads: int, num_kv_heads: int, n_choices: int) -> tuple[int, ...]:
    """Head counts that drop whole KV groups, so the KV cache shrinks with the heads.

    Keeping the query-per-KV ratio fixed keeps GQA kernels valid and makes fewer heads pay where
    decode pays: in KV-cache reads.
    """
    per_group = num_heads // num_kv_heads
    groups = set()
    for k in range(1, n_choices + 1):
        g = int(round(num_kv_heads * k / n_choices))
        if g >= 1:
            groups.add(g)
    groups.add(num_kv_heads)
    return tuple(sorted(g * per_group for g in groups))


def _int_tuple(name: str, values) -> tuple[int, ...]:
    """Whole positive numbers only: a float such as 64.9 is refused, not truncated to 64."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise FlextronError(f"SubnetConfig {name} must be a list of whole numbers, got {str(values)[:100]!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not float(v).is_integer():
            raise FlextronError(f"SubnetConfig {name} must hold whole numbers, got {v!r}")
        if v < 1:
            raise FlextronError(f"SubnetConfig {name} entries must be positive, got {v!r}")
        out.append(int(v))
    return tuple(out)


@dataclass(frozen=True)
class SubnetConfig:
    """One choice per layer: the MLP width and the attention head count of each decoder layer, and
    the layers skipped whole (`skip`: sorted layer indices; attention and MLP of a skipped layer do
    not run, its input passes on through the residual path). A skipped layer's width entries are
    kept but mean nothing: `key` and `spec.canonical` write them as the full width."""

    mlp_width: tuple[int, ...]
    heads: tuple[int, ...]
    skip: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "mlp_width", _int_tuple("mlp_width", self.mlp_width))
        object.__setattr__(self, "heads", _int_tuple("heads", self.heads))
        if len(self.mlp_width) != len(self.heads):
            raise FlextronError(
                f"SubnetConfig has {len(self.mlp_width)} mlp_width entries but {len(self.heads)} "
                "heads entries; give one of each per layer"
            )
        if isinstance(self.skip, (str, bytes)) or not hasattr(self.skip, "__iter__"):
            raise FlextronError(f"SubnetConfig skip must be a list of layer indices, got {str(self.skip)[:100]!r}")
        skip = []
        for v in self.skip:
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not float(v).is_integer():
                raise FlextronError(f"SubnetConfig skip must hold layer indices (whole numbers), got {v!r}")
            if not 0 <= v < len(self.mlp_width):
                raise FlextronError(
                    f"SubnetConfig skips layer {v!r}, which does not exist; layers are 0..{len(self.mlp_width) - 1}"
                )
            skip.append(int(v))
        if len(set(skip)) < len(skip):
            raise FlextronError(f"SubnetConfig skip names a layer twice: {skip}")
        if skip and len(skip) >= len(self.mlp_width):
            raise FlextronError(
                f"SubnetConfig skips all {len(self.mlp_width)} layers; keep at least one (the model would be "
                "its embeddings and LM head only)"
            )
        object.__setattr__(self, "skip", tuple(sorted(skip)))

    @property
    def num_layers(self) -> int:
        return len(self.mlp_width)

    @property
    def active_layers(self) -> tuple[int, ...]:
        """Indices of the layers that run, in order."""
        skipped = set(self.skip)
        return tuple(l for l in range(self.num_layers) if l not in skipped)

    def is_uniform(self) -> bool:
        """The same MLP width and head count in every layer that runs (skipped layers aside)."""
        act = self.active_layers
        return len({self.mlp_width[l] for l in act}) == 1 and len({self.heads[l] for l in act}) == 1

    def to_dict(self) -> dict:
        d = {"mlp_width": list(self.mlp_width), "heads": list(self.heads)}
        if self.skip:  # only when used: configs without depth keep the JSON (and keys) they always had
            d["skip"] = list(self.skip)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> "SubnetConfig":
        if not isinstance(d, dict) or "mlp_width" not in d or "heads" not in d:
            raise FlextronError(
                'a SubnetConfig is a JSON object {"mlp_width": [...], "heads": [...]} '
                '(optionally "skip": [layer indices]) with one width and head count per layer; got '
                f"{str(d)[:200]}"
            )
        extra = set(d) - {"mlp_width", "heads", "skip"}
        if extra:
            raise FlextronError(f"a SubnetConfig has mlp_width, heads and skip; unknown field(s) {sorted(extra)}")
        return cls(d["mlp_width"], d["heads"], d.get("skip", ()))

    @classmethod
    def from_json(cls, text: str) -> "SubnetConfig":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise FlextronError(f"config is not valid JSON ({e}); expected a SubnetConfig object") from e

    @property
    def key(self) -> str:
        """A short stable string for tables and caches; a skipped layer shows width and heads 0."""
        skipped = set(self.skip)
        w = [0 if l in skipped else x for l, x in enumerate(self.mlp_width)]
        h = [0 if l in skipped else x for l, x in enumerate(self.heads)]
        return "m" + ".".join(map(str, w)) + "-h" + ".".join(map(str, h))

    def _layer_choices(self):
        """(mlp_width, heads) of every layer that runs."""
        return [(self.mlp_width[l], self.heads[l]) for l in self.active_layers]

    # ---- analytic costs (per forward pass; shapes come from the spec) -------------------------
    def param_count(self, spec: "ElasticSpec") -> int:
        """Parameters this sub-network touches: embeddings, every layer's slices, norms, LM head."""
        d, hd = spec.hidden_size, spec.head_dim
        n = spec.vocab_size * d * (1 if spec.tie_word_embeddings else 2) + d
        q_per_kv = spec.num_heads // spec.num_kv_heads
        for w, h in self._layer_choices():
            kv = h // q_per_kv
            n += d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * w + 2 * d
            if spec.attention_bias:
                n += h * hd + 2 * kv * hd
        return n

    def matmul_params(self, spec: "ElasticSpec") -> int:
        """Parameters that take part in matmuls for every token (embeddings are a gather)."""
        return self.param_count(spec) - spec.vocab_size * spec.hidden_size * (
            0 if spec.tie_word_embeddings else 1
        ) - spec.hidden_size * (1 + 2 * len(self.active_layers))

    def kv_bytes_per_token(self, spec: "ElasticSpec", dtype: str = "bfloat16") -> int:
        """KV-cache bytes one token occupies across all layers."""
        q_per_kv = spec.num_heads // spec.num_kv_heads
        return int(sum(2 * (h // q_per_kv) * spec.head_dim * DTYPE_BYTES[dtype] for _, h in self._layer_choices()))

    def flops(self, spec: "ElasticSpec", regime: "Regime") -> float:
        """Forward FLOPs for the whole batch in this regime (2 per multiply-add)."""
        tokens = regime.batch * regime.new_tokens
        attn_ctx = regime.seq_len if regime.phase == "decode" else (regime.seq_len + 1) / 2
        f = 2.0 * self.matmul_params(spec) * tokens
        for _, h in self._layer_choices():
            f += 2 * 2 * h * spec.head_dim * attn_ctx * tokens  # QK^T and PV
        return f

    def bytes_moved(self, spec: "ElasticSpec", regime: "Regime") -> float:
        """Minimum bytes read and written per forward: weights once, KV cache, activations in/out."""
        b = DTYPE_BYTES[regime.dtype]
        llamacpp = regime.engine == "llamacpp"  # llama.cpp keeps an f16 KV cache and f32 activations
        kv = self.kv_bytes_per_token(spec, "float16" if llamacpp else regime.dtype)
        weights = self.matmul_params(spec) * b
        b = 4 if llamacpp else b
        if regime.phase == "decode":
            kv_traffic = regime.batch * (regime.seq_len * kv + kv)  # read context, write new token
        else:
            kv_traffic = regime.batch * regime.seq_len * kv  # written once
        acts = regime.batch * regime.new_tokens * (2 * spec.hidden_size * b + spec.vocab_size * b)
        return weights + kv_traffic + acts

    def flops_per_token(self, spec: "ElasticSpec", regime: "Regime") -> float:
        return self.flops(spec, regime) / (regime.batch * regime.new_tokens)

    def bytes_per_token(self, spec: "ElasticSpec", regime: "Regime") -> float:
        return self.bytes_moved(spec, regime) / (regime.batch * regime.new_tokens)


@dataclass(frozen=True)
class ElasticSpec:
    """The base architecture and the allowed choices per layer.

    `mlp_widths[l]` and `head_counts[l]` are sorted ascending; the last entry is the full size.
    """

    family: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    alignment: int = DEFAULT_ALIGNMENT
    mlp_widths: tuple[tuple[int, ...], ...] = field(default=())
    head_counts: tuple[tuple[int, ...], ...] = field(default=())

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise FlextronError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        object.__setattr__(self, "mlp_widths", tuple(tuple(int(x) for x in ws) for ws in self.mlp_widths))
        object.__setattr__(self, "head_counts", tuple(tuple(int(x) for x in hs) for hs in self.head_counts))
        if len(self.mlp_widths) != self.num_layers or len(self.head_counts) != self.num_layers:
            raise FlextronError(
                f"ElasticSpec needs choices for all {self.num_layers} layers, got "
                f"{len(self.mlp_widths)} MLP and {len(self.head_counts)} head lists"
            )
        q_per_kv = self.num_heads // self.num_kv_heads
        for layer, (ws, hs) in enumerate(zip(self.mlp_widths, self.head_counts)):
            if not ws or max(ws) != self.intermediate_size or min(ws) < 1:
                raise FlextronError(
                    f"layer {layer}: MLP widths {list(ws)} must be positive and end at the full "
                    f"width {self.intermediate_size}"
                )
            for w in ws:
                if w != self.intermediate_size and w % self.alignment:
                    raise FlextronError(
                        f"layer {layer}: MLP width {w} is not a multiple of the alignment "
                        f"{self.alignment}; unaligned widths run several times slower on GPUs"
                    )
            if not hs or max(hs) != self.num_heads or any(h % q_per_kv or h < 1 for h in hs):
                raise FlextronError(
                    f"layer {layer}: head counts {list(hs)} must be multiples of the GQA group "
                    f"size {q_per_kv} and end at {self.num_heads}"
                )

    @classmethod
    def build(
        cls,
        family: str,
        num_layers: int,
        hidden_size: int,
        intermediate_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        vocab_size: int,
        tie_word_embeddings: bool = True,
        attention_bias: bool = False,
        alignment: int = DEFAULT_ALIGNMENT,
        mlp_choices: int = DEFAULT_MLP_CHOICES,
        head_choices: int = DEFAULT_HEAD_CHOICES,
    ) -> "ElasticSpec":
        """The default grid: `mlp_choices` aligned widths and `head_choices` KV-group counts, every layer."""
        if alignment < 1:
            raise FlextronError(f"--alignment must be positive, got {alignment}")
        ws = aligned_widths(intermediate_size, mlp_choices, alignment)
        hs = group_head_counts(num_heads, num_kv_heads, head_choices)
        return cls(
            family=family,
            num_layers=num_layers,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            vocab_size=vocab_size,
            tie_word_embeddings=tie_word_embeddings,
            attention_bias=attention_bias,
            alignment=alignment,
            mlp_widths=(ws,) * num_layers,
            head_counts=(hs,) * num_layers,
        )

    # ---- configs ------------------------------------------------------------------------------
    def full(self) -> SubnetConfig:
        return SubnetConfig(tuple(ws[-1] for ws in self.mlp_widths), tuple(hs[-1] for hs in self.head_counts))

    def smallest(self) -> SubnetConfig:
        return SubnetConfig(tuple(ws[0] for ws in self.mlp_widths), tuple(hs[0] for hs in self.head_counts))

    def uniform_configs(self) -> list[SubnetConfig]:
        """Every config with the same choice in all layers (each MLP width × each head count)."""
        return [SubnetConfig((w,) * self.num_layers, (h,) * self.num_layers)
                for w in self.mlp_widths[0] for h in self.head_counts[0]]

    def random_config(self, rng, max_skip: int = 0) -> SubnetConfig:
        """One choice per layer drawn uniformly with `rng` (a random.Random); with `max_skip` > 0,
        then a count of skipped layers uniform in 0..max_skip and that many layers drawn uniformly
        (canonical: skipped layers at the full width). The width draws come first and are the only
        draws at max_skip 0, so that sequence is the same as ever (profiles and tests replay it)."""
        if isinstance(max_skip, bool) or not isinstance(max_skip, int) or not 0 <= max_skip < self.num_layers:
            raise FlextronError(f"max_skip must be a whole number of layers in 0..{self.num_layers - 1} (at least "
                                f"one of the {self.num_layers} layers runs), got {max_skip!r}")
        cfg = SubnetConfig(tuple(rng.choice(ws) for ws in self.mlp_widths),
                           tuple(rng.choice(hs) for hs in self.head_counts))
        if not max_skip:
            return cfg
        return self.depth(rng.sample(range(self.num_layers), rng.randint(0, max_skip)), base=cfg)

    def uniform(self, mlp_fraction: float, heads_fraction: float | None = None) -> SubnetConfig:
        """The allowed choice nearest to `fraction` of the full size, in every layer."""
        if not 0 < mlp_fraction <= 1:
            raise FlextronError(f"uniform fraction must be in (0, 1], got {mlp_fraction}")
        hf = 1.0 if heads_fraction is None else heads_fraction
        if not 0 < hf <= 1:
            raise FlextronError(f"uniform heads fraction must be in (0, 1], got {hf}")

        def nearest(choices, target):
            return min(choices, key=lambda c: (abs(c - target), -c))

        return SubnetConfig(
            tuple(nearest(ws, mlp_fraction * self.intermediate_size) for ws in self.mlp_widths),
            tuple(nearest(hs, hf * self.num_heads) for hs in self.head_counts),
        )

    def canonical(self, cfg: SubnetConfig) -> SubnetConfig:
        """`cfg` with every skipped layer's entries at the full width and head count: configs that
        run the same network compare (and serialise) equal."""
        if not cfg.skip:
            return cfg
        full = self.full()
        sk = set(cfg.skip)
        return SubnetConfig(tuple(full.mlp_width[l] if l in sk else w for l, w in enumerate(cfg.mlp_width)),
                            tuple(full.heads[l] if l in sk else h for l, h in enumerate(cfg.heads)), cfg.skip)

    def depth(self, skip, base: SubnetConfig | None = None) -> SubnetConfig:
        """`base` (the full model when None) with the layers in `skip` skipped."""
        base = base or self.full()
        return self.canonical(SubnetConfig(base.mlp_width, base.heads, tuple(skip)))

    def validate(self, cfg: SubnetConfig) -> SubnetConfig:
        """Raise a FlextronError naming the first bad layer and its allowed values."""
        if cfg.num_layers != self.num_layers:
            raise FlextronError(f"config has {cfg.num_layers} layers but the model has {self.num_layers}")
        for layer, (w, h) in enumerate(zip(cfg.mlp_width, cfg.heads)):
            if w not in self.mlp_widths[layer]:
                raise FlextronError(
                    f"layer {layer}: MLP width {w} is not allowed; choose one of {list(self.mlp_widths[layer])}"
                )
            if h not in self.head_counts[layer]:
                raise FlextronError(
                    f"layer {layer}: head count {h} is not allowed; choose one of {list(self.head_counts[layer])}"
                )
        return cfg

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    # ---- io -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["mlp_widths"] = [list(w) for w in self.mlp_widths]
        d["head_counts"] = [list(h) for h in self.head_counts]
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_dict(cls, d: dict) -> "ElasticSpec":
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> "ElasticSpec":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise FlextronError(f"{path} is not a valid elastic_spec.json ({e}); re-run `flextron convert`") from e

    def summary(self) -> dict:
        return {
            "family": self.family,
            "layers": self.num_layers,
            "hidden": self.hidden_size,
            "mlp_widths": list(self.mlp_widths[0]),
            "head_counts": list(self.head_counts[0]),
            "kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "subnetworks": math.prod(len(w) * len(h) for w, h in zip(self.mlp_widths, self.head_counts)),
        }


_REGIME_RE = re.compile(r"^(prefill|decode):b(\d+):(s|ctx)(\d+)((?::[a-z0-9_]+)*)$")
MODES = ("eager", "cuda_graph", "llamacpp")
ENGINES = ("torch", "llamacpp")


@dataclass(frozen=True)
class Regime:
    """The deployment scenario a latency belongs to.

    prefill: `batch` sequences of `seq_len` prompt tokens in one forward.
    decode: `batch` sequences each adding one token on top of a KV cache of `seq_len` tokens.
    """

    phase: str
    batch: int
    seq_len: int
    dtype: str = "float32"
    mode: str = "eager"

    def __post_init__(self):
        if self.phase not in ("prefill", "decode"):
            raise FlextronError(f"regime phase must be prefill or decode, got {self.phase!r}")
        if self.batch < 1 or self.seq_len < 1:
            raise FlextronError(f"regime batch and length must be positive, got b{self.batch} len {self.seq_len}")
        if self.dtype not in DTYPE_BYTES:
            raise FlextronError(f"regime dtype {self.dtype!r} unknown; use one of {sorted(DTYPE_BYTES)}")
        if self.mode not in MODES:
            raise FlextronError(f"regime mode {self.mode!r} unknown; use one of {list(MODES)}")
        if self.mode == "llamacpp":
            if self.dtype not in LLAMACPP_DTYPES:
                raise FlextronError(
                    f"regime {self.key}: llama.cpp runs GGUF weights in {list(LLAMACPP_DTYPES)}, not {self.dtype}"
                )
            if self.batch != 1:
                raise FlextronError(
                    f"regime {self.key}: the llama.cpp engine measures batch 1; use the torch "
                    "engine for batched regimes"
                )
        elif self.dtype == "q8_0":
            raise FlextronError(
                f"regime {self.key}: q8_0 weights run in llama.cpp only; add :llamacpp (or --engine llamacpp)"
            )

    @property
    def engine(self) -> str:
        return "llamacpp" if self.mode == "llamacpp" else "torch"

    @property
    def new_tokens(self) -> int:
        return 1 if self.phase == "decode" else self.seq_len

    @property
    def key(self) -> str:
        length = f"ctx{self.seq_len}" if self.phase == "decode" else f"s{self.seq_len}"
        return f"{self.phase}:b{self.batch}:{length}:{self.dtype}:{self.mode}"

    @property
    def slug(self) -> str:
        """The key as one file-name component (`decode_b1_ctx256_float32_eager`): run folders and
        part files per regime are named by it."""
        return regime_slug(self.key)

    @classmethod
    def parse(cls, text: str, dtype: str = "float32", mode: str = "eager") -> "Regime":
        """`decode:b1:ctx1024` or `prefill:b8:s1024`, optionally `:bfloat16` and/or `:cuda_graph`."""
        m = _REGIME_RE.match(text.strip())
        if not m:
            raise FlextronError(
                f"cannot read regime {text!r}; write decode:bBATCH:ctxCONTEXT or prefill:bBATCH:sLENGTH, "
                "optionally followed by :DTYPE and :eager|cuda_graph (e.g. decode:b1:ctx1024:bfloat16:cuda_graph)"
            )
        phase, batch, unit, length, extra = m.groups()
        if (phase == "decode") != (unit == "ctx"):
            raise FlextronError(f"regime {text!r}: decode takes ctxN (KV context), prefill takes sN (prompt length)")
        seen: dict[str, str] = {}
        for part in filter(None, extra.split(":")):
            kind = "dtype" if part in DTYPE_BYTES else "mode" if part in MODES else None
            if kind in seen:
                raise FlextronError(f"regime {text!r} names two {kind}s ({seen[kind]} and {part}); give one")
            if kind:
                seen[kind] = part
            if part in DTYPE_BYTES:
                dtype = part
            elif part in MODES:
                mode = part
            else:
                raise FlextronError(
                    f"regime {text!r}: unknown part {part!r}; dtypes {sorted(DTYPE_BYTES)}, modes {list(MODES)}"
                )
        return cls(phase, int(batch), int(length), dtype, mode)

    @classmethod
    def parse_option(cls, text: str) -> "Regime":
        """`parse` for a --regime value: its error names the flag."""
        try:
            return cls.parse(text)
        except FlextronError as e:
            raise FlextronError(f"--regime: {e}") from None

    def to_dict(self) -> dict:
        return asdict(self)


def regime_slug(key: str) -> str:
    """A regime key (or any text that names one) as one safe file-name component."""
    from flextron.paths import safe_name

    return safe_name(key)


def resolve_regime(keys, regime: str | None, what: str = "profiled", fix: str = "") -> str:
    """The one key of `keys` that `regime` names: the key itself, the one key it is a short form of
    (`decode:b1:ctx256` names `decode:b1:ctx256:float32:eager`), or the only key when `regime` is
    None. A malformed regime, none matching or several matching is a FlextronError that lists
    `keys` (`what` says what they are; `fix` is how to get the missing one)."""
    keys = sorted(set(keys))
    if not regime:
        if len(keys) == 1:
            return keys[0]
        if not keys:
            raise FlextronError(f"no regime was {what}{'; ' + fix if fix else ''}")
        raise FlextronError(f"several regimes were {what} ({keys}); name one with --regime")
    Regime.parse_option(regime)
    matches = [regime] if regime in keys else [k for k in keys if k.startswith(regime + ":")]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise FlextronError(f"--regime {regime} matches several {what} regimes {matches}; name one in full")
    raise FlextronError(f"regime {regime} was not {what} ({what}: {keys}){'; ' + fix if fix else ''}")
