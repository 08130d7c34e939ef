"""Is skipping a layer's attention alone worth it (issue 20: "attention alone too where the family and
exports allow it")? On a run's one-shot weights (Llama family), compares per step of latency bought:
- attention skipped in the k layers where that alone costs least (k = 4, 8, 12, 16, 20), the MLP kept;
- whole layers skipped along the same single-layer ranking (k = 2, 4, 6, 8).
Ranks by single-layer loss deltas on 4 x 128 calibration tokens, scores ppl on 24 x 256 validation
tokens, and times a batch-1 decode step at context 255 on one thread, pinned to the last core, all
configs interleaved in each of `--rounds` rounds (ratio: median over rounds of the round's median over
the full model's). Attention skipping is done here by replacing the layer's forward (MLP half only);
flextron's configs do not hold it.

    python benchmarks/attention_skip.py --run runs/demo [--rounds 8]
"""

import argparse
import math
import os
import sys
import types
from pathlib import Path

import torch

from flextron.data import token_windows
from flextron.elastic import ElasticModel
from profiler.telemetry import Telemetry

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_rounds import print_table, step_ratios  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(2)
    em = ElasticModel.load(f"{args.run}/elastic")
    if em.spec.family != "llama":
        raise SystemExit(f"this benchmark replaces Llama decoder layers' forward; {em.spec.family} is not llama")
    m, ad = em.model, em.adapter
    layers = list(ad.layers(m))
    L = len(layers)
    cal = token_windows(em.tokenizer, ad, "calibration", 128, 4)
    val = token_windows(em.tokenizer, ad, "validation", 256, 24)
    own = [layer.forward for layer in layers]

    def mlp_only(self, hidden_states, *a, **kw):
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))

    def use(attn_skip=(), skip=()):
        active = [i for i in range(L) if i not in skip]
        m.model.layers = torch.nn.ModuleList([layers[i] for i in active])
        a = 0
        for i in active:  # attention layers renumbered 0.. for the KV cache, as flextron does for depth
            if i in attn_skip:
                layers[i].forward = types.MethodType(mlp_only, layers[i])
            else:
                layers[i].forward = own[i]
                layers[i].self_attn.layer_idx = a
                a += 1

    @torch.no_grad()
    def loss(ws, **c):
        use(**c)
        tot, n = 0.0, 0
        for ids in ws.split(8):
            lg = m(input_ids=ids, use_cache=False).logits[:, :-1].float()
            tot += torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1),
                                                     reduction="sum").item()
            n += ids[:, 1:].numel()
        use()
        return tot / n

    base = loss(cal)
    d_attn = [loss(cal, attn_skip=(i,)) - base for i in range(L)]
    d_layer = [loss(cal, skip=(i,)) - base for i in range(L)]
    by_attn = sorted(range(L), key=lambda i: d_attn[i])
    by_layer = sorted(range(L), key=lambda i: d_layer[i])
    print("single-layer loss deltas, attention alone:", [round(x, 3) for x in d_attn])
    print("single-layer loss deltas, whole layer:    ", [round(x, 3) for x in d_layer], flush=True)
    configs = {"full": {}}
    configs.update({f"attention x{k}": {"attn_skip": tuple(by_attn[:k])} for k in (4, 8, 12, 16, 20)})
    configs.update({f"layers x{k}": {"skip": tuple(by_layer[:k])} for k in (2, 4, 6, 8)})
    ppl = {name: math.exp(loss(val, **c)) for name, c in configs.items()}

    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    prompt, nxt = val[:1, :255], val[:1, 255:256]
    ratios = step_ratios(m, prompt, nxt, configs, use, args.rounds, args.steps)
    use()
    print(f"\ndevice: {Telemetry('cpu').device_name}  torch {torch.__version__}  one thread, pinned; "
          f"{args.rounds} interleaved rounds x {args.steps} steps; ppl on {val[:, 1:].numel()} validation tokens")
    print_table(ppl, ratios)

if __name__ == "__main__":
    main()
