"""How much each tensor's error moves the model's output distribution, measured on calibration windows.

For a linear y = W x, an error E in W moves output r at token s by δ = (E x_s)_r.  To second order the KL divergence
of the model's next-token distributions from the full-precision ones is ½ δᵀ F δ, F the Fisher information of those
distributions with respect to y.  Keeping F's diagonal and taking the gradients' and the activations' magnitudes as
independent, the mean KL per token is

    ΔKL(E) ≈ ½ Σ_r ḡ_r Σ_j h̄_j E_rj²        ḡ_r = mean over tokens of (∂ log p(y) / ∂ y_r)²
                                             h̄_j = mean over tokens of x_j²   (llama-imatrix's importance)

with the labels y sampled from the model's own next-token distribution at every position (so that the mean of the
squared gradient is the Fisher's diagonal, not the empirical Fisher of the text's tokens).  ḡ is what makes the
estimate end to end: it carries how strongly each layer's outputs reach the logits, measured for this model, not
assumed the same for every layer.

The embedding table is a linear over one-hot tokens: row v (a token) is used where that token is, so its row weight
is the token's frequency (estimated with Good-Turing's missing mass for tokens the windows never hold) and its column
weight ḡ of the first layer's input.  A tied table is both, and its two estimates add.

The pass streams layers as layerwise does: forward over all windows keeping each layer's input (on the host, or on
the GPU where it has room: keep_on), then backward from the head, one layer at a time, from the stored inputs.  No
weight gradient is formed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .model import SourceModel, hf_to_gguf


@dataclass
class Sensitivity:
    """ΔKL(E) ≈ ½ Σ_r rows_r Σ_j cols_j E_rj² for an error E of a tensor (GGUF rows, columns)."""

    rows: np.ndarray  # float64 (n_rows,)
    cols: np.ndarray  # float64 (n_cols,)
    linear: bool = True  # cols are the mean squared inputs (an importance, as llama-imatrix's); False: a lookup table

    def kl(self, err2: np.ndarray) -> float:
        """The estimate for a matrix of squared errors (or of a subset of rows: `rows` indexed alike by the caller)."""
        return 0.5 * float(self.rows @ (err2.astype(np.float64) @ self.cols))


# Tokens measured, as whole calibration windows: the estimates are means, and 32 windows of 512 make them steady;
# longer windows are fewer (an 8B-shaped build's 2048-token windows: 8), so that the pass costs what its tokens do.
TOKENS = 32 * 512
# Logits computed at once for the head's gradients: (tokens, vocabulary) float32 and its softmax and gradient, so a
# 128k vocabulary takes 2048 tokens at a time (about 1 GiB each) instead of the layers' batch of windows.
HEAD_ELEMENTS = 1 << 28


def measure(m: SourceModel, ids: torch.Tensor, device: torch.device, seed: int = 0,
            progress=None) -> dict[str, list[Sensitivity]]:
    """GGUF tensor name -> its Sensitivity per use (two for a tied embedding table), from the first windows that
    hold TOKENS tokens (at least one window)."""
    from . import layerwise

    ids = ids[:max(1, -(-TOKENS // ids.shape[1]))].to(device)
    names = hf_to_gguf(m)
    model = layerwise.skeleton(m, device)
    arch, layout = m.arch, m.arch.layout
    kwargs = layerwise.layer_kwargs(model, ids, arch)
    batch = max(1, min(8, layerwise.TOKENS_PER_BATCH // ids.shape[1]))
    layers = model.get_submodule(layout.layers)
    task = progress.add_task("measuring sensitivities", total=2 * len(layers) + 1) if progress is not None else None

    def advance():
        if task is not None:
            progress.advance(task)

    activations = (len(layers) + 3) * ids.numel() * m.hp.n_embd * 4
    store = keep_on(device, activations, 0.25)
    with torch.no_grad():
        inputs = [layerwise.embed(m, m.checkpoint.load(f"{layout.embed}.weight").to(device), ids).to(store)]
    resident = False  # the layers' weights stay on the GPU for the backward half, where all of them fit
    for i, layer in enumerate(layers):  # forward: each layer's inputs kept (on the host unless the GPU has room)
        layerwise.materialize(layer, layerwise.load_weights(layer, arch.layer_prefix(i), m), device)
        if i == 0:
            weights = sum(p.numel() * p.element_size() for p in layer.parameters()) * len(layers)
            resident = store.type == "cuda" and keep_on(device, weights + activations, 0.6).type == "cuda"
        with torch.no_grad():
            x = inputs[-1]
            out = torch.empty_like(x)
            for b in range(0, len(x), batch):
                r = layer(x[b:b + batch].to(device), **kwargs[i])
                out[b:b + batch] = (r[0] if isinstance(r, tuple) else r).to(store)
        inputs.append(out)
        if not resident:
            layer.to("meta")
        advance()

    found: dict[str, list[Sensitivity]] = {}
    tokens = ids.numel()
    head_name = arch.head_weight(m.hp)
    cap = arch.logit_softcap(m.hp)
    norm = model.get_submodule(layout.norm)
    layerwise.materialize(norm, layerwise.load_weights(norm, f"{layout.norm}.", m), device)
    head = nn.Linear(m.hp.n_embd, m.hp.n_vocab, bias=False, device=device)
    with torch.no_grad():
        head.weight.copy_(m.checkpoint.load(head_name))
    gen = torch.Generator(device=device).manual_seed(seed)
    sums = _Sums()
    hidden = inputs[-1].reshape(-1, m.hp.n_embd)  # the head and the final norm act on each token alone
    grads = torch.empty_like(hidden)
    step = max(1, HEAD_ELEMENTS // m.hp.n_vocab)
    u = torch.rand(len(hidden), 1, generator=gen, device=device)  # each token's label draw, whatever the chunks
    for b in range(0, len(hidden), step):
        x = hidden[b:b + step].to(device).requires_grad_()
        with sums.watching({"head": head}):
            logits = head(norm(x)).float()
            if cap is not None:  # the model's final soft-capping (Gemma)
                logits = cap * torch.tanh(logits / cap)
            logp = torch.log_softmax(logits, -1)
            cdf = logp.detach().exp().cumsum(-1)
            y = torch.searchsorted(cdf, u[b:b + step] * cdf[:, -1:]).clamp_(max=m.hp.n_vocab - 1)
            logp.gather(1, y).sum().backward()
        grads[b:b + step] = x.grad.to(store)
    grads = grads.reshape(inputs[-1].shape)
    found.setdefault(names[head_name], []).append(sums.sensitivity("head", tokens))
    del head
    advance()

    for i in reversed(range(len(layers))):  # backward: layer i's output gradients -> its input's
        layer = layers[i]
        if not resident:
            layerwise.materialize(layer, layerwise.load_weights(layer, arch.layer_prefix(i), m), device)
        for p in layer.parameters():
            p.requires_grad_(False)
        linears = {name: mod for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)}
        sums = _Sums()
        below = torch.empty_like(grads)
        for b in range(0, len(ids), batch):
            x = inputs[i][b:b + batch].to(device).requires_grad_()
            with sums.watching(linears):
                r = layer(x, **kwargs[i])
                (r[0] if isinstance(r, tuple) else r).backward(grads[b:b + batch].to(device))
            below[b:b + batch] = x.grad.to(store)
        for name in linears:
            found.setdefault(names[f"{arch.layer_prefix(i)}{name}.weight"], []).append(sums.sensitivity(name, tokens))
        grads = below
        layer.to("meta")
        advance()

    counts = np.bincount(ids.cpu().numpy().ravel(), minlength=m.hp.n_vocab).astype(np.float64)
    grads = grads.cpu().double() * arch.embedding_scale(m.hp)  # the gradient of the rows, where the model scales them
    found.setdefault(names[f"{layout.embed}.weight"], []).append(
        Sensitivity(token_frequencies(counts), (grads ** 2).reshape(-1, grads.shape[-1]).mean(0).numpy(), False))
    if task is not None:
        progress.remove_task(task)
    return found


def keep_on(device: torch.device, nbytes: int, share: float) -> torch.device:
    """Where the pass keeps what its forward half hands to its backward half (`nbytes`): on the GPU when that is at
    most `share` of its free memory, else on the host.  An 8B's 16k tokens of layer inputs and gradients (9 GB) and
    then its 32 float32 layers (28 GB) stay on an 80 GB GPU: no pageable round trips of activations to the host and
    every layer's weights read once, not twice; the pass frees all of it before the solves."""
    if device.type != "cuda":
        return torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(device)
    return device if nbytes <= free * share else torch.device("cpu")


def token_frequencies(counts: np.ndarray) -> np.ndarray:
    """Each token's share of text like the windows': seen tokens by their counts, scaled down by Good-Turing's
    estimate of the mass of unseen ones (the share of tokens seen once), which the unseen tokens split evenly."""
    total = counts.sum()
    unseen = counts == 0
    missing = min(float((counts == 1).sum()) / total, 0.5) if unseen.any() else 0.0
    freq = counts / total * (1 - missing)
    if unseen.any():
        freq[unseen] = missing / unseen.sum()
    return freq


class _Sums:
    """Σ x² per input column and Σ g² per output of watched linears, over the tokens of the passes watched."""

    def __init__(self):
        self.x2: dict[str, torch.Tensor] = {}
        self.g2: dict[str, torch.Tensor] = {}

    def watching(self, linears: dict[str, nn.Module]):
        hooks = []

        def forward_hook(name):
            def hook(_module, args, out):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                self.x2[name] = self.x2.get(name, 0) + x.square().sum(0).double()  # a batch in float32, the total in float64
                out.register_hook(lambda g: self._grad(name, g))
            return hook

        for name, mod in linears.items():
            hooks.append(mod.register_forward_hook(forward_hook(name)))

        @contextlib.contextmanager
        def scope():
            try:
                yield
            finally:
                for h in hooks:
                    h.remove()
        return scope()

    def _grad(self, name: str, g: torch.Tensor) -> None:
        g = g.detach().reshape(-1, g.shape[-1]).float()
        self.g2[name] = self.g2.get(name, 0) + g.square().sum(0).double()

    def sensitivity(self, name: str, tokens: int) -> Sensitivity:
        return Sensitivity((self.g2[name] / tokens).cpu().numpy(), (self.x2[name] / tokens).cpu().numpy())
