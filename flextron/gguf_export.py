"""Models out, for llama.cpp: a SubnetConfig written as one GGUF file.

A uniform config of a Llama-layout family becomes an ordinary `llama` GGUF. A heterogeneous one
becomes a `deci` GGUF: llama.cpp's `deci` architecture builds every layer from its own query-head,
KV-head and FFN-width entries (per-layer arrays), while plain `llama` builds every layer from layer
0's shapes. The head dimension is the same in every layer, as in every flextron model. Skipped
layers (depth) are not written: the blocks are the active layers, renumbered, and "uniform" looks at
those only; a skipped layer with a linear bridge (flextron.bridges) becomes a `deci` block of its own,
"linear attention" (attn_output applied to the RMS-normed input, an attention norm of ones) and a zero
FFN of `BRIDGE_FFN` neurons.

Weights are the elastic model's prefix slices (`hf_export._sliced_state_dict`), with Q and K rows
reordered for llama.cpp's rotary layout (the same row permutation llama.cpp's own converter applies
to Hugging Face Llama checkpoints). Tokenizer, chat template and special tokens are copied from the
source GGUF when the run was converted from one, else built from the run's `tokenizer.json`
(byte-level BPE only). The file is written beside its target and renamed into place.

Mistral models with a sliding window are written as `llama` like llama.cpp's own converter does:
llama.cpp then attends to the whole context, which differs only past the window.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np

from flextron import bridges as bridging
from flextron.errors import FlextronError
from flextron.spec import SubnetConfig

GGUF_TYPES = ("f32", "f16", "q8_0")
BRIDGE_FFN = 32  #: neurons of a bridge block's zero FFN (one quantisation block: q8_0 rows hold 32 values)
# Families whose decoder llama.cpp's llama/deci graphs compute exactly (RMSNorm, SwiGLU, rotary
# positions with rotate-half, optional q/k/v/o biases: Qwen2's q/k/v biases included). The others
# are refused, naming the family.
LLAMA_LAYOUT = ("llama", "mistral", "qwen2")
_GEMMA3 = ("llama.cpp's gemma3 graph (sliding-window layers, scaled embeddings, extra norms) reads one shape "
           "for every layer")
REFUSED = {"qwen3": "llama.cpp's deci graph has no per-head q/k norms", "gemma3": _GEMMA3, "gemma3_text": _GEMMA3}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


def check_gguf_type(gguf_type: str) -> str:
    if gguf_type not in GGUF_TYPES:
        raise FlextronError(f"--gguf-type {gguf_type!r} is not one flextron writes; use one of {', '.join(GGUF_TYPES)} "
                            "(llama.cpp's own llama-quantize makes the others from an f16 file)")
    return gguf_type


def check_family(family: str) -> None:
    if family not in LLAMA_LAYOUT:
        why = REFUSED.get(family, "llama.cpp has no mapping for it in flextron")
        raise FlextronError(f"GGUF export does not support the {family!r} family: {why}. GGUF export covers "
                            f"{', '.join(LLAMA_LAYOUT)}; export this model with --format hf instead")


def check_gguf_out(out: str | Path, overwrite: bool) -> Path:
    """Refuse an --out that is not a new `.gguf` file, or an existing one without `overwrite`."""
    out = Path(os.path.abspath(out))
    if out.suffix != ".gguf":
        raise FlextronError(f"--out {out} does not end in .gguf; name the file to write, e.g. RUN/export/model.gguf")
    if out.is_dir():
        raise FlextronError(f"--out {out} is a folder; name a .gguf file")
    if out.exists() and not overwrite:
        raise FlextronError(f"--out {out} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise FlextronError(f"--out {out}: folder {out.parent} does not exist; create it first")
    return out


def _rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder each head's rows from rotate-half pairs (i, i+d/2) to llama.cpp's adjacent pairs
    (2i, 2i+1). `w` is (n_heads*head_dim, ...) — a weight or a bias."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    kind = params.get("rope_type", "default")
    if kind != "default":
        raise FlextronError(f"GGUF export supports plain rotary positions only; this model uses rope_type {kind!r}")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise FlextronError("the model config has no rope_theta; cannot write the GGUF rotary settings")
    return float(theta)


def _gguf_kinds(gguf_type: str):
    """(tensor type, file type) of a --gguf-type."""
    import gguf

    q, f = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {"f32": (q.F32, f.ALL_F32), "f16": (q.F16, f.MOSTLY_F16), "q8_0": (q.Q8_0, f.MOSTLY_Q8_0)}[gguf_type]


def _tensor(writer, name: str, arr: np.ndarray, qtype) -> None:
    import gguf

    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:  # norms and biases stay F32
        writer.add_tensor(name, arr)
    elif qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, arr.astype(np.float16))
    else:
        if arr.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            raise FlextronError(f"{name}: row length {arr.shape[-1]} is not a multiple of the "
                                f"{qtype.name} block ({gguf.GGML_QUANT_SIZES[qtype][0]}); use --gguf-type f16")
        data = gguf.quants.quantize(arr, qtype)
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)


@functools.lru_cache(maxsize=4)
def _tokenizer_fields(source: str, stamp: tuple[int, int]) -> tuple:
    """The `tokenizer.*` metadata of a GGUF file as (key, value, type, sub-type), read once per
    process and file version (`stamp`: size, mtime): parsing 49k tokens and merges takes seconds."""
    import gguf

    out = []
    for key, field in gguf.GGUFReader(source).fields.items():
        if key.startswith("tokenizer."):
            vtype = field.types[0]
            out.append((key, field.contents(), vtype, field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None))
    return tuple(out)


def _copy_tokenizer_from_gguf(writer, source: Path) -> None:
    st = source.stat()
    for key, value, vtype, sub in _tokenizer_fields(str(source), (st.st_size, st.st_mtime_ns)):
        writer.add_key_value(key, value, vtype, sub_type=sub)


def _tokenizer_from_hf(writer, tokenizer, elastic_dir: Path, vocab_size: int) -> None:
    """gpt2-style (byte-level BPE) tokenizer metadata from the run's tokenizer files."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = json.loads(backend.to_str()) if backend is not None else {}
    if model.get("model", {}).get("type") != "BPE" or (model.get("decoder") or {}).get("type") != "ByteLevel":
        raise FlextronError("GGUF export builds byte-level BPE tokenizers only; this model's tokenizer is "
                            f"{model.get('model', {}).get('type', type(tokenizer).__name__)}. Convert the run from "
                            "the model's GGUF file (flextron convert --model FILE.gguf) so its tokenizer is copied")
    id_to_tok = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        tok = id_to_tok.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
        else:
            tokens.append(tok)
            types.append((TOKEN_CONTROL if added[tok] else TOKEN_USER_DEFINED) if tok in added else TOKEN_NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = model["model"].get("merges") or []
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    if not merges:
        # llama.cpp requires a non-empty merges list for gpt2 tokenizers, and GGUF has no empty arrays.
        # A byte-level tokenizer without merges (flextron's tiny test models) gets one pair whose join
        # is not a token: llama.cpp then falls back to the two single characters, so text tokenizes
        # exactly as before.
        a, b = tokens[0], tokens[1]
        if a + b in tokenizer.get_vocab():
            raise FlextronError("cannot write a tokenizer without merges whose first two tokens join into a third")
        merges = [f"{a} {b}"]
    writer.add_key_value(gguf.Keys.Tokenizer.MERGES, merges, gguf.GGUFValueType.ARRAY,
                         sub_type=gguf.GGUFValueType.STRING)
    special = gguf.SpecialVocab(elastic_dir, load_merges=False, n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)
    if tokenizer.chat_template and not special.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def write_gguf(elastic, cfg: SubnetConfig, out: str | Path, gguf_type: str = "f16", *, source_gguf: Path | None = None,
               elastic_dir: Path | None = None, name: str = "flextron subnet", overwrite: bool = False,
               drop_attention: bool = False) -> dict:
    """Write `cfg` of `elastic` to the GGUF file `out`. `source_gguf` (the run's source file, when
    there is one) supplies the tokenizer; otherwise it is built from the tokenizer files in
    `elastic_dir`. Returns what was written.

    `drop_attention` writes a probe, not a model: every block but the first without its attention
    (deci's n_head = 0 layers; llama.cpp cannot build a model without any KV cache, so block 0, the
    first active layer, keeps `cfg`'s). The llama.cpp engine times it beside configs as the zero of
    its attention terms (`profiler/llamacpp.py`). No FFN-free counterpart: this llama.cpp's deci
    graph asserts on those."""
    import gguf

    from flextron.hf_export import _sliced_state_dict

    spec = elastic.spec
    spec.validate(cfg)
    check_family(spec.family)
    check_gguf_type(gguf_type)
    out = check_gguf_out(out, overwrite)
    config = elastic.model.config
    theta = _rope_theta(config)
    # Blocks are the active layers, renumbered 0..K-1, and in place of a skipped layer its linear bridge
    # when the checkpoint has one (a skipped layer without one is not written); the lists below are per block.
    active = cfg.active_layers
    blocks = [("layer", l) if l not in cfg.skip else ("bridge", l)
              for l in range(spec.num_layers) if l in active or bridging.used(elastic.bridges, l)]
    bridged = [l for kind, l in blocks if kind == "bridge"]
    if bridged and spec.hidden_size % spec.head_dim:
        raise FlextronError(
            f"this config skips layers {bridged} with linear bridges, which llama.cpp runs as deci 'linear attention' "
            f"blocks of hidden_size / head_dim heads, but {spec.hidden_size} is not a multiple of {spec.head_dim}; "
            "convert with --no-bridges to export configs that skip layers")
    uniform = cfg.is_uniform() and not drop_attention and not bridged
    arch = "llama" if uniform else "deci"
    # A bridge block: "linear attention" (n_head > 0, n_head_kv 0: attn_output applied to the normed input)
    # and a zero FFN of BRIDGE_FFN neurons (this llama.cpp's deci graph drops an FFN-free block's output).
    mlp_width = [cfg.mlp_width[l] if kind == "layer" else BRIDGE_FFN for kind, l in blocks]
    n_head = [spec.hidden_size // spec.head_dim if kind == "bridge" else 0 if drop_attention and j else cfg.heads[l]
              for j, (kind, l) in enumerate(blocks)]
    kv = [0 if kind == "bridge" else h // spec.q_per_kv for h, (kind, _) in zip(n_head, blocks)]
    qtype, file_type = _gguf_kinds(gguf_type)

    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_name(name)
        writer.add_file_type(file_type)
        writer.add_block_count(len(blocks))
        writer.add_context_length(int(config.max_position_embeddings))
        writer.add_embedding_length(spec.hidden_size)
        writer.add_vocab_size(spec.vocab_size)
        writer.add_rope_dimension_count(spec.head_dim)
        writer.add_rope_freq_base(theta)
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_key_length(spec.head_dim)
        writer.add_value_length(spec.head_dim)
        if uniform:
            writer.add_feed_forward_length(mlp_width[0])
            writer.add_head_count(n_head[0])
            writer.add_head_count_kv(kv[0])
        else:
            writer.add_feed_forward_length(mlp_width)
            writer.add_head_count(n_head)
            writer.add_head_count_kv(kv)
        if source_gguf is not None:
            _copy_tokenizer_from_gguf(writer, source_gguf)
        else:
            _tokenizer_from_hf(writer, elastic.tokenizer, elastic_dir, spec.vocab_size)

        state = {k: v.float().numpy() for k, v in _sliced_state_dict(elastic, cfg).items()}
        _tensor(writer, "token_embd.weight", state["model.embed_tokens.weight"], qtype)
        _tensor(writer, "output_norm.weight", state["model.norm.weight"], qtype)
        if not spec.tie_word_embeddings:
            _tensor(writer, "output.weight", state["lm_head.weight"], qtype)
        row = {l: j for j, l in enumerate(active)}  # the sliced state dict numbers the active layers 0..K-1
        d = spec.hidden_size
        for i, (kind, l) in enumerate(blocks):
            b = f"blk.{i}."
            if kind == "bridge":
                _tensor(writer, f"{b}attn_norm.weight", np.ones(d, np.float32), qtype)
                _tensor(writer, f"{b}attn_output.weight", elastic.bridges[l].float().numpy(), qtype)
                zero_ffn = (("ffn_gate", (BRIDGE_FFN, d)), ("ffn_up", (BRIDGE_FFN, d)), ("ffn_down", (d, BRIDGE_FFN)))
                for gg, shape in zero_ffn:
                    _tensor(writer, f"{b}{gg}.weight", np.zeros(shape, np.float32), qtype)
                _tensor(writer, f"{b}ffn_norm.weight", np.ones(d, np.float32), qtype)
                continue
            p = f"model.layers.{row[l]}."
            heads = {"q_proj": n_head[i], "k_proj": kv[i]}
            for hf, gg in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_output")):
                for part in ("weight", "bias"):
                    t = state.get(f"{p}self_attn.{hf}.{part}")
                    if t is None or not n_head[i]:
                        continue
                    _tensor(writer, f"{b}{gg}.{part}", _rope_rows(t, heads[hf]) if hf in heads else t, qtype)
            for hf, gg in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
                _tensor(writer, f"{b}{gg}.weight", state[f"{p}mlp.{hf}.weight"], qtype)
            _tensor(writer, f"{b}ffn_norm.weight", state[f"{p}post_attention_layernorm.weight"], qtype)
            if n_head[i]:
                _tensor(writer, f"{b}attn_norm.weight", state[f"{p}input_layernorm.weight"], qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return {"out": str(out), "format": "gguf", "arch": arch, "gguf_type": gguf_type, "uniform": uniform,
            "num_layers": len(active), "bridges": bridged,
            "params": cfg.param_count(spec), "bytes": out.stat().st_size,
            "loader": "llama.cpp (llama_cpp.Llama(model_path=...))"}
