"""Decode-step ratios of ad-hoc configs, measured in interleaved rounds against the first config (shared by
benchmarks that switch a model's configs by hand: attention_skip.py, bridges.py).

Each round times every config in turn: a fresh cache filled with `prompt`, one untimed warm-up step, then
`steps` timed steps of `nxt` (the cache cropped back after each); a config's round value is its median step
over the first config's median step in the same round.
"""

import math
import statistics
import time

import torch


@torch.no_grad()
def step_ratios(model, prompt, nxt, configs: dict, use, rounds: int, steps: int) -> dict[str, list[float]]:
    """{name: per-round ratio to the first config}; `use(**configs[name])` switches the model to a config."""
    from transformers import DynamicCache

    first = next(iter(configs))
    ratios = {name: [] for name in configs}
    for _ in range(rounds):
        med = {}
        for name, c in configs.items():
            use(**c)
            cache = DynamicCache(config=model.config)
            model(input_ids=prompt, cache=cache, use_cache=True)
            times = []
            for s in range(steps + 1):
                t0 = time.perf_counter()
                model(input_ids=nxt, cache=cache, use_cache=True)
                if s:  # the first step is a warm-up
                    times.append(time.perf_counter() - t0)
                cache.crop(-1)
            med[name] = statistics.median(times)
        for name in configs:
            ratios[name].append(med[name] / med[first])
    return ratios


def print_table(ppl: dict, ratios: dict, width: int = 14) -> None:
    """One row per config: perplexity, median ratio over rounds, and the rounds' p10-p90 spread."""
    print(f"{'config':{width}s} {'ppl':>8s} {'ratio':>7s} {'round spread (p10-p90)':>24s}")
    for name in ratios:
        r = sorted(ratios[name])
        lo, hi = r[int(0.1 * (len(r) - 1))], r[int(math.ceil(0.9 * (len(r) - 1)))]
        print(f"{name:{width}s} {ppl[name]:8.2f} {statistics.median(r):7.3f} {lo:11.3f}-{hi:.3f}")
