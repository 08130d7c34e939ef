"""The nested elastic model: importance ranking, a one-time permutation, and prefix slicing.

After `permute_by_importance`, every smaller width is a prefix of every larger one: MLP neuron j
is the j-th most important, and heads are ordered by KV group (most important group first), then by
importance inside the group. `ElasticLinear` then runs any width as a view of the same weights, so
one checkpoint serves every SubnetConfig without copying.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flextron import bridges as bridging
from flextron.errors import FlextronError
from flextron.models import FamilyAdapter, adapter_for
from flextron.spec import ElasticSpec, SubnetConfig

SPEC_FILE = "elastic_spec.json"
IMPORTANCE_FILE = "importance.json"


class ElasticLinear(nn.Linear):
    """An nn.Linear that runs on the prefix `[:active_out, :active_in]` of its weight.

    It shares the Parameter objects of the Linear it replaces, so state-dict keys, tying and
    optimizers are unchanged. At full size the weight is used as-is (same kernel as the original).
    """

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.active_in = linear.in_features
        self.active_out = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.active_out == self.out_features and self.active_in == self.in_features:
            return F.linear(x, self.weight, self.bias)
        w = self.weight[: self.active_out, : self.active_in]
        b = None if self.bias is None else self.bias[: self.active_out]
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        return f"in={self.active_in}/{self.in_features}, out={self.active_out}/{self.out_features}"


def spec_from_model(model, alignment: int, mlp_choices: int, head_choices: int) -> ElasticSpec:
    c = model.config
    adapter = adapter_for(c)
    layer0 = adapter.layers(model)[0]
    attn = adapter.attn_of(layer0)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return ElasticSpec.build(
        family=c.model_type,
        num_layers=c.num_hidden_layers,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads,
        head_dim=head_dim,
        vocab_size=c.vocab_size,
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        attention_bias=getattr(attn, adapter.q).bias is not None,
        alignment=alignment,
        mlp_choices=mlp_choices,
        head_choices=head_choices,
    )


# ---- importance ------------------------------------------------------------------------------------
#: How MLP neurons are scored. "output": the root-mean-square of the neuron's activation (input of
#: down_proj) times the norm of its down_proj column, i.e. the size of what the neuron adds to the
#: residual stream (Wanda's |W|*||X|| per output channel); "activation": its mean absolute activation
#: alone (Minitron). Measured on SmolLM2 (benchmarks/ranking_quality.py): "output" keeps uniform
#: 90/75/50% MLP widths nearer the full model. Heads are scored by their activation either way
#: (weighting them by o_proj's norm ranked worse in an ad-hoc try, not a committed benchmark).
MLP_SCORES = ("output", "activation")


@torch.no_grad()
def measure_importance(model, windows: torch.Tensor, batch_size: int = 4, progress=None,
                       mlp_score: str = "output") -> dict:
    """Importance per MLP neuron (see MLP_SCORES) and per head (mean L2 of the head's slice of the
    input of o_proj), averaged over calibration tokens. Returns lists per layer."""
    if mlp_score not in MLP_SCORES:
        raise FlextronError(f"unknown MLP importance score {mlp_score!r}; use one of {list(MLP_SCORES)}")
    adapter = adapter_for(model.config)
    layers = adapter.layers(model)
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    mlp_abs = [None] * len(layers)
    mlp_sq = [None] * len(layers)
    head_sum = [None] * len(layers)
    hooks = []

    def add(store, i, s):
        store[i] = s if store[i] is None else store[i] + s

    def mlp_hook(i):
        def hook(_mod, args):
            x = args[0].float().reshape(-1, args[0].shape[-1])
            add(mlp_abs, i, x.abs().sum(0))
            add(mlp_sq, i, x.square().sum(0))
        return hook

    def head_hook(i):
        def hook(_mod, args):
            x = args[0].float()
            x = x.reshape(-1, x.shape[-1] // head_dim, head_dim)
            add(head_sum, i, x.norm(dim=-1).sum(0))
        return hook

    for i, layer in enumerate(layers):
        hooks.append(getattr(adapter.mlp_of(layer), adapter.down).register_forward_pre_hook(mlp_hook(i)))
        hooks.append(getattr(adapter.attn_of(layer), adapter.o).register_forward_pre_hook(head_hook(i)))
    try:
        batches = list(windows.split(batch_size))
        for ids in (progress(batches) if progress else batches):
            model(input_ids=ids.to(model.device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    n_tokens = windows.numel()
    if mlp_score == "output":
        mlp = [(sq / n_tokens).sqrt() * getattr(adapter.mlp_of(layer), adapter.down).weight.float().norm(dim=0)
               for sq, layer in zip(mlp_sq, layers)]
    else:
        mlp = [s / n_tokens for s in mlp_abs]
    return {
        "mlp": [s.tolist() for s in mlp],
        "heads": [(s / n_tokens).tolist() for s in head_sum],
        "mlp_score": mlp_score,
        "tokens": n_tokens,
    }


def importance_order(importance: dict, num_kv_heads: int) -> dict:
    """Permutations per layer: MLP neurons by importance; KV groups as units by summed importance,
    then query heads inside each group by their own importance."""
    mlp_orders, head_orders, group_orders = [], [], []
    for mlp_imp, head_imp in zip(importance["mlp"], importance["heads"]):
        mlp_orders.append(torch.argsort(torch.tensor(mlp_imp), descending=True, stable=True).tolist())
        h = torch.tensor(head_imp)
        per_group = len(head_imp) // num_kv_heads
        groups = h.view(num_kv_heads, per_group)
        g_order = torch.argsort(groups.sum(1), descending=True, stable=True).tolist()
        heads = []
        for g in g_order:
            within = torch.argsort(groups[g], descending=True, stable=True).tolist()
            heads.extend(g * per_group + j for j in within)
        group_orders.append(g_order)
        head_orders.append(heads)
    return {"mlp": mlp_orders, "heads": head_orders, "groups": group_orders}


def identity_order(spec: ElasticSpec) -> dict:
    """No ranking: smaller widths keep the first-k neurons and heads as the model stores them."""
    L = spec.num_layers
    return {
        "mlp": [list(range(spec.intermediate_size))] * L,
        "heads": [list(range(spec.num_heads))] * L,
        "groups": [list(range(spec.num_kv_heads))] * L,
    }


@torch.no_grad()
def permute_weights(model, order: dict) -> None:
    """Permute the weights in place so each ranking becomes a prefix. The function the model
    computes at full width is unchanged (up to float summation order)."""
    adapter = adapter_for(model.config)
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    def rows(lin, idx, block):
        idx_full = (torch.tensor(idx)[:, None] * block + torch.arange(block)).flatten()
        lin.weight.copy_(lin.weight[idx_full])
        if lin.bias is not None:
            lin.bias.copy_(lin.bias[idx_full])

    def cols(lin, idx, block):
        idx_full = (torch.tensor(idx)[:, None] * block + torch.arange(block)).flatten()
        lin.weight.copy_(lin.weight[:, idx_full])

    for i, layer in enumerate(adapter.layers(model)):
        mlp, attn = adapter.mlp_of(layer), adapter.attn_of(layer)
        rows(getattr(mlp, adapter.gate), order["mlp"][i], 1)
        rows(getattr(mlp, adapter.up), order["mlp"][i], 1)
        cols(getattr(mlp, adapter.down), order["mlp"][i], 1)
        rows(getattr(attn, adapter.q), order["heads"][i], head_dim)
        rows(getattr(attn, adapter.k), order["groups"][i], head_dim)
        rows(getattr(attn, adapter.v), order["groups"][i], head_dim)
        cols(getattr(attn, adapter.o), order["heads"][i], head_dim)


# ---- the elastic model -----------------------------------------------------------------------------
class ElasticModel:
    """A transformers causal LM whose layers run any SubnetConfig of `spec` by prefix slicing.

    `model` is the ordinary transformers model (generate, caches and attention kernels are its own);
    only its q/k/v/o and gate/up/down Linears are swapped for ElasticLinears sharing the weights.
    """

    def __init__(self, model, tokenizer, spec: ElasticSpec, bridges: torch.Tensor | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.adapter: FamilyAdapter = adapter_for(model.config)
        self._linears: list[dict[str, ElasticLinear]] = []
        for layer in self.adapter.layers(model):
            found = {}
            for part, parent in (("q", "attn"), ("k", "attn"), ("v", "attn"), ("o", "attn"),
                                 ("gate", "mlp"), ("up", "mlp"), ("down", "mlp")):
                holder = getattr(layer, getattr(self.adapter, parent))
                name = getattr(self.adapter, part)
                lin = getattr(holder, name)
                if not isinstance(lin, ElasticLinear):
                    lin = ElasticLinear(lin)
                    setattr(holder, name, lin)
                found[part] = lin
            self._linears.append(found)
        # Depth: the decoder's own layer list, kept whole here; a config that skips layers runs a
        # shorter list in its place (see `_set_depth`).
        path, _, name = self.adapter.layers_path.rpartition(".")
        self._layers_holder = self.model.get_submodule(path) if path else self.model
        self._layers_name = name
        self._all_layers = self.adapter.layers(model)
        self._layer_types = list(getattr(model.config, "layer_types", None) or [])
        self._skip: tuple[int, ...] = ()
        # Linear bridges (flextron.bridges): [L, d, d], what a skipped layer leaves in its place; None for
        # a checkpoint converted without them (a skipped layer is then the identity). Fixed weights, not
        # parameters: training does not update them.
        self._bridge_hooks: list = []
        self._bridges = bridges
        self._bridges_as = None
        self.config = spec.full()

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def bridges(self) -> torch.Tensor | None:
        return self._bridges

    @bridges.setter
    def bridges(self, value: torch.Tensor | None) -> None:
        """Replace the bridges (None: skipped layers are the identity); the config in use runs with them."""
        self._bridges, self._bridges_as = value, None
        skip, self._skip = self._skip, None
        self._set_depth(skip)

    def cast_bridges(self) -> torch.Tensor:
        """The bridges on the model's device and in its dtype (cast once per device and dtype)."""
        p = next(self.model.parameters())
        if self._bridges_as is None or self._bridges_as.dtype != p.dtype or self._bridges_as.device != p.device:
            self._bridges_as = self.bridges.to(device=p.device, dtype=p.dtype)
        return self._bridges_as

    @property
    def rms_eps(self) -> float:
        return bridging.eps_of(self.model.config)

    def check_positions(self, tokens: int, flag: str = "--seq-len") -> None:
        """Refuse a sequence longer than the positions the model has (a typo like 100000 would otherwise
        run for minutes or fail deep inside attention)."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit and tokens > limit:
            raise FlextronError(f"{flag} {tokens} is beyond the {limit} positions this model has; use at most {limit}")

    def set_config(self, cfg: SubnetConfig) -> None:
        self.spec.validate(cfg)
        d, r = self.spec.head_dim, self.spec.q_per_kv
        for lin, w, h in zip(self._linears, cfg.mlp_width, cfg.heads):
            lin["gate"].active_out = lin["up"].active_out = lin["down"].active_in = w
            lin["q"].active_out = lin["o"].active_in = h * d
            lin["k"].active_out = lin["v"].active_out = (h // r) * d
        self._set_depth(cfg.skip)
        self.config = cfg

    def _set_depth(self, skip: tuple[int, ...]) -> None:
        """Run only the layers not in `skip`: the decoder's layer list is swapped for the active
        layers, renumbered 0..K-1 for the KV cache, exactly as in a model built with K layers (a cache
        indexed by the original numbers would leave layer 0's slot empty when layer 0 is skipped, and
        transformers reads the sequence length from slot 0). Per-layer attention types (Gemma 3's
        sliding/full pattern) move with their layers. No weights are copied. A skipped layer's bridge, when
        the checkpoint has one, runs in a hook of the active layer before it (`bridges.attach`)."""
        if skip == self._skip:
            return
        active = [l for l in range(len(self._all_layers)) if l not in set(skip)]
        layers = self._all_layers if not skip else nn.ModuleList([self._all_layers[l] for l in active])
        setattr(self._layers_holder, self._layers_name, layers)
        for h in self._bridge_hooks:
            h.remove()
        self._bridge_hooks = []
        if skip and self.bridges is not None:
            self._bridge_hooks = bridging.attach(layers, active, skip, self.cast_bridges(), self.rms_eps)
        for j, l in enumerate(range(len(self._all_layers)) if not skip else active):
            layer = self._all_layers[l]
            for mod in (layer, self.adapter.attn_of(layer)):
                if hasattr(mod, "layer_idx"):
                    mod.layer_idx = j
        if self._layer_types:
            types = [self._layer_types[l] for l in active] + self._layer_types[len(active):]
            self.model.config.layer_types = types
        self._skip = tuple(skip)

    @contextlib.contextmanager
    def use(self, cfg: SubnetConfig):
        """Run the block under `cfg`, then restore the previous config."""
        prev = self.config
        self.set_config(cfg)
        try:
            yield self
        finally:
            self.set_config(prev)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def to(self, device=None, dtype=None) -> "ElasticModel":
        self.model.to(device=device, dtype=dtype)
        return self

    def save(self, folder: str | Path) -> None:
        """Write the folder `load` reads: config, safetensors weights, tokenizer and spec."""
        folder = Path(folder)
        with self.use(self.spec.full()):  # every layer in the state dict, under its own number
            self.model.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)
        self.spec.save(folder / SPEC_FILE)
        if self.bridges is not None:
            bridging.save_bridges(folder, self.bridges)

    @classmethod
    def load(cls, elastic_dir: str | Path, device: str = "cpu",
             dtype: torch.dtype | str = torch.float32) -> "ElasticModel":
        """Load a converted model (safetensors only, no remote code), in `dtype` (a torch dtype or its name)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        elastic_dir = Path(elastic_dir)
        if not (elastic_dir / SPEC_FILE).is_file():
            raise FlextronError(f"{elastic_dir} holds no converted model; run `flextron convert` first")
        spec = ElasticSpec.load(elastic_dir / SPEC_FILE)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        try:
            model = AutoModelForCausalLM.from_pretrained(
                elastic_dir, dtype=dtype, use_safetensors=True, trust_remote_code=False
            )
            tok = AutoTokenizer.from_pretrained(elastic_dir, trust_remote_code=False)
        except Exception as e:
            raise FlextronError(
                f"cannot load the elastic checkpoint in {elastic_dir} ({type(e).__name__}: {str(e)[:200]}); "
                "it may be corrupt: re-run `flextron convert`"
            ) from e
        return cls(model.to(device).eval(), tok, spec, bridging.load_bridges(elastic_dir))


def load_importance(elastic_dir: str | Path) -> dict | None:
    p = Path(elastic_dir) / IMPORTANCE_FILE
    return json.loads(p.read_text()) if p.is_file() else None
