"""How close llama.cpp runs flextron's GGUF exports to the elastic model they were cut from.

For the tiny Llama, Mistral and Qwen2 models and for SmolLM2-135M, at the full, a uniform and a
heterogeneous config (different head counts and FFN widths per layer): the largest |logit
difference| of the F32 export in llama.cpp against transformers fp32, with llama.cpp's f32 KV cache
and with its default f16 one; for SmolLM2 also against an fp64 reference (beside transformers fp32's
own error against it); then F16 and Q8_0 exports: |logit| differences, mean NLL per token and top-1
agreement on `--tokens` tokens of pydoc text; and whether llama.cpp tokenizes that text as the
transformers tokenizer does. Deterministic: no timing. Prints the versions and every number.

    python benchmarks/gguf_parity.py
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=256, help="SmolLM2: tokens of pydoc text for NLL and top-1")
    ap.add_argument("--prompt", type=int, default=32, help="SmolLM2: tokens of the fixed prompt for F32 parity")
    ap.add_argument("--skip-real", action="store_true", help="tiny models only")
    args = ap.parse_args()

    import pydoc_data.topics

    import numpy as np
    import torch

    from flextron.elastic import ElasticModel, spec_from_model
    from flextron.gguf_export import write_gguf
    from flextron.models import load_source, source_gguf, tiny_model
    from flextron.spec import SubnetConfig
    from profiler.llamacpp import require_binding

    llama_cpp = require_binding()
    print(json.dumps({"llama_cpp_python": llama_cpp.__version__, "torch": torch.__version__}), flush=True)
    tmp = Path(tempfile.mkdtemp())

    def configs(spec):
        L = spec.num_layers
        return {
            "full": spec.full(),
            "uniform": spec.uniform(0.5, 0.5),
            "hetero": SubnetConfig(
                tuple(spec.mlp_widths[i][i % len(spec.mlp_widths[i])] for i in range(L)),
                tuple(spec.head_counts[i][(i + 1) % len(spec.head_counts[i])] for i in range(L)),
            ),
        }

    def logits(path, ids, f32_cache=True):
        kw = {"type_k": 0, "type_v": 0} if f32_cache else {}
        llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=len(ids) + 8,
            n_batch=len(ids) + 8,
            logits_all=True,
            verbose=False,
            n_threads=2,
            **kw,
        )
        llm.eval(ids)
        out = np.array(llm.scores[: len(ids)])
        llm.close()
        return out

    def reference(elastic, cfg, ids, dtype=torch.float32):
        elastic.model.to(dtype)
        with torch.no_grad(), elastic.use(cfg):
            out = elastic.model(input_ids=torch.tensor([ids])).logits[0].double().numpy()
        elastic.model.float()
        return out

    def nll(lg, ids):
        lp = torch.log_softmax(torch.tensor(lg[:-1]), -1)
        return float(-lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean())

    def gap(a, b):
        return float(np.abs(a - b).max())

    ids_tiny = [5, 70, 33, 101, 200, 7, 9, 250, 41, 3, 120, 64]
    for family in ("tiny-llama", "tiny-mistral", "tiny-qwen2"):
        model, tok = tiny_model(family)
        el = ElasticModel(model, tok, spec_from_model(model, 16, 4, 4))
        tok.save_pretrained(tmp / "tok")
        for name, cfg in configs(el.spec).items():
            types = ("f32", "f16", "q8_0") if name == "hetero" else ("f32",)
            ref = reference(el, cfg, ids_tiny)
            row = {"model": family, "config": name}
            for t in types:
                path = tmp / f"{family}-{name}-{t}.gguf"
                write_gguf(el, cfg, path, t, elastic_dir=tmp / "tok")
                row[f"{t}_max_abs"] = round(gap(logits(path, ids_tiny), ref), 6)
            row["f32_max_abs_f16_kv_cache"] = round(
                gap(logits(tmp / f"{family}-{name}-f32.gguf", ids_tiny, False), ref), 6
            )
            print(json.dumps(row), flush=True)
    if args.skip_real:
        return

    model, tok = load_source("smollm2-135m")
    el = ElasticModel(model, tok, spec_from_model(model, 64, 8, 4))
    src = source_gguf("smollm2-135m")
    text = pydoc_data.topics.topics["assignment"][:3000]
    ids = tok(text)["input_ids"][: args.tokens]
    prompt = ids[: args.prompt]
    for name, cfg in configs(el.spec).items():
        row = {"model": "smollm2-135m", "config": name, "prompt_tokens": len(prompt), "text_tokens": len(ids)}
        f32 = tmp / f"s-{name}-f32.gguf"
        write_gguf(el, cfg, f32, "f32", source_gguf=src)
        got, r32, r64 = logits(f32, prompt), reference(el, cfg, prompt), reference(el, cfg, prompt, torch.float64)
        row.update(
            f32_vs_fp64=round(gap(got, r64), 6),
            transformers_fp32_vs_fp64=round(gap(r32, r64), 6),
            f32_vs_transformers_fp32=round(gap(got, r32), 6),
            f32_vs_transformers_fp32_f16_kv_cache=round(gap(logits(f32, prompt, False), r32), 6),
        )
        ref = reference(el, cfg, ids)
        row["f32_vs_transformers_fp32_all_tokens"] = round(gap(logits(f32, ids), ref), 6)
        row["nll_transformers_fp32"] = round(nll(ref, ids), 4)
        for t in ("f16", "q8_0"):
            path = tmp / f"s-{name}-{t}.gguf"
            write_gguf(el, cfg, path, t, source_gguf=src)
            lg = logits(path, ids)
            row[f"{t}_nll"] = round(nll(lg, ids), 4)
            row[f"{t}_max_abs"] = round(gap(lg, ref), 4)
            row[f"{t}_top1_agree"] = round(float((lg.argmax(1) == ref.argmax(1)).mean()), 4)
        if name == "full":
            vocab = llama_cpp.Llama(model_path=str(f32), n_ctx=64, verbose=False, vocab_only=True)
            row["tokenizes_like_transformers"] = (
                vocab.tokenize(text.encode(), add_bos=False, special=True) == tok(text)["input_ids"]
            )
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
