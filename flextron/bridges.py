"""Linear bridges: what a skipped layer leaves behind instead of nothing.

A decoder layer adds an update to the residual stream. Skipping it drops the update; a bridge puts back
the part of it a linear map of the layer's RMS-normalised input predicts, `h + W rms(h)`, fitted by ridge
least squares on train-split text at convert (ReplaceMe, Shopkhoev et al. 2025, fits a linear map in
place of pruned blocks the same way, training-free). One matrix per layer, fitted on the dense model's
activations, so one checkpoint serves every set of skipped layers. A layer whose bridge does not
predict its update better than nothing on held-out calibration windows keeps no bridge (skipping it stays
the identity).

Measured on SmolLM2-135M's one-shot weights (docs/results.md, session 17): skipping the depth path's
first 9 layers reads perplexity 76.9 without bridges and 43.9 with them (16k validation tokens); a
bridge (one matrix-vector product and a norm) times 0.044 ms against 2.04 ms for a whole layer.

`h + W rms(h)` is what llama.cpp's `deci` architecture runs as a "linear attention" block (an
attention-norm of ones and `attn_output` = W, with a zero FFN), so GGUF exports carry bridges exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from flextron.errors import FlextronError

BRIDGES_FILE = "bridges.safetensors"
RIDGE = 1e-2  #: ridge strength, relative to the mean diagonal of the inputs' Gram matrix


def eps_of(config) -> float:
    """The RMSNorm epsilon of a transformers config: the one a bridge's norm uses too."""
    return float(getattr(config, "rms_norm_eps", 1e-6))


def rms(h: torch.Tensor, eps: float) -> torch.Tensor:
    """`h` scaled to unit root-mean-square over the hidden dimension (in float32 at least, as RMSNorm)."""
    if h.dtype in (torch.float16, torch.bfloat16):
        x = h.float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def apply_bridge(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`h + weight @ rms(h)` (weight in nn.Linear's [out, in] layout, on h's device and in its dtype)."""
    return h + F.linear(rms(h, eps), weight)


class BridgeStats:
    """While active (a context manager), forward hooks on every decoder layer accumulate the statistics of
    a least-squares fit of the layer's update (output minus input) on its RMS-normalised input, in float64,
    into the fitting set or the held-out set (`held_out`: set it between passes, so that the held-out text
    is other text than the fitting text). Position 0 of every window is left out: the first token's hidden
    state is an outlier (an attention sink) that would dominate the fit."""

    def __init__(self, model, layers, eps: float):
        self.model, self.layers, self.eps = model, list(layers), eps
        d = model.config.hidden_size
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.gram = [[z(d, d), z(d, d)] for _ in self.layers]  # [fit, held out]
        self.cross = [[z(d, d), z(d, d)] for _ in self.layers]
        self.yy = [[0.0, 0.0] for _ in self.layers]
        self.tokens = [0, 0]
        self.held_out = False
        self._handles = []

    def __enter__(self):
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(self._hook(i), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, i):
        def hook(_mod, args, kwargs, output):
            h = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            x = rms(h[:, 1:].float(), self.eps).reshape(-1, h.shape[-1])
            y = (out[:, 1:].float() - h[:, 1:].float()).reshape(-1, h.shape[-1])
            s = int(self.held_out)
            xy = (x.T @ torch.cat([x, y], 1)).double()  # one batch's products in float32, summed in float64
            self.gram[i][s] += xy[:, :x.shape[1]].cpu()
            self.cross[i][s] += xy[:, x.shape[1]:].cpu()
            self.yy[i][s] += float(y.double().pow(2).sum())
            if i == 0:
                self.tokens[s] += x.shape[0]
        return hook

    def fit(self) -> tuple[torch.Tensor, list[float]]:
        """([L, d, d] bridge weights in nn.Linear layout, per layer the share of the held-out update's
        energy the bridge removes). A layer whose share is not positive gets a zero bridge (identity)."""
        if not self.tokens[0] or not self.tokens[1]:
            raise FlextronError(
                f"too little text to fit the layer bridges ({self.tokens[0]} fitting and {self.tokens[1]} held-out "
                "tokens): pass a larger --calib-windows or --calib-seq-len, or --no-bridges")
        weights, gains = [], []
        for g, c, yy in zip(self.gram, self.cross, self.yy):
            w = _ridge(g[0], c[0])
            err = yy[1] - 2 * float((w * c[1]).sum()) + float((w * (g[1] @ w)).sum())
            gain = 1.0 - err / yy[1] if yy[1] > 0 else 0.0
            gains.append(round(gain, 4))
            weights.append(_ridge(g[0] + g[1], c[0] + c[1]).T.float() if gain > 0 else torch.zeros_like(w.T).float())
        return torch.stack(weights), gains


def _ridge(gram: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    d = gram.shape[0]
    lam = RIDGE * float(gram.diagonal().mean())
    return torch.linalg.solve(gram + lam * torch.eye(d, dtype=gram.dtype), cross)


def save_bridges(folder: str | Path, weights: torch.Tensor) -> None:
    from safetensors.torch import save_file

    save_file({"bridges": weights.contiguous()}, str(Path(folder) / BRIDGES_FILE), metadata={"format": "pt"})


def load_bridges(folder: str | Path) -> torch.Tensor | None:
    """The [L, d, d] bridges of a checkpoint folder, or None for one converted without (or before) them."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(folder) / BRIDGES_FILE
    if not p.is_file():
        return None
    try:
        return load_file(str(p))["bridges"]
    except (SafetensorError, KeyError, OSError) as e:
        raise FlextronError(f"{p} is damaged ({type(e).__name__}: {str(e)[:160]}); re-run `flextron convert "
                            "--overwrite` (it rebuilds the checkpoint)") from None


def used(bridges: torch.Tensor | None, layer: int) -> bool:
    """Whether skipping `layer` runs a bridge (the checkpoint has one for it and it is not the identity)."""
    return bridges is not None and bool(bridges[layer].any())


def attach(layers, active: list[int], skipped, bridges: torch.Tensor, eps: float) -> list:
    """Hooks on the running decoder layers `layers` (the layers `active` of the full model, in order) that
    apply the bridges of the `skipped` layers where those layers stood: after the last active layer before
    them, or before the first active layer for skipped layers that precede every active one. Returns the
    hook handles (remove them to detach)."""
    runs: dict[int, list[int]] = {}  # position in `layers` -> bridges applied after it (-1: before layer 0)
    for l in sorted(skipped):
        if used(bridges, l):
            pos = max((j for j, a in enumerate(active) if a < l), default=-1)
            runs.setdefault(pos, []).append(l)
    handles = []
    for pos, ls in runs.items():
        ws = [bridges[l] for l in ls]

        def bridge_all(h, ws=ws):
            for w in ws:
                h = apply_bridge(h, w, eps)
            return h

        if pos >= 0:
            def after(_mod, _args, output, f=bridge_all):
                if isinstance(output, tuple):
                    return (f(output[0]), *output[1:])
                return f(output)

            handles.append(layers[pos].register_forward_hook(after))
        else:
            def before(_mod, args, kwargs, f=bridge_all):
                if args:
                    return (f(args[0]), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": f(kwargs["hidden_states"])}

            handles.append(layers[0].register_forward_pre_hook(before, with_kwargs=True))
    return handles
