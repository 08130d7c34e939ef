"""How one regime's cells run in the model's own transformers code: the whole sub-network, or one
layer's attention or MLP module at one width.

`RegimeBench` holds the regime's inputs on the device and hands out zero-argument callables for the
timer. A layer cell calls the model's own module with the exact arguments the model passes it,
captured from a real forward (rotary embeddings, masks, a real static KV cache for decode). A
decode step writes one token into a static cache of `seq_len + 1` slots and its write position is
reset before every call, so every timed step sees the same context. `profiler/llamacpp.py` has the
same interface for the llama.cpp engine.

Inputs are random token ids, unless real `text` is given: then prefill runs real windows and each
decode step feeds the next real token (copied in place before every call, whichever the config), so
work that depends on the tokens (per-token routing) sees what it sees in use.
"""

from __future__ import annotations

import inspect

from flextron.spec import Regime, SubnetConfig


class RegimeBench:
    """Inputs and captured per-layer call arguments for one regime on one device."""

    def __init__(self, elastic, regime: Regime, device: str, text=None):
        import torch

        self.torch = torch
        self.elastic, self.regime, self.device = elastic, regime, torch.device(device)
        vocab = elastic.spec.vocab_size
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (regime.batch, regime.new_tokens), generator=g).to(self.device)
        self._tokens = None  # decode on real text: [steps, batch, 1] tokens fed in turn
        if text is not None:
            self._use_text(torch.as_tensor(text).reshape(-1))
        self._captures: dict[int, tuple] = {}
        self._layer_calls: dict[int, dict] = {}

    def _use_text(self, text) -> None:
        """Real tokens as inputs: prefill windows, or one decode step's token after another."""
        need = self.regime.batch * self.regime.new_tokens
        if text.numel() == 0:
            raise ValueError("real text inputs need at least one token")
        if text.numel() < need:  # fewer tokens than one input holds: the text again, from its start
            text = text.repeat(-(-need // text.numel()))
        if self.regime.phase == "decode":
            steps = text.numel() // self.regime.batch
            self._tokens = text[: steps * self.regime.batch].view(steps, self.regime.batch, 1).to(self.device)
            self._step = 0
        self.ids = text[:need].view(self.regime.batch, self.regime.new_tokens).to(self.device).clone()

    def _next_tokens(self) -> None:
        if self._tokens is not None:
            self.ids.copy_(self._tokens[self._step % len(self._tokens)])
            self._step += 1

    def _new_cache(self):
        """A static KV cache of context+1 slots whose write position is reset by one op per call."""
        from transformers import StaticCache

        return StaticCache(config=self.elastic.model.config, max_cache_len=self.regime.seq_len + 1)

    def _pin_position(self, cache):
        torch = self.torch
        pos = torch.full((len(cache.layers),), self.regime.seq_len, dtype=torch.long, device=self.device)
        for i, layer in enumerate(cache.layers):
            layer.cumulative_length = pos[i]
        return lambda: pos.fill_(self.regime.seq_len)

    def model_kwargs(self, cache=None) -> dict:
        torch = self.torch
        kw = {"input_ids": self.ids, "logits_to_keep": 1}
        if self.regime.phase == "decode":
            ctx = self.regime.seq_len
            # transformers >= 5.25 names the argument `cache` (`past_key_values` warns on every call)
            name = "cache" if "cache" in inspect.signature(self.elastic.model.forward).parameters else "past_key_values"
            kw.update({name: cache}, use_cache=True,
                      cache_position=torch.tensor([ctx], device=self.device),
                      position_ids=torch.full((self.regime.batch, 1), ctx, device=self.device))
        else:
            kw.update(use_cache=False)
        return kw

    def forward_fn(self, cfg: SubnetConfig):
        """A zero-argument callable running the whole sub-network once (cache initialised)."""
        el = self.elastic
        el.set_config(cfg)
        cache = self._new_cache() if self.regime.phase == "decode" else None
        kw = self.model_kwargs(cache)
        with self.torch.inference_mode():
            el.model(**kw)  # initialises the cache lazily at this config's head counts
        reset = self._pin_position(cache) if cache is not None else (lambda: None)

        def run():
            reset()
            self._next_tokens()
            return el.model(**kw)

        return run

    def capture(self, head_idx: int):
        """Arguments every attention and MLP module receives under uniform head choice `head_idx`."""
        if head_idx in self._captures:
            return self._captures[head_idx]
        el = self.elastic
        spec = el.spec
        cfg = SubnetConfig(spec.full().mlp_width, tuple(hs[head_idx] for hs in spec.head_counts))
        el.set_config(cfg)
        cache = self._new_cache() if self.regime.phase == "decode" else None
        attn_calls, mlp_inputs, head_in, layer_calls = {}, {}, {}, {}
        hooks = []
        for i, layer in enumerate(el.adapter.layers(el.model)):
            def attn_hook(mod, args, kwargs, i=i):
                attn_calls[i] = (args, dict(kwargs))
            def mlp_hook(mod, args, i=i):
                mlp_inputs[i] = args[0].clone()
            def layer_hook(mod, args, kwargs, i=i):
                layer_calls[i] = (tuple(a.clone() if hasattr(a, "clone") else a for a in args), dict(kwargs))
            hooks.append(layer.register_forward_pre_hook(layer_hook, with_kwargs=True))
            hooks.append(el.adapter.attn_of(layer).register_forward_pre_hook(attn_hook, with_kwargs=True))
            hooks.append(el.adapter.mlp_of(layer).register_forward_pre_hook(mlp_hook))
        hooks.append(el.model.lm_head.register_forward_pre_hook(lambda m, a: head_in.setdefault("x", a[0].clone())))
        try:
            with self.torch.inference_mode():
                el.model(**self.model_kwargs(cache))
        finally:
            for h in hooks:
                h.remove()
        reset = self._pin_position(cache) if cache is not None else (lambda: None)
        self._captures[head_idx] = (attn_calls, mlp_inputs, head_in["x"], reset)
        self._layer_calls[head_idx] = layer_calls
        return self._captures[head_idx]

    def cell_fn(self, layer: int, kind: str, width: int):
        """A zero-argument callable running one layer cell: `kind` "embed" or "head" (layer -1, width
        0), "attn" at `width` heads or "mlp" at `width` hidden neurons of layer `layer`, "layer":
        the whole decoder layer at full size (width 0), whose time beyond its attention and MLP is
        what skipping the layer saves besides them, or "bridge" (width 0): the layer's linear bridge,
        what a config that skips it runs instead."""
        el, spec = self.elastic, self.elastic.spec
        model = el.model
        if kind == "embed":
            emb = model.get_input_embeddings()
            return lambda: emb(self.ids)
        if kind == "head":
            _, _, head_x, _ = self.capture(len(spec.head_counts[0]) - 1)
            norm = model.model.norm  # the final norm sits on the inner model in every supported family
            return lambda: model.lm_head(norm(head_x))
        layer_mod = el.adapter.layers(model)[layer]
        if kind == "attn":
            head_idx = spec.head_counts[layer].index(width)
            attn_calls, _, _, reset = self.capture(head_idx)
            args, kwargs = attn_calls[layer]
            attn = el.adapter.attn_of(layer_mod)
            el.set_config(SubnetConfig(spec.full().mlp_width, tuple(hs[head_idx] for hs in spec.head_counts)))

            def run():
                reset()
                return attn(*args, **kwargs)

            return run
        if kind == "mlp":
            _, mlp_inputs, _, _ = self.capture(len(spec.head_counts[0]) - 1)
            x = mlp_inputs[layer]
            mlp = el.adapter.mlp_of(layer_mod)
            el.set_config(SubnetConfig(tuple(width if i == layer else ws[-1] for i, ws in enumerate(spec.mlp_widths)),
                                       spec.full().heads))
            return lambda: mlp(x)
        if kind == "bridge":  # what a skipped layer runs in its place (flextron.bridges), on the layer's input
            from flextron.bridges import apply_bridge

            full = len(spec.head_counts[0]) - 1
            self.capture(full)
            args, kwargs = self._layer_calls[full][layer]
            h = args[0] if args else kwargs["hidden_states"]
            w, eps = el.cast_bridges()[layer], el.rms_eps
            el.set_config(spec.full())
            return lambda: apply_bridge(h, w, eps)
        if kind == "layer":
            full = len(spec.head_counts[0]) - 1
            _, _, _, reset = self.capture(full)
            args, kwargs = self._layer_calls[full][layer]
            el.set_config(spec.full())

            def run_layer():
                reset()
                return layer_mod(*args, **kwargs)

            return run_layer
        raise ValueError(kind)
