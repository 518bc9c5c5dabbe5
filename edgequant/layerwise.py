"""Stream calibration activations through the model one decoder layer at a time, collecting each linear's Hessian.

    inputs of layer 0 (embeddings) ─► layer i: pass 1 accumulates S = Σ xᵀx per distinct linear input
                                      ─► on_layer(S) may return new (quantized) weights, loaded into the layer
                                      ─► pass 2 produces layer i+1's inputs with those weights (true-sequential)
    after the last layer: final norm ─► S for the output head ─► on_layer again

Only one decoder layer's weights (plus the embeddings/head when they are used) and the activations are in memory at
a time; the rest of the model stays on the meta device.  q/k/v share one input and gate/up another, so they share
one S.  The attention mask and rotary embeddings are captured from transformers' own forward (a pre-hook on
layer 0), so any architecture transformers runs is handled without re-implementing it.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .errors import UserError
from .model import SourceModel


@dataclass
class Stats:
    """Σ xᵀx over `n` activation rows of one linear input (fp32). H = 2S/n; llama-imatrix's importance = diag(S)/n."""

    s: torch.Tensor
    n: int = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.s.addmm_(x.T, x)
        self.n += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        return self.s * (2.0 / max(self.n, 1))

    @property
    def importance(self) -> torch.Tensor:
        return self.s.diagonal() / max(self.n, 1)


# on_layer(layer index or "output", {HF weight name: (weight as float32 tensor, Stats)}) -> {HF weight name: new weight}
LayerCallback = Callable[[object, dict[str, tuple[torch.Tensor, Stats]]], dict[str, torch.Tensor]]


class _Captured(Exception):
    def __init__(self, kwargs):
        self.kwargs = kwargs


def skeleton(m: SourceModel, device: torch.device) -> nn.Module:
    """The HF model with every parameter on the meta device, except the rotary embedding (computed at init)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    trust = m.checkpoint.trust_remote_code  # False: transformers' own classes only (auto_map refused by Checkpoint)
    config = AutoConfig.from_pretrained(m.dir, trust_remote_code=trust)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust)
    rotary = model.model.rotary_emb
    with device:
        model.model.rotary_emb = type(rotary)(config=model.config)
    return model.eval()


def materialize(module: nn.Module, prefix: str, m: SourceModel, device: torch.device) -> None:
    module.to_empty(device=device)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(m.checkpoint.load(prefix + name))


# Windows per forward: 8, fewer for windows over 1024 tokens.  A batch's activations are the attention scores (on CUDA
# fp32 with GQA falls back to SDPA's math kernel: heads·L² floats, twice) and 3 FFN-wide tensors per token: for an
# 8B model, 1.3 GiB per window of 2048, so 8 of them would add 10 GiB to the 8.6 GiB of layer inputs and outputs.
TOKENS_PER_BATCH = 8192


@torch.no_grad()
def run(m: SourceModel, ids: torch.Tensor, on_layer: LayerCallback, device: torch.device, batch: int | None = None,
        progress=None, quiet: bool = True, start: int = 0, hidden: torch.Tensor | None = None,
        on_hidden: Callable[[int, torch.Tensor], None] | None = None, tf32: bool = False,
        requantize: bool = False) -> dict[str, float]:
    """Drive the layer-by-layer pass. Returns seconds per phase.  tf32: the forward passes and the sums xᵀx run
    their float32 matmuls in TF32 on a GPU that has it (on_layer, i.e. the solver, stays in float32).
    requantize: on_layer always returns new weights, so pass 1's outputs are dropped and pass 2 writes its outputs
    over its inputs: one copy of the activations in memory instead of two (4 GiB for an 8B's 128 x 2048 windows).

    To resume, `start` is the first layer to run and `hidden` its inputs, as on_hidden(start - 1, hidden) received
    them from an earlier run (on_hidden(i, ·) gets layer i's outputs, which are layer i+1's inputs)."""
    seconds = {"calibration forward": 0.0, "solve": 0.0}
    batch = batch or max(1, min(8, TOKENS_PER_BATCH // ids.shape[1]))
    tf32 = tf32 and device.type == "cuda"  # CPUs: float32 as it is (and builds reproduce bit for bit)
    model = skeleton(m, device)
    inner = model.model
    embed_name = "model.embed_tokens.weight"
    inner.embed_tokens.to_empty(device=device)
    inner.embed_tokens.weight.copy_(m.checkpoint.load(embed_name))

    def capture(_module, _args, kwargs):
        raise _Captured(kwargs)

    hook = inner.layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        model(ids[:1].to(device), use_cache=False)
    except _Captured as c:
        layer_kwargs = {k: v for k, v in c.kwargs.items() if k != "hidden_states"}
    hook.remove()
    hidden = inner.embed_tokens(ids.to(device)) if start == 0 else hidden.to(device)  # (n, L, d)
    if not m.hp.tied_embeddings:
        inner.embed_tokens.to("meta")
    task = progress.add_task("calibrating", total=len(inner.layers) + 1, completed=start) if progress is not None else None

    for i, layer in enumerate(inner.layers[start:], start):
        prefix = f"model.layers.{i}."
        materialize(layer, prefix, m, device)
        hidden = _layer_pass(layer, prefix, hidden, layer_kwargs, on_layer, i, batch, seconds, tf32, requantize)
        layer.to("meta")
        if on_hidden is not None:
            on_hidden(i, hidden)
        if task is not None:
            progress.advance(task)

    inner.norm.to_empty(device=device)
    inner.norm.weight.copy_(m.checkpoint.load("model.norm.weight"))
    head_name = embed_name if m.hp.tied_embeddings else "lm_head.weight"
    t0 = time.perf_counter()
    stats = Stats(torch.zeros(m.hp.n_embd, m.hp.n_embd, device=device))
    with matmul_precision(tf32):
        for b in range(0, len(hidden), batch):
            stats.add(inner.norm(hidden[b : b + batch]))
    check_finite(stats.s, f"the calibration activations entering {head_name}")
    seconds["calibration forward"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    on_layer("output", {head_name: (m.checkpoint.load(head_name).to(device), stats)})
    seconds["solve"] += time.perf_counter() - t0
    if task is not None:
        progress.advance(task)
    return seconds


@contextlib.contextmanager
def matmul_precision(tf32: bool):
    """float32 matmuls in TF32 (torch's "high" precision) inside the block, if tf32; as they were afterwards."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if tf32 else before)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _layer_pass(layer, prefix, hidden, kwargs, on_layer, index, batch, seconds, tf32: bool, requantize: bool) -> torch.Tensor:
    linears = {name: mod for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)}
    by_linear: dict[str, Stats] = {}  # linears fed the same tensor (q/k/v, gate/up) share one Stats
    batch_inputs: dict[int, tuple[torch.Tensor, Stats]] = {}  # id -> (input kept alive so ids stay unique, Stats)

    def hook(name):
        def fn(_mod, args):
            x = args[0]
            if id(x) in batch_inputs:  # a sibling already counted this input
                by_linear.setdefault(name, batch_inputs[id(x)][1])
                return
            st = by_linear.setdefault(name, Stats(torch.zeros(x.shape[-1], x.shape[-1], device=x.device)))
            st.add(x)
            batch_inputs[id(x)] = (x, st)

        return fn

    def forward_all(out):
        """The layer over all of `hidden`, batch by batch, into `out` (which may be `hidden` itself: a batch's
        outputs replace its inputs once computed) or nowhere (out None)."""
        with matmul_precision(tf32):
            for b in range(0, len(hidden), batch):
                batch_inputs.clear()
                r = layer(hidden[b : b + batch], **kwargs)
                if out is not None:
                    out[b : b + batch] = r[0] if isinstance(r, tuple) else r
        batch_inputs.clear()
        return out

    t0 = time.perf_counter()
    handles = [mod.register_forward_pre_hook(hook(name)) for name, mod in linears.items()]
    out = forward_all(None if requantize else torch.empty_like(hidden))
    for h in handles:
        h.remove()
    seconds["calibration forward"] += time.perf_counter() - t0
    for n, st in by_linear.items():
        check_finite(st.s, f"the calibration activations entering {prefix}{n} (layer {index})")

    t0 = time.perf_counter()
    new = on_layer(index, {prefix + n + ".weight": (mod.weight, by_linear[n]) for n, mod in linears.items()})
    seconds["solve"] += time.perf_counter() - t0
    if not new and not requantize:
        return check_finite(out, f"the output of layer {index}")
    t0 = time.perf_counter()
    for n, mod in linears.items():
        if prefix + n + ".weight" in new:
            mod.weight.copy_(new[prefix + n + ".weight"])
    out = forward_all(hidden)
    seconds["calibration forward"] += time.perf_counter() - t0
    return check_finite(out, f"the output of layer {index} with its quantized weights")


def check_finite(x: torch.Tensor, what: str) -> torch.Tensor:
    """x, or UserError if it holds NaN/Inf (weights that overflow float32 on the calibration text)."""
    if not bool(torch.isfinite(x).all()):
        raise UserError(f"NaN or Inf in {what}: the weights overflow float32 on the calibration text")
    return x
