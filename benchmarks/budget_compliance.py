"""Budget compliance: run the whole job (convert, profile, fit, search, verify, report, export), or
take a finished run (`--from-run`), then measure every row of its lookup again in this fresh process,
interleaved with the full model over rounds, and print each row's ratio to the full model at its
quantile over its budget fraction (the target: every one <= 1.02), with the device.

    python benchmarks/budget_compliance.py --device cuda --shape smollm2 --regime prefill:b8:s1024
    python benchmarks/budget_compliance.py --from-run runs/demo

`--shape smollm2` writes a SmolLM2-shaped checkpoint with random weights (latency needs shapes, not
trained values; its perplexities are meaningless), so a GPU machine without the model package can run it.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from flextron.cli.run import RunConfig, run_pipeline
from flextron.elastic import ElasticModel
from flextron.spec import Regime, SubnetConfig
from profiler.telemetry import Telemetry


def write_random(shape: str, out: Path) -> str:
    """A checkpoint folder (model + byte tokenizer) of this shape with random weights."""
    from latency_model import shaped_llama

    from flextron.models import byte_tokenizer

    if not (out / "config.json").is_file():
        tok = byte_tokenizer()
        torch.manual_seed(0)
        model = shaped_llama(shape, "cpu", torch.float32, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return str(out)


def remeasure(run: Path, device: str, rounds: int, reps: int, threads: int) -> list[dict]:
    """Every lookup row measured again, in this (fresh) process, interleaved with the full model over
    `rounds` rounds; its ratio to the full model at the row's quantile against its budget fraction."""
    from flextron.devices import set_cpu_threads
    from profiler.interleaved import FULL, InterleavedSession
    from profiler.rounds import RATIO_COLUMN, per_round

    set_cpu_threads(device, threads)
    rows = json.loads((run / "export" / "lookup.json").read_text())["rows"]
    el = ElasticModel.load(run / "elastic")
    out = []
    for regime_key in sorted({r["regime"] for r in rows}):
        regime = Regime.parse(regime_key)
        mine = [r for r in rows if r["regime"] == regime_key]
        subs = {SubnetConfig.from_dict(r["config"]).key: SubnetConfig.from_dict(r["config"]) for r in mine}
        session = InterleavedSession(el, regime, device, reps=reps, warmup=2, seed=12345)
        session.run(subs, rounds)
        rt = per_round(session.samples, FULL)
        for r in mine:
            g = rt[rt["key"] == SubnetConfig.from_dict(r["config"]).key]
            ratio = float(np.median(g[RATIO_COLUMN[r.get("quantile", "p50")]]))
            out.append({**r, "remeasured_ratio": ratio, "remeasured_over_budget": ratio / r["budget_frac"],
                        "remeasured_full_ms": float(rt[rt["key"] == FULL]["median_ms"].median())})
    return out


def main():
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from latency_model import SHAPES

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--regime", default="decode:b1:ctx256")
    ap.add_argument("--budget-frac", type=float, nargs="+", default=[0.7, 0.8, 0.9])
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument(
        "--rounds", type=int, default=6, help="re-measurement rounds (each row and the full model once per round)"
    )
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0: one, as the pipeline measures)")
    ap.add_argument("--from-run", default="", help="only re-measure the lookup of this finished run (a fresh process)")
    ap.add_argument("--out", default="runs/bench-compliance")
    args = ap.parse_args()
    if args.from_run:
        out, summary, model = (
            Path(args.from_run),
            None,
            json.loads((Path(args.from_run) / "convert_config.json").read_text())["model"],
        )
    else:
        out = Path(args.out)
        model = write_random(args.shape, out.with_name(out.name + "-model")) if args.shape else args.model
        summary = run_pipeline(
            RunConfig(
                model=model,
                out=str(out),
                device=args.device,
                regime=(args.regime,),
                budget_frac=tuple(args.budget_frac),
                trials=args.trials,
            )
        )
    rows = remeasure(out, args.device, args.rounds, args.reps, args.threads)
    print(
        f"device: {Telemetry(args.device).device_name}  torch {torch.__version__}  threads {torch.get_num_threads()}  "
        f"model {model}  run {out}"
    )
    print(
        f"{'regime':>30s} {'q':>4s} {'budget frac':>11s} {'verify ratio (hi)':>18s} {'re-measured ratio':>18s} "
        f"{'/ budget':>9s} {'ppl':>8s} {'source':>8s}"
    )
    for r in rows:
        print(
            f"{r['regime']:>30s} {r['quantile']:>4s} {r['budget_frac']:11.3f} {r['ratio_to_full']:9.3f} "
            f"({r['ratio_hi']:.3f})"
            f" {r['remeasured_ratio']:18.3f} {r['remeasured_over_budget']:9.3f} {r['ppl']:8.2f} {r['source']:>8s}"
        )
    ratios = [r["remeasured_over_budget"] for r in rows]
    print(
        json.dumps(
            {
                "device": Telemetry(args.device).device_name,
                "run": str(out),
                "rows": len(rows),
                "max_remeasured_over_budget": round(max(ratios), 4),
                "within_1.02": sum(x <= 1.02 for x in ratios),
                "remeasured_full_ms": round(rows[0]["remeasured_full_ms"], 3),
                "run_seconds": summary["seconds"] if summary else None,
                "lookup": [
                    {"budget_frac": r["budget_frac"], "ppl": round(r["ppl"], 2), "source": r["source"]} for r in rows
                ],
            }
        )
    )


if __name__ == "__main__":
    main()
