"""Models out: a SubnetConfig sliced into a standalone checkpoint with contiguous weights.

A uniform config becomes an ordinary transformers checkpoint (smaller intermediate_size and head
counts in config.json). A heterogeneous one keeps per-layer shapes in `flextron_subnet.json` and
loads with `load_subnet`, which builds the transformers model and resizes each layer's Linears.
Skipped layers (depth) are left out: the checkpoint has the active layers only, renumbered, with
`num_hidden_layers` and `layer_types` of those layers; "uniform" looks at the active layers only. A
skipped layer's linear bridge (flextron.bridges), when the run has one, is kept in `bridges.safetensors`
and run by `load_subnet` where the layer stood (such an export always loads with `load_subnet`).

An export only ever replaces a previous export, and only when asked (`overwrite`): never a model it
did not write, and never a run's own elastic checkpoint. It is built beside its target and swapped
in, so a failed export leaves the previous one intact.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from torch import nn

from flextron import bridges as bridging
from flextron.elastic import SPEC_FILE, ElasticModel
from flextron.errors import FlextronError
from flextron.models import adapter_for
from flextron.rundir import COMPLETE_MARKER, fresh_tmp_dir, read_json, recover_swap, swap_in, write_json_atomic
from flextron.spec import SubnetConfig

SUBNET_FILE = "flextron_subnet.json"
PARTIAL_MARKER = ".flextron_export_partial"  # first file in a folder being built; removed before the swap
CHECKPOINT_STAGES = ("elastic", "trained")  # the run folders holding elastic weights that stages read


def _sliced_state_dict(elastic: ElasticModel, cfg: SubnetConfig) -> dict[str, torch.Tensor]:
    """Every weight, with the layers' Linears cut to `cfg`, as fresh contiguous tensors. Skipped
    layers are left out and the kept ones renumbered 0..K-1 (`cfg.active_layers[j]` becomes layer
    j), as in a model built with K layers.

    The weights are read with every layer in place under its own number, whatever config the model
    is running: while a depth config is set, the decoder's layer list holds only its active layers."""
    out = {}
    active = {}
    prefix = elastic.adapter.layers_path + "."
    new_index = {str(l): str(j) for j, l in enumerate(cfg.active_layers)}
    with elastic.use(SubnetConfig(cfg.mlp_width, cfg.heads)):  # widths of cfg, every layer present
        for lin_by_part in elastic._linears:
            for lin in lin_by_part.values():
                active[id(lin.weight)] = (lin.active_out, lin.active_in)
                if lin.bias is not None:
                    active[id(lin.bias)] = (lin.active_out,)
        for name, t in elastic.model.state_dict(keep_vars=True).items():
            if name.startswith(prefix):
                layer, _, rest = name[len(prefix):].partition(".")
                if layer not in new_index:
                    continue  # a skipped layer
                name = f"{prefix}{new_index[layer]}.{rest}"
            shape = active.get(id(t))
            sliced = t.detach()
            if shape is not None:
                sliced = sliced[tuple(slice(0, s) for s in shape)]
            out[name] = sliced.contiguous().clone()
    return out


def _resize_linears(model, cfg: SubnetConfig, head_dim: int, q_per_kv: int) -> None:
    """Resize the Linears of `model`, built with one layer per active layer of `cfg`, to the
    active layers' widths and head counts."""
    adapter = adapter_for(model.config)
    layers = adapter.layers(model)
    if len(layers) != len(cfg.active_layers):
        raise ValueError(f"the model has {len(layers)} layers but the config runs {len(cfg.active_layers)}")
    for layer, l in zip(layers, cfg.active_layers):
        w, h = cfg.mlp_width[l], cfg.heads[l]
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


def _is_our_leftover(folder: Path) -> bool:
    """A sibling folder an interrupted export left behind (safe to recover or remove)."""
    return folder.is_dir() and (not any(folder.iterdir()) or any(
        (folder / m).exists() for m in (SUBNET_FILE, PARTIAL_MARKER, COMPLETE_MARKER)))


def check_out_dir(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Refuse an `--out` that an export must not write: a file, a folder inside a run's elastic
    checkpoint (`elastic/`, `trained/`: every later stage reads it), a non-empty folder that is not a
    previous export, or a previous export without `overwrite`. Returns the folder as a Path."""
    out_dir = Path(os.path.abspath(out_dir))  # `sub/..` named by what it is; symlinks resolved below
    if out_dir.exists() and not out_dir.is_dir():
        raise FlextronError(f"--out {out_dir} is a file; pass a directory for the exported model")
    if not out_dir.name:
        raise FlextronError(f"--out {out_dir} is not a folder an export can be built beside; name a new folder")
    resolved = out_dir.resolve()
    for folder in (resolved, *resolved.parents):
        run_checkpoint = folder.name in CHECKPOINT_STAGES and (folder.parent / "elastic" / SPEC_FILE).is_file()
        if run_checkpoint or (folder / SPEC_FILE).is_file():
            raise FlextronError(
                f"--out {out_dir} lies inside {folder}, a run's elastic checkpoint; writing there would replace "
                "the model every later stage reads (even with --overwrite). Choose a folder outside it, "
                "e.g. RUN/export/NAME")
    siblings = [out_dir.with_name(out_dir.name + s) for s in (".tmp", ".old")]
    for sib in siblings:
        if sib.exists() and not _is_our_leftover(sib):
            raise FlextronError(f"--out {out_dir} would be built in {sib}, which exists and is not a flextron "
                                "export; move it or choose another --out")
    if any(sib.exists() for sib in siblings):
        recover_swap(out_dir)  # an export killed mid-swap: put the complete version in place first
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not (out_dir / SUBNET_FILE).is_file():
            raise FlextronError(f"--out {out_dir} exists, is not empty and is not a flextron export "
                                f"(no {SUBNET_FILE}); choose a new or empty folder")
        if not overwrite:
            raise FlextronError(f"--out {out_dir} holds a previous export; pass --overwrite to replace it")
    return out_dir


def export_subnet(elastic: ElasticModel, cfg: SubnetConfig, out_dir: str | Path, extra: dict | None = None,
                  overwrite: bool = False) -> dict:
    """Write `cfg` as a standalone checkpoint in `out_dir` (see `check_out_dir` for which folders it
    may write). Returns what was written."""
    from safetensors.torch import save_file

    spec = elastic.spec
    spec.validate(cfg)
    out_dir = check_out_dir(out_dir, overwrite)
    tmp = fresh_tmp_dir(out_dir)
    (tmp / PARTIAL_MARKER).touch()
    # Plain transformers can load it only if every layer has the same shape and the head count
    # passes config validation (hidden_size divisible by heads); otherwise load_subnet resizes.
    # Skipped layers are not written: the checkpoint has the active layers only, renumbered.
    # A skipped layer with a linear bridge (flextron.bridges) keeps it: the export carries those bridges
    # and loads with load_subnet, which runs them where their layers stood.
    active = cfg.active_layers
    first = active[0]
    bridged = [l for l in cfg.skip if bridging.used(elastic.bridges, l)]
    uniform = cfg.is_uniform() and spec.hidden_size % cfg.heads[first] == 0 and not bridged
    config = copy.deepcopy(elastic.model.config)
    config.head_dim = spec.head_dim  # stays fixed while heads shrink
    config.intermediate_size = cfg.mlp_width[first] if uniform else spec.intermediate_size
    config.num_attention_heads = cfg.heads[first] if uniform else spec.num_heads
    config.num_key_value_heads = config.num_attention_heads // spec.q_per_kv
    config.num_hidden_layers = len(active)
    if elastic._layer_types:  # the model's own per-layer attention types (not those of a depth config it runs)
        config.layer_types = [elastic._layer_types[l] for l in active]
    state = _sliced_state_dict(elastic, cfg)
    if spec.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    config.save_pretrained(tmp)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if getattr(elastic.model, "generation_config", None) is not None:
        elastic.model.generation_config.save_pretrained(tmp)
    elastic.tokenizer.save_pretrained(tmp)
    if bridged:
        bridging.save_bridges(tmp, elastic.bridges[bridged].float())
    record = {"config": cfg.to_dict(), "uniform": uniform, "num_layers": len(active), "bridges": bridged,
              "params": cfg.param_count(spec), **(extra or {})}
    write_json_atomic(tmp / SUBNET_FILE, record)
    if not uniform:
        # Plain from_pretrained would see shape mismatches; say so in config.json itself.
        cfg_json = json.loads((tmp / "config.json").read_text())
        cfg_json["flextron_subnet"] = cfg.to_dict()
        (tmp / "config.json").write_text(json.dumps(cfg_json, indent=2))
    (tmp / PARTIAL_MARKER).unlink()
    swap_in(tmp, out_dir)
    return {"out": str(out_dir), "uniform": uniform, "num_layers": len(active), "bridges": bridged,
            "params": record["params"],
            "loader": "AutoModelForCausalLM.from_pretrained" if uniform else "flextron.load_subnet"}


def load_subnet(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Load an exported sub-network (uniform or heterogeneous) as a plain transformers model. An export with
    linear bridges runs them in forward hooks, on `device` and in `dtype`: load it where it will run."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FlextronError(f"{path} is not an exported flextron model (config.json and model.safetensors expected)")
    meta = read_json(path / SUBNET_FILE) if (path / SUBNET_FILE).is_file() else None
    try:
        if meta is None or meta.get("uniform", True):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                         trust_remote_code=False)
            return model.to(device).eval()
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        cfg = SubnetConfig.from_dict(meta["config"])
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        _resize_linears(model, cfg, config.head_dim, config.num_attention_heads // config.num_key_value_heads)
        missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, SafetensorError) as e:  # truncated or edited files
        raise FlextronError(
            f"{path} is a damaged export ({type(e).__name__}: {str(e)[:200]}); export it again"
        ) from None
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise FlextronError(
            f"{path}: weights do not match the sub-network (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    model = model.to(device=device, dtype=dtype).eval()
    if meta.get("bridges"):  # linear bridges of skipped layers, run by hooks where those layers stood
        weights = bridging.load_bridges(path)
        if weights is None or len(weights) != len(meta["bridges"]):
            raise FlextronError(f"{path} is a damaged export (the bridges of layers {meta['bridges']} are missing or "
                                "do not match); export it again")
        full = torch.zeros(max(meta["bridges"]) + 1, *weights.shape[1:], dtype=dtype, device=device)
        full[meta["bridges"]] = weights.to(device=device, dtype=dtype)
        model._flextron_bridge_hooks = bridging.attach(
            adapter_for(config).layers(model), list(cfg.active_layers), meta["bridges"], full,
            bridging.eps_of(config))
    return model
