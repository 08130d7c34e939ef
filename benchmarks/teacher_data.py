"""Does mixing teacher-generated continuations into training help when the real text runs out?

Two elastic continued-training runs from the same converted model, equal steps and batch: (a) real
text only, from a small training corpus that repeats several times over the run; (b) the same real
text with a share of the windows replaced by the frozen model's own continuations of prompts taken
from that corpus (`flextron synth`). Both are scored on held-out real text only (the built-in
corpus's validation split, at least 16k tokens): the full model, the smallest and a middle uniform
sub-network. Prints tokens, wall time, the device and the repeat factor of the real text.

    python benchmarks/teacher_data.py --from-run runs/demo_c --real-docs 40 --steps 40
"""

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch

from flextron.data import load_documents, token_windows
from flextron.elastic import ElasticModel
from flextron.evaluate import mean_loss
from flextron.teacher_data import SynthConfig, synth
from flextron.train import TrainConfig, train
from profiler.telemetry import Telemetry


def small_corpus(path: Path, docs: int) -> Path:
    """The first `docs` train-split documents of the built-in corpus, one paragraph each, as a text file
    (none of them in the built-in validation split)."""
    chosen = [d.text.replace("\n\n", "\n") for d in load_documents("wiki") if d.split == "train"][:docs]
    path.write_text("\n\n".join(chosen))
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--from-run", default="runs/demo_c", help="a converted run (its elastic/ is copied)")
    ap.add_argument("--out", default="runs/bench-teacher")
    ap.add_argument("--real-docs", type=int, default=40, help="train-split documents in the small real corpus")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--mix", type=float, default=0.5, help="share of windows from teacher data in run (b)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--val-windows", type=int, default=64)
    ap.add_argument("--val-seq-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = small_corpus(out / "real_corpus.txt", args.real_docs)
    runs = {}
    for name in ("real", "mixed"):
        run = out / name
        if not (run / "elastic").is_dir():
            shutil.copytree(Path(args.from_run) / "elastic", run / "elastic")
            for f in ("convert_config.json",):
                if (Path(args.from_run) / f).is_file():
                    shutil.copy(Path(args.from_run) / f, run / f)
        runs[name] = run
    el = ElasticModel.load(runs["real"] / "elastic", device=args.device)
    real = token_windows(el.tokenizer, el.adapter, "train", args.seq_len, None, str(corpus))
    needed = args.steps * args.batch_size
    n_teacher = round(needed * args.mix)
    t0 = time.perf_counter()
    gen = synth(SynthConfig(run=str(runs["mixed"]), sequences=n_teacher, seq_len=args.seq_len,
                            prompt_len=args.prompt_len, seed=args.seed, device=args.device, corpus=str(corpus)))
    t_gen = time.perf_counter() - t0
    results = {}
    for name, run in runs.items():
        t0 = time.perf_counter()
        extra = {"teacher_data": gen["name"], "teacher_mix": args.mix} if name == "mixed" else {}
        tr = train(TrainConfig(run=str(run), steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                               device=args.device, seed=args.seed, corpus=str(corpus), **extra))
        results[name] = {"train": tr, "train_s": time.perf_counter() - t0}
    val = token_windows(el.tokenizer, el.adapter, "validation", args.val_seq_len, args.val_windows, "wiki")
    spec = el.spec
    configs = {"full": spec.full(), "uniform 0.5": spec.uniform(0.5), "smallest": spec.smallest()}
    ppl = {"one-shot": {k: math.exp(mean_loss(el, c, val)) for k, c in configs.items()}}
    for name, run in runs.items():
        m = ElasticModel.load(run / "trained", device=args.device)
        ppl[name] = {k: math.exp(mean_loss(m, c, val)) for k, c in configs.items()}
    device = Telemetry(args.device).device_name
    real_used = needed - (n_teacher if args.mix else 0)
    print(f"device: {device}  torch {torch.__version__}  threads {torch.get_num_threads()}  model {spec.family} "
          f"{spec.num_layers} layers")
    print(f"real training text: {len(real)} windows of {args.seq_len} ({real.numel()} tokens) from {args.real_docs} "
          f"train-split documents; run (a) reads {needed} windows ({needed / len(real):.1f} passes), run (b) "
          f"{needed - n_teacher} real ({(needed - n_teacher) / len(real):.1f} passes) + {n_teacher} teacher windows")
    print(f"teacher data: {gen['sequences']} sequences ({gen['sequences'] * args.seq_len} tokens, prompts of "
          f"{args.prompt_len}) in {t_gen:.0f} s")
    for name in runs:
        r = results[name]
        print(f"run {name}: {r['train']['steps']} steps, {r['train']['tokens']} train tokens, {r['train_s']:.0f} s")
    print(f"\nvalidation perplexity, {val[:, 1:].numel()} held-out real tokens (built-in corpus, validation split)")
    print(f"{'sub-network':>12s} " + " ".join(f"{k:>10s}" for k in ppl))
    for k in configs:
        print(f"{k:>12s} " + " ".join(f"{ppl[n][k]:10.2f}" for n in ppl))
    print(f"total wall {time.perf_counter() - t_start:.0f} s")
    print(json.dumps({"device": device, "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                      "real_windows": len(real), "real_windows_read": real_used, "teacher_windows": n_teacher,
                      "mix": args.mix, "validation_tokens": int(val[:, 1:].numel()),
                      "ppl": {n: {k: round(v, 3) for k, v in d.items()} for n, d in ppl.items()}}))


if __name__ == "__main__":
    main()
