"""Stream calibration activations through the model one decoder layer at a time, collecting each linear's Hessian.

    inputs of layer 0 (embeddings) ─► layer i: a pass accumulates S = Σ xᵀx per distinct linear input
                                      ─► on_layer(S) may return new (quantized) weights, loaded into the layer
                                      ─► a last pass produces layer i+1's inputs with those weights (true-sequential)
    after the last layer: final norm ─► S for the output head ─► on_layer again

Only one decoder layer's weights (plus the embeddings/head when they are used) and the activations are in memory at
a time; the rest of the model stays on the meta device.  Where the layers, embeddings, final norm and head are, and
which linears read one input (q/k/v, gate/up: they share one S), is the architecture adapter's (edgequant.arch).
What each decoder layer gets besides its hidden states (attention mask, sliding-window mask, rotary embeddings)
is captured from transformers' own forward, per layer, so any architecture transformers runs is handled without
re-implementing it.

Two options make each linear see what it will see in the quantized model, and aim at what the full-precision
model computes:
  sequential  inside a layer too: the linears sharing an input are solved group by group in forward order
              (q/k/v, o, gate/up, down), each group's inputs computed with the earlier groups already quantized
              (one more, partial, forward pass per group);
  asymmetric  a second stream of activations runs through the full-precision layers alongside, and each linear's
              Stats also sum Σ x_fpᵀ x (x_fp: the full-precision model's input for the same token), so the solver
              can aim at the full-precision outputs (gptq.target.asymmetric_target).  Twice the activations.
With sequential, each stream keeps what its later passes would recompute (attention's output, down_proj's input:
_Replay), so each piece of a layer is computed once per stream, as far as REPLAY_BYTES allows.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .arch import Arch, for_class
from .errors import UserError
from .model import SourceModel


# Rows of S per GEMM in Stats.add.  S = Σxᵀx is symmetric, so only its blocks on and right of the diagonal are summed:
# (T+1)/2T of the full product for T row blocks (62 % for a 4096-wide input, 54 % for an 8B's 14336-wide down_proj).
GRAM_ROWS = 1024


class Stats:
    """Σ xᵀx over `n` activation rows of one linear input. H = 2S/n; llama-imatrix's importance = diag(S)/n.
    With a full-precision stream (asymmetric), cross = Σ x_fpᵀ x over the same rows.  dtype: what the GEMMs read,
    float32 or (CUDA) bfloat16.  Each add() (one batch of windows) is a float32 product, summed into float64: the
    batches' products are the same bits however the windows are spread over processes, and their float64 sum is
    exact in practice (distributed.World.sum_), so the sums do not depend on the number of processes.  finish()
    adds the processes' sums and leaves float32 S and cross for the solver."""

    def __init__(self, dim: int, device: torch.device, dtype: torch.dtype = torch.float32):
        self._sum = torch.zeros(dim, dim, device=device, dtype=torch.float64)  # blocks on and right of the diagonal
        self._cross: torch.Tensor | None = None
        self._s: torch.Tensor | None = None
        self.cross: torch.Tensor | None = None
        self.n = 0
        self.dtype = dtype

    def add(self, x: torch.Tensor, x_fp: torch.Tensor | None = None) -> None:
        if self._s is not None:
            raise RuntimeError("Stats.add after finish()")
        x = x.reshape(-1, x.shape[-1]).to(self.dtype)
        for i in range(0, x.shape[1], GRAM_ROWS):
            self._sum[i : i + GRAM_ROWS, i:] += _mm(x[:, i : i + GRAM_ROWS].T, x[:, i:]).double()
        if x_fp is not None:
            if self._cross is None:
                self._cross = torch.zeros_like(self._sum)
            x_fp = x_fp.reshape(-1, x.shape[-1]).to(self.dtype)
            for i in range(0, x.shape[1], GRAM_ROWS):
                self._cross[i : i + GRAM_ROWS] += _mm(x_fp[:, i : i + GRAM_ROWS].T, x).double()
        self.n += x.shape[0]

    def finish(self, world=None) -> Stats:
        """The sums over every process of `world` (distributed.World; this process alone by default), in float32,
        the blocks below the diagonal mirrored.  Every rank must call it, with or without rows of its own, and with
        the same asymmetric setting."""
        if self._s is not None:
            return self
        from .distributed import SINGLE

        world = world or SINGLE
        world.sum_(self._sum)
        if world.size > 1:
            n = torch.tensor([self.n], dtype=torch.float64, device=self._sum.device)
            self.n = int(world.sum_(n).item())
        s = self._sum.float()
        self._sum = None
        for i in range(GRAM_ROWS, len(s), GRAM_ROWS):
            s[i : i + GRAM_ROWS, :i] = s[:i, i : i + GRAM_ROWS].T
        self._s = s
        if self._cross is not None:
            self.cross = world.sum_(self._cross).float()
            self._cross = None
        return self

    @property
    def s(self) -> torch.Tensor:
        """Σ xᵀx, whole (finish()ed in this process alone if it was not yet)."""
        return self.finish()._s

    @property
    def hessian(self) -> torch.Tensor:
        return self.s * (2.0 / max(self.n, 1))

    @property
    def importance(self) -> torch.Tensor:
        return self.s.diagonal() / max(self.n, 1)


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in float32, whatever a and b are.  (Callers add it to float64 as .double(): torch's CPU add of a
    float32 tensor into a float64 one converts element by element, 5-10x slower than converting first; same bits.)"""
    return torch.mm(a, b) if a.dtype == torch.float32 else torch.mm(a, b, out_dtype=torch.float32)


class ExpertStats:
    """What a mixture-of-experts layer's calibration pass sees of one input of its experts (gate/up read the MoE
    block's input, down the SwiGLU product), per expert, over the tokens the router sends to it:
      counts[e]   tokens routed to expert e (llama-imatrix's per-expert counts);
      sq[e]       Σ x² per column over them, unweighted (llama-imatrix's in_sum2: importance = sq / counts);
      weighted[e] Stats of r·x, r the token's router weight for e: Σ r²·xᵀx.  The model adds r·expert(x) to the
                  layer's output, so an error δ in the expert's output costs r²·δ² there: GPTQ's Hessian for
                  expert e is 2·Σ r² xᵀx / counts[e] (exact for down_proj, whose output is scaled by r directly;
                  for gate/up the same token weight, their errors reaching the output through down and r).
    Only the experts a token reached hold a Stats (allocated on first use)."""

    def __init__(self, n_expert: int, dim: int, device: torch.device, dtype: torch.dtype = torch.float32):
        self.sq = torch.zeros(n_expert, dim, device=device, dtype=torch.float64)  # float64: as Stats' sums
        self.counts = torch.zeros(n_expert, dtype=torch.long)
        self.weighted: list[Stats | None] = [None] * n_expert
        self.dim, self.device, self.dtype = dim, device, dtype

    def add(self, e: int, x: torch.Tensor, r: torch.Tensor) -> None:
        """Rows x (tokens routed to expert e) and their router weights r (one per row)."""
        x = x.reshape(-1, x.shape[-1])
        self.sq[e] += x.float().square().sum(0)
        self.counts[e] += len(x)
        if self.weighted[e] is None:
            self.weighted[e] = Stats(self.dim, self.device, self.dtype)
        self.weighted[e].add(x * r.reshape(-1, 1).to(x.dtype))

    def finish(self, world=None) -> ExpertStats:
        """The sums over every process of `world` (Stats.finish); an expert some process routed tokens to gets a
        Stats on every process."""
        from .distributed import SINGLE

        world = world or SINGLE
        if world.size > 1:
            counts = world.sum_(self.counts.to(self.sq.device, torch.float64))
            self.counts = counts.round().long().cpu()
            world.sum_(self.sq)
        for e in range(len(self.weighted)):
            if self.weighted[e] is None and self.counts[e] > 0:
                self.weighted[e] = Stats(self.dim, self.device, self.dtype)
            if self.weighted[e] is not None:
                self.weighted[e].finish(world)
        self.sq = self.sq.float()
        return self

    def importance(self, e: int) -> torch.Tensor:
        """llama-imatrix's importance of expert e: mean x² per column; ones for an expert no token reached (as
        llama-quantize reads an imatrix entry of count 0)."""
        n, sq = int(self.counts[e]), self.sq[e].float()
        return sq / n if n else torch.ones_like(sq)

    def check_finite(self, what: str) -> None:
        check_finite(self.sq, what)
        for st in self.weighted:
            if st is not None:
                check_finite(st.s, what)


# on_layer(layer index or "output", {HF weight name: (weight as float32 tensor, Stats)}) -> {HF weight name: new weight}
LayerCallback = Callable[[object, dict[str, tuple[torch.Tensor, Stats]]], dict[str, torch.Tensor]]


class _Captured(Exception):
    def __init__(self, kwargs):
        self.kwargs = kwargs


ATTENTION = "edgequant_sdpa"


class _HeadsRepeated:
    """An attention module as transformers' SDPA function sees it once its key/value heads are repeated."""

    num_key_value_groups = 1

    def __init__(self, module):
        self.module = module

    def __getattr__(self, name):
        return getattr(self.module, name)


def sdpa_heads_repeated(module, query, key, value, *args, **kwargs):
    """transformers' SDPA attention, with grouped-query key/value heads repeated first.  In float32 SDPA has only its
    math kernel for grouped heads (every score materialized, its matmuls in TF32 under matmuls_in("tf32")): 3.6 ms for 2
    windows of 2048 tokens of an 8B on an H200, max error 2e-3 against float64; with the heads repeated its
    memory-efficient kernel runs them: 1.8 ms, max error 2e-6."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    n_rep = query.shape[1] // key.shape[1]
    return sdpa_attention_forward(_HeadsRepeated(module), query, repeat_kv(key, n_rep), repeat_kv(value, n_rep),
                                  *args, **kwargs)


def skeleton(m: SourceModel, device: torch.device) -> nn.Module:
    """The HF model with every parameter on the meta device, except the rotary embeddings (computed at init); its
    attention is sdpa_heads_repeated (or the adapter's, where SDPA cannot compute the model)."""
    from transformers import AutoConfig

    trust = m.checkpoint.trust_remote_code  # False: transformers' own classes only (auto_map refused by Checkpoint)
    config = m.arch.transformers_config(AutoConfig.from_pretrained(m.dir, trust_remote_code=trust))
    return skeleton_of(config, device, trust, m.arch)


def skeleton_of(config, device: torch.device, trust_remote_code: bool = False, arch: Arch | None = None) -> nn.Module:
    """skeleton() of a transformers config (arch: its adapter; by default the one of config.architectures[0])."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    arch = arch or for_class((config.architectures or ["LlamaForCausalLM"])[0])
    AttentionInterface.register(ATTENTION, sdpa_heads_repeated)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)  # masks exactly as for "sdpa"
    config._attn_implementation = ATTENTION if arch.attention == "sdpa" else arch.attention
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    for path in arch.layout.rotary:
        parent, _, name = path.rpartition(".")
        rotary = model.get_submodule(path)
        with device:
            setattr(model.get_submodule(parent), name, type(rotary)(config=model.config))
    set_buffers(model, arch, arch.hparams(config.to_dict()), device)
    return model.eval()


def set_buffers(model: nn.Module, arch: Arch, hp, device: torch.device) -> None:
    """The scalar buffers the model computed at init (Gemma's embedding scale), which the meta device lost."""
    for path, value in arch.buffers(hp).items():
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, torch.tensor(value, dtype=torch.float32, device=device))


def layer_kwargs(model: nn.Module, ids: torch.Tensor, arch: Arch | None = None) -> list[dict]:
    """What the model's forward passes each decoder layer besides its hidden states (attention or sliding-window
    mask, rotary embeddings, ...) for windows like ids: the model runs on zero embeddings of their shape (masks and
    positions depend on nothing else) with every decoder layer replaced by one that records its arguments."""
    arch = arch or for_class((model.config.architectures or ["LlamaForCausalLM"])[0])
    layers = model.get_submodule(arch.layout.layers)
    got: list[dict] = []

    def record(hidden_states, *args, **kwargs):
        if args:
            raise RuntimeError("decoder layers are called with positional arguments besides the hidden states")
        got.append(kwargs)
        if len(got) == len(layers):
            raise _Captured(got)
        return hidden_states

    for layer in layers:
        layer.forward = record
    embeds = torch.zeros(1, ids.shape[1], model.config.hidden_size, device=ids.device)
    try:
        model(inputs_embeds=embeds, use_cache=False)
    except _Captured as c:
        return c.kwargs
    finally:
        for layer in layers:
            del layer.forward
    raise RuntimeError("the model's forward never reached its last decoder layer")


def embed(m: SourceModel, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The decoder's input: embedding rows, scaled as the adapter says (Gemma: by sqrt(hidden), in the weights'
    dtype, as transformers' scaled embedding module)."""
    x = nn.functional.embedding(ids, weight)
    scale = m.arch.embedding_scale(m.hp)
    return x if scale == 1.0 else x * torch.tensor(scale, dtype=torch.float32).to(weight.dtype)


def load_weights(module: nn.Module, prefix: str, m: SourceModel) -> dict[str, torch.Tensor]:
    """The module's parameters from the checkpoint, as float32 host tensors (SourceModel.param: experts stacked as
    transformers holds them, from either Hub layout)."""
    return {name: m.param(prefix + name) for name, _ in module.named_parameters()}


def materialize(module: nn.Module, weights: dict[str, torch.Tensor], device: torch.device) -> None:
    module.to_empty(device=device)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(weights[name])


# Windows per forward: 8, fewer for windows over 1024 tokens.  A batch's activations are mostly 3 FFN-wide tensors per
# token (0.35 GiB per window of 2048 for an 8B; the attention scores too, heads·L² floats, where SDPA falls back to
# its math kernel), next to the 4 GiB per stream of layer inputs and outputs.
TOKENS_PER_BATCH = 8192


def batch_of(ids: torch.Tensor) -> int:
    """Windows per forward pass for windows like ids (TOKENS_PER_BATCH)."""
    return max(1, min(8, TOKENS_PER_BATCH // ids.shape[1]))


@torch.no_grad()
def run(m: SourceModel, ids: torch.Tensor, on_layer: LayerCallback, device: torch.device, batch: int | None = None,
        progress=None, quiet: bool = True, start: int = 0, hidden: torch.Tensor | None = None,
        on_hidden: Callable[[int, torch.Tensor], None] | None = None, precision: str = "fp32",
        requantize: bool = False, sequential: bool = False, asymmetric: bool = False,
        on_done: Callable[[object], None] | None = None, world=None) -> dict[str, float]:
    """Drive the layer-by-layer pass. Returns seconds per phase.  precision: how the forward passes and the sums
    xᵀx run their matmuls on a GPU (PRECISIONS; on_layer, i.e. the solver, stays in float32).
    requantize: on_layer always returns new weights, so the collecting pass's outputs are dropped and the last pass
    writes its outputs over its inputs: one copy of the activations in memory instead of two (4 GiB for an 8B's
    128 x 2048 windows).  sequential, asymmetric: see the module's docstring (both imply requantize); with
    sequential, on_layer is called once per group of linears sharing an input.  on_done(i) follows layer i's last
    on_layer call (and "output" the head's).

    To resume, `start` is the first layer to run and `hidden` its inputs, as on_hidden(start - 1, hidden) received
    them from an earlier run (on_hidden(i, ·) gets layer i's outputs, which are layer i+1's inputs; with asymmetric,
    both streams stacked, (2, windows, L, d)).

    world (distributed.World): this process runs the windows world.windows() gives it (the hidden states it gets,
    holds and hands on_hidden are those windows'; `hidden` on resume may be all windows' or its own), and every sum
    is finish()ed over the world before on_layer sees it."""
    seconds = {"calibration forward": 0.0, "solve": 0.0}
    batch = batch or batch_of(ids)
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: one of {', '.join(PRECISIONS)}")
    precision = precision if device.type == "cuda" else "fp32"  # CPUs: float32 (and builds reproduce bit for bit)
    requantize = requantize or sequential or asymmetric
    from .distributed import SINGLE

    world = world or SINGLE
    mine = world.windows(len(ids), batch)
    model = skeleton(m, device)
    arch, layout = m.arch, m.arch.layout
    kwargs = layer_kwargs(model, ids.to(device), arch)
    if start == 0:
        hidden = embed(m, m.checkpoint.load(f"{layout.embed}.weight").to(device), ids[mine].to(device))  # (n, L, d)
        hidden = torch.stack([hidden, hidden]) if asymmetric else hidden
    else:
        if hidden.shape[-3] == len(ids) and mine != slice(0, len(ids)):
            hidden = hidden[..., mine, :, :]
        hidden = hidden.to(device).contiguous()
    layers = model.get_submodule(layout.layers)
    task = progress.add_task("calibrating", total=len(layers) + 1, completed=start) if progress is not None else None
    passes = Passes(kwargs, batch, seconds, precision, arch.input_groups, experts=arch.experts, world=world)
    head_name = arch.head_weight(m.hp)
    reader = ThreadPoolExecutor(max_workers=1)  # reads layer i + 1 (after the last layer, the head) while i is solved
    with reader:
        upcoming = reader.submit(load_weights, layers[start], arch.layer_prefix(start), m) if start < len(layers) else None
        head = reader.submit(m.checkpoint.load, head_name) if start == len(layers) else None
        for i in range(start, len(layers)):
            layer, prefix = layers[i], arch.layer_prefix(i)
            weights = upcoming.result()
            if i + 1 < len(layers):
                upcoming = reader.submit(load_weights, layers[i + 1], arch.layer_prefix(i + 1), m)
            else:
                head = reader.submit(m.checkpoint.load, head_name)
            materialize(layer, weights, device)
            del weights
            hidden = passes.layer(layer, prefix, hidden, on_layer, i, requantize, sequential, asymmetric)
            layer.to("meta")
            if on_done is not None:
                on_done(i)
            if on_hidden is not None:
                on_hidden(i, hidden)
            if task is not None:
                progress.advance(task)

    norm = model.get_submodule(layout.norm)
    materialize(norm, load_weights(norm, f"{layout.norm}.", m), device)
    t0 = time.perf_counter()
    stats = Stats(m.hp.n_embd, device, passes.gemm_dtype)
    with passes.precise():
        for b in range(0, hidden.shape[-3], batch):
            if asymmetric:
                stats.add(norm(hidden[0, b : b + batch]), norm(hidden[1, b : b + batch]))
            else:
                stats.add(norm(hidden[b : b + batch]))
    stats.finish(world)
    check_finite(stats.s, f"the calibration activations entering {head_name}")
    del hidden  # the head's solve needs the memory more (an 8B's activations: 4 GiB per stream)
    if device.type == "cuda":  # and the layers' cached blocks would stay reserved beside its own (24 GiB for 17)
        torch.cuda.empty_cache()
    seconds["calibration forward"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    on_layer("output", {head_name: (head.result().to(device), stats)})
    seconds["solve"] += time.perf_counter() - t0
    if on_done is not None:
        on_done("output")
    if task is not None:
        progress.advance(task)
    return seconds


# Calibration matmuls on a GPU: "fp32" as they are; "tf32": float32 matmuls in TF32 (torch's "high" precision), inputs
# rounded to 10 mantissa bits; "bf16": the forward passes under bfloat16 autocast and the sums xᵀx of bfloat16 inputs
# (7 mantissa bits, as a bf16 model's own activations), both with float32 sums, on tensor cores at twice TF32's rate.
PRECISIONS = ("fp32", "tf32", "bf16")


@contextlib.contextmanager
def matmuls_in(mode: str):
    """The block's matmuls in `mode` (PRECISIONS); torch's settings as they were afterwards."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if mode in ("tf32", "bf16") else before)
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode == "bf16"):
            yield
    finally:
        torch.set_float32_matmul_precision(before)


class _Stop(Exception):
    """Raised by a capture hook once a partial forward pass has what it came for."""


@dataclass
class Passes:
    """The forward passes over one decoder layer, batch by batch."""

    layer_kwargs: list[dict]  # per decoder layer (layer_kwargs())
    batch: int
    seconds: dict[str, float]
    mode: str  # PRECISIONS
    groups: tuple[tuple[str, ...], ...] = ()  # the adapter's input groups (Arch.input_groups)
    kwargs: dict | None = None  # the layer's being run
    experts: object = None  # the adapter's Experts (a mixture of experts), or None
    world: object = None  # distributed.World, over which the sums are finish()ed

    def precise(self):
        return matmuls_in(self.mode)

    @property
    def gemm_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.mode == "bf16" else torch.float32

    def layer(self, layer, prefix, hidden, on_layer, index, requantize: bool, sequential: bool, asymmetric: bool):
        """Collect, solve (on_layer) and step one layer: its outputs, the next layer's inputs (written over `hidden`
        when requantize)."""
        self.kwargs = self.layer_kwargs[index]
        linears = {name: mod for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)}
        ours, full = (hidden[0], hidden[1]) if asymmetric else (hidden, None)
        reference = copy.deepcopy(layer) if asymmetric else None  # keeps the full-precision weights
        groups, tails = self.input_groups(layer, linears, ours[:1]) if sequential else ([list(linears)], {})
        budget = _Budget(ours.device) if tails else None
        # ours runs once more after the last group (forward_all); the reference takes its step in the last collect
        mine = _Replay(layer, tails, len(groups), budget)
        theirs = _Replay(reference, tails, len(groups) - 1, budget) if asymmetric else None
        new_weights = False
        for k, group in enumerate(groups):
            t0 = time.perf_counter()
            stats, out = self.collect(k, layer, reference, group, ours, full, (mine, theirs), shared=sequential,
                                      keep=not requantize, step_full=k == len(groups) - 1)
            self.seconds["calibration forward"] += time.perf_counter() - t0
            for n, st in stats.items():
                check_finite(st.s, f"the calibration activations entering {prefix}{n} (layer {index})")
            t0 = time.perf_counter()
            new = on_layer(index, {prefix + n + ".weight": (linears[n].weight, stats[n]) for n in group})
            self.seconds["solve"] += time.perf_counter() - t0
            for n in group:
                if prefix + n + ".weight" in new:
                    linears[n].weight.copy_(new[prefix + n + ".weight"])
                    new_weights = True
        del stats, reference, theirs  # before the last pass: the down_proj's sums are 0.8 GB each for an 8B
        if self.experts is not None:  # after attention: the experts' inputs come through the quantized attention
            new_weights |= self.solve_experts(layer, prefix, ours, on_layer, index)
        if not new_weights and not requantize:
            return check_finite(out, f"the output of layer {index}")
        t0 = time.perf_counter()
        self.forward_all(layer, ours, ours, mine, len(groups))  # (the full-precision stream stepped already)
        self.seconds["calibration forward"] += time.perf_counter() - t0
        return check_finite(hidden, f"the output of layer {index} with its quantized weights")

    def solve_experts(self, layer, prefix: str, x: torch.Tensor, on_layer, index: int) -> bool:
        """A mixture-of-experts layer's experts: one pass over all windows (up to the experts' module, whose own
        routing, as the model computes it, says which tokens reach which expert with which weight) collects
        ExpertStats for their two inputs, then on_layer gets the three stacks {<block>.experts.{gate,up,down}_proj:
        (the (n_expert, rows, cols) weights, ExpertStats)}.  Whether new weights were loaded.  Memory: the sums,
        not the routed activations, are kept: each batch's are summed expert by expert and dropped."""
        path = f"{self.experts.fused}.experts"
        mod = layer.get_submodule(path)
        n_expert, ff = mod.down_proj.shape[0], mod.down_proj.shape[2]
        into = ExpertStats(n_expert, mod.gate_up_proj.shape[2], x.device, self.gemm_dtype)
        into_down = ExpertStats(n_expert, ff, x.device, self.gemm_dtype)

        def collect(_mod, args, kwargs):
            h, idx, r = (*args, *kwargs.values())[:3]  # (tokens, d), (tokens, k) expert ids, (tokens, k) weights
            # the (token, slot) pairs grouped by expert, each expert's in row order (as torch.where(idx == e) gives
            # them, so the sums are the same), with one host sync per batch for the counts instead of one per expert
            # (128 experts x 32 batches a layer for Qwen3-30B-A3B's calibration)
            order = torch.argsort(idx.reshape(-1), stable=True)
            counts = torch.bincount(idx.reshape(-1), minlength=n_expert).tolist()
            for e, pairs in enumerate(order.split(counts)):
                if len(pairs) == 0:
                    continue
                token, slot = pairs // idx.shape[1], pairs % idx.shape[1]
                xe, re = h[token], r[token, slot]
                into.add(e, xe, re)
                gate, up = nn.functional.linear(xe, mod.gate_up_proj[e]).chunk(2, dim=-1)
                into_down.add(e, mod.act_fn(gate) * up, re)
            raise _Stop

        t0 = time.perf_counter()
        handle = mod.register_forward_pre_hook(collect, with_kwargs=True)
        try:
            with self.precise():
                for b in range(0, len(x), self.batch):
                    try:
                        layer(x[b : b + self.batch], **self.kwargs)
                    except _Stop:
                        pass
        finally:
            handle.remove()
        self.seconds["calibration forward"] += time.perf_counter() - t0
        into.finish(self.world)
        into_down.finish(self.world)
        into.check_finite(f"the calibration activations entering {prefix}{path} (layer {index})")
        into_down.check_finite(f"the calibration activations entering {prefix}{path}.down_proj (layer {index})")
        names = {p: f"{prefix}{path}.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
        t0 = time.perf_counter()
        new = on_layer(index, {names["gate_proj"]: (mod.gate_up_proj[:, :ff], into),
                               names["up_proj"]: (mod.gate_up_proj[:, ff:], into),
                               names["down_proj"]: (mod.down_proj, into_down)})
        self.seconds["solve"] += time.perf_counter() - t0
        for p, (param, rows) in {"gate_proj": (mod.gate_up_proj, slice(0, ff)), "up_proj": (mod.gate_up_proj, slice(ff, 2 * ff)),
                                 "down_proj": (mod.down_proj, slice(None))}.items():
            if names[p] in new:
                param[:, rows].copy_(new[names[p]])
        return any(n in new for n in names.values())

    def input_groups(self, layer, linears: dict[str, nn.Module], x: torch.Tensor):
        """The linears in forward order, those fed the same tensor in one group: [[q, k, v], [o], [gate, up], [down]]
        (the adapter's Arch.input_groups, checked against the layer's forward); and the tails {group index: (module, linear, arity)} for _Replay: the groups whose input feeds a linear that
        is the last op of its parent module, the module returning that linear's output as it is (arity 0) or first
        in a tuple of `arity` items, the others None (self_attn and o_proj, mlp and down_proj), and its input
        contiguous (as the saved copy will be: the same GEMM).  No tails when a linear or such a module runs more
        than once."""
        seen: list[tuple[str, torch.Tensor]] = []  # (name, its input), inputs kept alive so that `is` holds
        outputs: dict[str, list] = {}
        modules = dict(layer.named_modules())
        parents = {n.rpartition(".")[0] for n in linears} - {""}
        handles = [mod.register_forward_pre_hook(lambda _m, a, n=n: seen.append((n, a[0]))) for n, mod in linears.items()]
        handles += [modules[n].register_forward_hook(lambda _m, _a, o, n=n: outputs.setdefault(n, []).append(o))
                    for n in (*linears, *parents)]
        try:
            with self.precise():
                layer(x, **self.kwargs)
        finally:
            for h in handles:
                h.remove()
        found: list[list[str]] = []
        for k, (name, x_in) in enumerate(seen):
            if k and x_in is seen[k - 1][1]:
                found[-1].append(name)
            else:
                found.append([name])
        # the groups are the adapter's; the forward only confirms them (an adapter that is wrong about the model
        # would solve linears on inputs they never see)
        groups = [list(g) for g in self.groups] or found
        if groups != found:
            raise RuntimeError(f"the adapter's input groups {groups} are not the layer's: its forward reads {found}")
        tails: dict[int, tuple[str, str, int]] = {}
        if any(len(o) > 1 for o in outputs.values()):
            return groups, tails
        contiguous = {name for name, x_in in seen if x_in.is_contiguous()}
        for k, group in enumerate(groups):
            for name in (n for n in group if n in contiguous):
                parent = name.rpartition(".")[0]
                got, y = outputs.get(parent, [None])[0], outputs[name][0]
                if got is y:
                    tails[k] = (parent, name, 0)
                elif isinstance(got, tuple) and got and got[0] is y and all(v is None for v in got[1:]):
                    tails[k] = (parent, name, len(got))
        return groups, tails

    def collect(self, k: int, layer, reference, names: list[str], ours, full, replays, shared: bool, keep: bool,
                step_full: bool):
        """Stats of the inputs of the linears `names` (group k) over all windows: {name: Stats} (linears fed the same
        tensor share one), and the layer's outputs if keep (else None; the pass ends once it has the inputs).
        reference/full: the full-precision layer and its stream, for Stats.cross; step_full: the reference runs to
        its end and its outputs replace `full` (the stream's step to the next layer: the reference never changes, so
        this needs no pass of its own).  shared: `names` all read one tensor.  replays: each stream's _Replay."""
        stats: dict[str, Stats] = {}
        out = torch.empty_like(ours) if keep else None
        mine, theirs = replays
        for b in range(0, len(ours), self.batch):
            window = slice(b, b + self.batch)
            inputs, r = self.inputs(layer, ours[window], names, shared, not keep, mine.answering(k, window, len(ours)))
            mine.keep(k, window, len(ours), inputs)
            fp = {}
            if reference is not None:
                fp, r_full = self.inputs(reference, full[window], names, shared, not step_full,
                                         theirs.answering(k, window, len(full)))
                theirs.keep(k, window, len(full), fp)
                if step_full:
                    full[window] = r_full
            if out is not None:
                out[window] = r
            counted: dict[int, Stats] = {}  # id(input) -> its Stats, for this batch
            for name, x in inputs.items():
                if id(x) in counted:
                    stats.setdefault(name, counted[id(x)])
                    continue
                st = stats.setdefault(name, Stats(x.shape[-1], x.device, self.gemm_dtype))
                with self.precise():
                    st.add(x, fp.get(name))
                counted[id(x)] = st
        for replay in replays:
            if replay is not None:
                replay.pass_done()
        for st in stats.values():
            st.finish(self.world)
        return stats, out

    def inputs(self, layer, x: torch.Tensor, names: list[str], shared: bool, stop: bool,
               replay=contextlib.nullcontext()):
        """Run layer(x) (inside the context `replay`) keeping the input of each linear in `names` (shared: they all
        read one tensor): ({name: input}, the layer's output, or None if stopped once it had the inputs)."""
        got: dict[str, torch.Tensor] = {}
        modules = dict(layer.named_modules())

        def hook(name):
            def fn(_mod, args):
                for n in names if shared else [name]:
                    got[n] = args[0]
                if stop and len(got) == len(names):
                    raise _Stop

            return fn

        handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
        try:
            with self.precise(), replay:
                r = layer(x, **self.kwargs)
            r = r[0] if isinstance(r, tuple) else r
        except _Stop:
            r = None
        finally:
            for h in handles:
                h.remove()
        return got, r

    def forward_all(self, layer, x: torch.Tensor, out: torch.Tensor, replay: _Replay | None = None,
                    k: int = 0) -> torch.Tensor:
        """The layer over all windows of x into `out` (which may be x itself: a batch's outputs replace its inputs),
        as pass k of `replay`."""
        with self.precise():
            for b in range(0, len(x), self.batch):
                window = slice(b, b + self.batch)
                with replay.answering(k, window, len(x)) if replay is not None else contextlib.nullcontext():
                    r = layer(x[window], **self.kwargs)
                out[window] = r[0] if isinstance(r, tuple) else r
        return out


# What a layer's sequential passes keep for reuse (_Replay), in bytes: None for a share (REPLAY_SHARE) of the memory
# free as the layer starts (host RAM, or the GPU's); what does not fit is recomputed.  0: every pass from the layer's
# input.  Kept at most: attention's output per stream and down_proj's input for ours, FFN-wide (15 GB for an 8B's
# 128 x 2048 windows in float32, half that in bf16).
REPLAY_BYTES: int | None = None
REPLAY_SHARE = 0.5


class _Budget:
    """Bytes left for a layer's _Replay tensors."""

    def __init__(self, device: torch.device):
        self.left = REPLAY_BYTES if REPLAY_BYTES is not None else int(REPLAY_SHARE * free_memory(device))

    def empty(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
        size = like.element_size() * torch.Size(shape).numel()
        if size > self.left:
            return None
        self.left -= size
        return torch.empty(shape, dtype=like.dtype, device=like.device)

    def release(self, t: torch.Tensor) -> None:
        self.left += t.element_size() * t.numel()


def free_memory(device: torch.device) -> int:
    """Bytes free on the device: the GPU's (the driver's, and blocks torch holds unused), or the host's available
    RAM (0 where it cannot be read: nothing is kept)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return 0


class _Replay:
    """One stream's tensors inside a layer, over all windows, that its later sequential passes start from rather than
    recompute them from the layer's input.  A tail (Passes.input_groups) is a module whose output is the output of
    its last op, a linear of group j (self_attn: o_proj, mlp: down_proj).  Pass j saves that group's input; the
    passes after j (the linear solved) replace the module by linear(saved input), and the first of them, if more
    follow, saves the module's output instead, which the later ones return as it is.  So each piece is computed
    once per stream, with the same operands as a pass from the layer's input, hence the same bits.  What was saved
    stays valid: only later groups change weights, and they run after it.  last: the stream's last pass."""

    def __init__(self, layer: nn.Module, tails: dict[int, tuple[str, str, int]], last: int, budget: _Budget):
        self.modules = dict(layer.named_modules())
        self.tails, self.last, self.budget = tails, last, budget
        self.saved: dict[str, tuple[bool, torch.Tensor]] = {}  # module -> (is its output, tensor over all windows)
        self.filling: dict[str, torch.Tensor | None] = {}  # module -> its outputs being saved in this pass

    @contextlib.contextmanager
    def answering(self, k: int, window: slice, n: int):
        """Pass k over `window` of the n windows: the modules with something saved answer from it."""
        patched = []
        for j, (name, linear, arity) in self.tails.items():
            if j < k and name in self.saved:
                module = self.modules[name]
                module.forward = functools.partial(self._answer, name, linear, arity, k, window, n)
                patched.append(module)
        try:
            yield
        finally:
            for module in patched:
                del module.forward

    def _answer(self, name, linear, arity, k, window, n, *_args, **_kwargs):
        is_output, t = self.saved[name]
        if is_output:
            y = t[window]
        else:
            y = self.modules[linear](t[window])
            if k < self.last:  # later passes read the output itself
                if window.start == 0:  # into the input's tensor, where it fits
                    same = t.shape[-1] == y.shape[-1] and t.dtype == y.dtype
                    self.filling[name] = t if same else self.budget.empty((n, *y.shape[1:]), y)
                if self.filling[name] is not None:
                    self.filling[name][window] = y
        return y if arity == 0 else (y, *[None] * (arity - 1))

    def keep(self, k: int, window: slice, n: int, inputs: dict[str, torch.Tensor]) -> None:
        """Pass k's inputs for `window`: saved if group k is a tail's and a later pass of this stream will use it."""
        if k not in self.tails or k >= self.last:
            return
        name, linear, _ = self.tails[k]
        x = inputs[linear]
        if window.start == 0:
            t = self.budget.empty((n, *x.shape[1:]), x)
            if t is not None:
                self.saved[name] = (False, t)
        if name in self.saved:
            self.saved[name][1][window] = x

    def pass_done(self) -> None:
        for name, out in self.filling.items():
            if out is not None:
                _, t = self.saved[name]
                self.saved[name] = (True, out)
                if out is not t:
                    self.budget.release(t)
        self.filling.clear()


def check_finite(x: torch.Tensor, what: str) -> torch.Tensor:
    """x, or UserError if it holds NaN/Inf (weights that overflow float32 on the calibration text).  One sum first:
    torch.isfinite of the whole tensor would allocate its size again (8 GiB for an 8B's two streams); only a sum that
    is not finite (NaN/Inf, or a finite sum that overflowed) is followed by the exact check, in slices."""
    if not bool(torch.isfinite(x.sum())):
        if not all(bool(torch.isfinite(part).all()) for part in x.reshape(-1).split(1 << 24)):
            raise UserError(f"NaN or Inf in {what}: the weights overflow float32 on the calibration text")
    return x
