"""Models out: a SubnetConfig sliced into a standalone checkpoint with contiguous weights.

A uniform config becomes an ordinary transformers checkpoint (smaller intermediate_size and head
counts in config.json). A heterogeneous one keeps per-layer shapes in `flextron_subnet.json` and
loads with `load_subnet`, which builds the transformers model and resizes each layer's Linears.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from flextron.elastic import ElasticModel
from flextron.errors import FlextronError
from flextron.models import adapter_for
from flextron.spec import SubnetConfig

SUBNET_FILE = "flextron_subnet.json"


def _sliced_state_dict(elastic: ElasticModel, cfg: SubnetConfig) -> dict[str, torch.Tensor]:
    """Every weight, with the layers' Linears cut to `cfg`, as fresh contiguous tensors."""
    out = {}
    active = {}
    with elastic.use(cfg):
        for lin_by_part in elastic._linears:
            for lin in lin_by_part.values():
                active[id(lin.weight)] = (lin.active_out, lin.active_in)
                if lin.bias is not None:
                    active[id(lin.bias)] = (lin.active_out,)
    for name, t in elastic.model.state_dict(keep_vars=True).items():
        shape = active.get(id(t))
        sliced = t.detach()
        if shape is not None:
            sliced = sliced[tuple(slice(0, s) for s in shape)]
        out[name] = sliced.contiguous().clone()
    return out


def _resize_linears(model, cfg: SubnetConfig, head_dim: int, q_per_kv: int) -> None:
    adapter = adapter_for(model.config)
    for layer, w, h in zip(adapter.layers(model), cfg.mlp_width, cfg.heads):
        kv = h // q_per_kv
        attn, mlp = adapter.attn_of(layer), adapter.mlp_of(layer)
        dims = {adapter.q: (None, h * head_dim), adapter.k: (None, kv * head_dim), adapter.v: (None, kv * head_dim),
                adapter.o: (h * head_dim, None)}
        for name, (in_f, out_f) in dims.items():
            old = getattr(attn, name)
            setattr(attn, name, nn.Linear(in_f or old.in_features, out_f or old.out_features,
                                          bias=old.bias is not None, dtype=old.weight.dtype))
        for name, (in_f, out_f) in {adapter.gate: (None, w), adapter.up: (None, w), adapter.down: (w, None)}.items():
            old = getattr(mlp, name)
            setattr(mlp, name, nn.Linear(in_f or old.in_features, out_f or old.out_features,
                                         bias=old.bias is not None, dtype=old.weight.dtype))


def export_subnet(elastic: ElasticModel, cfg: SubnetConfig, out_dir: str | Path, extra: dict | None = None) -> dict:
    """Write `cfg` as a standalone checkpoint in `out_dir`. Returns what was written."""
    from safetensors.torch import save_file

    spec = elastic.spec
    spec.validate(cfg)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
        raise FlextronError(f"{out_dir} exists and is not an exported model; choose an empty --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    # Plain transformers can load it only if every layer has the same shape and the head count
    # passes config validation (hidden_size divisible by heads); otherwise load_subnet resizes.
    uniform = (len(set(cfg.mlp_width)) == 1 and len(set(cfg.heads)) == 1
               and spec.hidden_size % cfg.heads[0] == 0)
    config = copy.deepcopy(elastic.model.config)
    config.head_dim = spec.head_dim  # stays fixed while heads shrink
    config.intermediate_size = max(cfg.mlp_width) if uniform else spec.intermediate_size
    config.num_attention_heads = cfg.heads[0] if uniform else spec.num_heads
    config.num_key_value_heads = config.num_attention_heads // spec.q_per_kv
    state = _sliced_state_dict(elastic, cfg)
    if spec.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    config.save_pretrained(out_dir)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    if getattr(elastic.model, "generation_config", None) is not None:
        elastic.model.generation_config.save_pretrained(out_dir)
    elastic.tokenizer.save_pretrained(out_dir)
    record = {"config": cfg.to_dict(), "uniform": uniform, "params": cfg.param_count(spec), **(extra or {})}
    (out_dir / SUBNET_FILE).write_text(json.dumps(record, indent=1))
    if not uniform:
        # Plain from_pretrained would see shape mismatches; say so in config.json itself.
        cfg_json = json.loads((out_dir / "config.json").read_text())
        cfg_json["flextron_subnet"] = cfg.to_dict()
        (out_dir / "config.json").write_text(json.dumps(cfg_json, indent=2))
    return {"out": str(out_dir), "uniform": uniform, "params": record["params"],
            "loader": "AutoModelForCausalLM.from_pretrained" if uniform else "flextron.load_subnet"}


def load_subnet(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Load an exported sub-network (uniform or heterogeneous) as a plain transformers model."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FlextronError(f"{path} is not an exported flextron model (config.json and model.safetensors expected)")
    meta = json.loads((path / SUBNET_FILE).read_text()) if (path / SUBNET_FILE).is_file() else None
    if meta is None or meta.get("uniform", True):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, trust_remote_code=False)
        return model.to(device).eval()
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    cfg = SubnetConfig.from_dict(meta["config"])
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    head_dim = config.head_dim
    _resize_linears(model, cfg, head_dim, config.num_attention_heads // config.num_key_value_heads)
    state = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise FlextronError(f"{path}: weights do not match the sub-network (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(device=device, dtype=dtype).eval()
