"""A fake timer with known latencies, for tests that assert on an outcome of measured time (a budget
resolved against the full model, a verdict, an ordering): on these numbers such a test passes on a
busy machine and its expected values can be computed.

`KnownLatency().install(monkeypatch)` makes every `profiler.timer.Timer.measure` of a `RegimeBench`
callable return fixed samples instead of timing it: a layer cell costs a known amount for its kind and
width, and a whole sub-network the sum over the layers it runs plus a fixed part, so a latency model
fitted on a profile measured this way predicts it exactly. The callables are still built (and the
sweep's first probe of each config still runs it), so everything but the clock is exercised.
"""

from __future__ import annotations

# ms: a fixed cost plus a cost per unit of width (heads, MLP neurons); chosen so that narrower is always
# faster and the narrowest config is far (about 0.4x) below the full model
ATTN_MS = (0.1, 0.2)  # 0.1 ms + 0.2 ms per attention head
MLP_MS = (0.1, 0.005)  # 0.1 ms + 0.005 ms per MLP neuron
LAYER_BEYOND_MS = 0.2  # a whole layer costs this beyond its attention and MLP (norms, residual adds)
BRIDGE_MS = 0.03  # a skipped layer's linear bridge (flextron.bridges), where it has one
EMBED_MS, HEAD_MS, GAP_MS = 0.05, 0.3, 0.1  # embedding, final norm + LM head, and what only a whole step has
SPREAD = (0.99, 1.0, 1.01)  # each measurement's samples, as multiples of its known latency (median exact)


class Known:
    """A zero-argument callable tagged with the latency the fake timer reports for it."""

    def __init__(self, fn, ms: float):
        self.fn, self.ms = fn, ms

    def __call__(self):
        return self.fn()


class KnownLatency:
    def attn_ms(self, heads: int) -> float:
        return ATTN_MS[0] + ATTN_MS[1] * heads

    def mlp_ms(self, width: int) -> float:
        return MLP_MS[0] + MLP_MS[1] * width

    def cell_ms(self, spec, layer: int, kind: str, width: int) -> float:
        """A profile layer cell (see `RegimeBench.cell_fn`)."""
        if kind == "attn":
            return self.attn_ms(width)
        if kind == "mlp":
            return self.mlp_ms(width)
        if kind == "layer":  # the whole layer at full size
            return self.attn_ms(spec.head_counts[layer][-1]) + self.mlp_ms(spec.mlp_widths[layer][-1]) + LAYER_BEYOND_MS
        return {"embed": EMBED_MS, "head": HEAD_MS, "bridge": BRIDGE_MS}[kind]

    def e2e_ms(self, cfg, bridges=None) -> float:
        """One step of sub-network `cfg` (a `SubnetConfig`): the layers it runs, the bridges of the layers it
        skips (`bridges`: the elastic model's, None for none), and the fixed part."""
        from flextron.bridges import used

        layers = sum(self.attn_ms(cfg.heads[l]) + self.mlp_ms(cfg.mlp_width[l]) + LAYER_BEYOND_MS
                     for l in cfg.active_layers)
        return EMBED_MS + HEAD_MS + GAP_MS + layers + BRIDGE_MS * sum(used(bridges, l) for l in cfg.skip)

    def ratio(self, cfg, full) -> float:
        return self.e2e_ms(cfg) / self.e2e_ms(full)

    def install(self, monkeypatch) -> "KnownLatency":
        """Tag `RegimeBench`'s callables with their known latency and make `Timer.measure` report it."""
        from profiler.bench import RegimeBench
        from profiler.timer import Timer, Timing

        real_forward, real_cell = RegimeBench.forward_fn, RegimeBench.cell_fn
        known = self

        def forward_fn(bench, cfg):
            return Known(real_forward(bench, cfg), known.e2e_ms(cfg, bench.elastic.bridges))

        def cell_fn(bench, layer, kind, width):
            return Known(real_cell(bench, layer, kind, width), known.cell_ms(bench.elastic.spec, layer, kind, width))

        def measure(timer, fn):
            if not isinstance(fn, Known):
                raise AssertionError(f"the known-latency timer was asked to time an untagged callable {fn!r}")
            return Timing([fn.ms * s for s in SPREAD])

        monkeypatch.setattr(RegimeBench, "forward_fn", forward_fn)
        monkeypatch.setattr(RegimeBench, "cell_fn", cell_fn)
        monkeypatch.setattr(Timer, "measure", measure)
        return self
