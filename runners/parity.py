"""Parity: does llama.cpp compute what a GGUF's weights say?  Five models on the same token windows:

    (a) source    MODEL in torch, fp32                                  the reference distribution and PPL
    (b) torch     the GGUF's weights dequantized (gguf-py) into the HF model, torch fp32
    (c) llama     the GGUF in llama.cpp on the CPU
    (d) f16       an F16 GGUF of MODEL in llama.cpp on the CPU
    (e) rounded   (b) with every linear's input rounded as llama.cpp's CPU rounds it for that weight type
                  (8-bit blocks, Q8_0/Q8_1/Q8_K, for quantized weights; F16 or BF16 for those; via edgequant.native)

(b) and (c) hold the same weights, so what separates them is arithmetic, or a fault (a kernel or layout that does not
compute what the blocks dequantize to).  The arithmetic has two parts, each measured separately:

  - what llama.cpp does to any model: F16 KV cache, flash attention, F16 activations for F16 weights, summation
    order.  (a) and (d) hold the same weights (bf16/fp16 checkpoints convert to F16 exactly): their gap.
  - the 8-bit rounding of activations that llama.cpp's CPU applies to the input of every quantized matmul.  The F16
    path does not have it, and it is the larger part by far (bench-a Q8_0: KL ~5e-4 against ~8e-7 for the F16
    path), so (e) measures it in torch: the (b)-(e) gap.  (e) cannot reproduce llama.cpp bit for bit, as the two
    round slightly different activations; it measures how much such rounding moves the output.

The verdict compares the (b)-(c) gap with the sum of both, the noise floor:

    gap.ppl   = |PPL(c) - PPL(b)| / PPL(b)         floor.ppl = |PPL(d) - PPL(a)| / PPL(a) + |PPL(e) - PPL(b)| / PPL(b)
    gap.kld   = mean KL(b || c)                     floor.kld = mean KL(a || d) + mean KL(b || e)

    passes when  gap.ppl <= max(2 floor.ppl, PPL_MIN_LIMIT)  and  gap.kld <= max(2 floor.kld, KLD_MIN_LIMIT)

The absolute minima keep a floor that is tiny by chance (PPL differences of either sign can cancel) from failing a
healthy file.  A faulty kernel or layout moves the output by orders of magnitude more than rounding does.

Parity cannot see a GGUF whose blocks are wrong but self-consistent (shuffled blocks: torch and llama.cpp then
compute the same wrong model), so the verdict also checks each dequantized tensor against MODEL's:

    source.err = ||W_gguf - W_model|| / ||W_model||  (Frobenius, per tensor)     passes when <= SOURCE_LIMIT = 1

i.e. no tensor is farther from MODEL's than an all-zero tensor would be.  Round-to-nearest Q4_K is ~0.07 on the
test model; a tensor of unrelated values of the same scale is ~1.4.  A coarse guard: `edgequant verify` checks rows.

The text is tokenized once, by llama.cpp with the GGUF's vocabulary, and every model gets those ids (transformers'
own tokenizer may disagree: see edgequant.tokens).  Scoring is runners.perplexity's (llama-perplexity's protocol).
All five models are loaded at once and each window is decoded once per model.
"""

from __future__ import annotations

import functools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch

from edgequant.errors import UserError
from edgequant.model import SourceModel
from edgequant.runners import llama
from edgequant.runners.perplexity import EvalResult, Scorer, Windows, log_softmax, make_windows

PPL_MIN_LIMIT = 1e-3  # relative PPL gap always allowed
KLD_MIN_LIMIT = 1e-5  # mean KL gap (nats) always allowed
SOURCE_LIMIT = 1.0
MODELS = {"source": "(a) MODEL, torch", "torch": "(b) GGUF, torch", "llama": "(c) GGUF, llama.cpp",
          "f16": "(d) F16, llama.cpp", "rounded": "(e) GGUF, torch, rounded"}
# name -> (model, base) for every score kept: each model against (a), then the pairs the verdict compares
COMPARISONS = {**{k: (k, "source") for k in MODELS}, "gap": ("llama", "torch"), "rounding": ("rounded", "torch")}

Rounding = Callable[[torch.Tensor], torch.Tensor]


class TorchLM:
    """The HF model of `m` on `device` in fp32, holding `weights` (HF name -> tensor); the WindowLogits contract."""

    def __init__(self, m: SourceModel, weights: dict[str, torch.Tensor], device: torch.device):
        from edgequant.layerwise import skeleton

        self.device = device
        self.model = skeleton(m, device)
        weights = m.module_weights(weights)  # a mixture of experts: stacks fused as transformers holds them
        self.model.load_state_dict({k: v.to(device) for k, v in weights.items()}, strict=False, assign=True)
        if m.hp.tied_embeddings:
            self.model.tie_weights()
        left = [n for n, p in self.model.named_parameters() if p.is_meta]
        if left:
            raise UserError(f"no weights for {', '.join(left[:5])}")

    def round_linear_inputs(self, rounding: dict[str, Rounding]) -> None:
        """Pass the input of each nn.Linear named in `rounding` (HF weight name) through its function first."""
        for name, module in self.model.named_modules():
            fn = rounding.get(f"{name}.weight")
            if isinstance(module, torch.nn.Linear) and fn is not None:
                module.register_forward_pre_hook(lambda _mod, args, fn=fn: (fn(args[0]),))
            elif hasattr(module, "gate_up_proj") and f"{name}.gate_proj" in rounding:  # a mixture of experts
                module.forward = functools.partial(rounded_experts, module, rounding[f"{name}.gate_proj"],
                                                   rounding[f"{name}.down_proj"])

    @torch.no_grad()
    def window_logits(self, window: np.ndarray, first: int) -> np.ndarray:
        ids = torch.from_numpy(window.astype(np.int64))[None].to(self.device)
        out = self.model(input_ids=ids, use_cache=False, logits_to_keep=len(window) - first)
        return out.logits[0, :-1].float().cpu().numpy()


def rounded_experts(mod, round_in: Rounding, round_down: Rounding, hidden, top_k_index, top_k_weights):
    """transformers' expert loop (Qwen3MoeExperts, MixtralExperts: each expert's SwiGLU over the tokens routed to it,
    scaled by their router weights and summed) with the inputs of both matmuls rounded as llama.cpp's MUL_MAT_ID
    rounds the rows it gathers (row by row, as MUL_MAT: so the whole input may be rounded first)."""
    out = torch.zeros_like(hidden)
    x = round_in(hidden)
    for e in range(mod.gate_up_proj.shape[0]):
        token, slot = torch.where(top_k_index == e)
        if len(token) == 0:
            continue
        gate, up = torch.nn.functional.linear(x[token], mod.gate_up_proj[e]).chunk(2, dim=-1)
        y = torch.nn.functional.linear(round_down(mod.act_fn(gate) * up), mod.down_proj[e])
        out.index_add_(0, token, y * top_k_weights[token, slot, None].to(y.dtype))
    return out


def activation_rounding(qtype: gguf.GGMLQuantizationType) -> Rounding:
    """What llama.cpp's CPU matmul does to the activations it multiplies with weights of `qtype` (its vec_dot_type)."""
    from edgequant import native

    if qtype == gguf.GGMLQuantizationType.F32:
        return lambda x: x
    if qtype in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16):
        dtype = torch.float16 if qtype == gguf.GGMLQuantizationType.F16 else torch.bfloat16
        return lambda x: x.to(dtype).float()
    if qtype not in native.DOT_TYPES:  # the lattice i-quants too: Q8_K activations, as the K-quants
        raise UserError(f"parity has no model of llama.cpp's activation rounding for {qtype.name} weights")
    act = native.activation_type(qtype)

    def rounded(x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float().cpu().numpy()
        y = native.dequantize(native.quantize_activations(rows, act), act)
        return torch.from_numpy(y).to(x.device).reshape(x.shape)

    return rounded


def source_weights(m: SourceModel) -> dict[str, torch.Tensor]:
    return {t.hf_name: m.checkpoint.load(t.hf_name) if t.stack is None else torch.from_numpy(m.load(t.gguf_name))
            for t in m.tensors.values() if t.hf_name is not None}


def gguf_weights(m: SourceModel, reader: gguf.GGUFReader) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The GGUF's tensors dequantized and laid out as the HF model wants them (HF name -> tensor), and each one's
    relative error against MODEL's (GGUF name -> source.err above).  Tensors MODEL does not store (rope_freqs) are
    left out: the HF model computes them from the config."""
    stored = {t.name: t for t in reader.tensors}
    expected = {n for n, t in m.tensors.items() if t.hf_name is not None}
    extra, missing = sorted(stored.keys() - m.tensors.keys()), sorted(expected - stored.keys())
    if extra or missing:
        raise UserError(f"the GGUF's tensors are not the model's (only in the GGUF: {', '.join(extra[:3]) or '-'}; "
                        f"only in the model: {', '.join(missing[:3]) or '-'})")
    weights, errors = {}, {}
    for name in sorted(expected):
        t, shape = stored[name], tuple(m.tensors[name].shape)
        if tuple(int(d) for d in reversed(t.shape)) != shape:
            raise UserError(f"{name}: the GGUF stores {'×'.join(map(str, reversed(t.shape.tolist())))}, the model "
                            f"{'×'.join(map(str, shape))}: not built from this model")
        w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape).astype(np.float32)
        src = m.load(name)
        errors[name] = float(np.linalg.norm(w - src) / max(float(np.linalg.norm(src)), np.finfo(np.float32).tiny))
        weights[m.tensors[name].hf_name] = torch.from_numpy(np.ascontiguousarray(m.from_gguf(name, w)))
    return weights, errors


def linear_roundings(m: SourceModel, reader: gguf.GGUFReader) -> dict[str, Rounding]:
    """HF weight name -> activation rounding, for every matmul llama.cpp runs (the output head reads token_embd
    when the embeddings are tied)."""
    types = {t.name: t.tensor_type for t in reader.tensors}
    out = {t.hf_name: activation_rounding(types[n]) for n, t in m.tensors.items() if t.hf_name and n in types}
    if m.hp.tied_embeddings:
        out[f"{m.arch.layout.head}.weight"] = out[f"{m.arch.layout.embed}.weight"]
    return out


def score(models: dict[str, Callable], windows: Windows, on_chunk=None) -> dict[str, EvalResult]:
    """Decode every window once per model; one EvalResult per COMPARISONS entry."""
    scorers = {k: Scorer() for k in COMPARISONS}
    for i in range(windows.n_chunk):
        window, targets = windows.window(i), windows.targets(i)
        logp = {k: log_softmax(f(window, windows.first)) for k, f in models.items()}
        for k, (model, base) in COMPARISONS.items():
            scorers[k].add(logp[model], targets, logp[base])
        if on_chunk is not None:
            on_chunk(i)
    return {k: EvalResult(windows.n_ctx, windows.n_chunk, s.n, s.perplexity(), s.divergence())
            for k, s in scorers.items()}


@dataclass(frozen=True)
class Check:
    value: float
    limit: float

    @property
    def ok(self) -> bool:
        return bool(self.value <= self.limit)  # NaN fails


@dataclass
class ParityReport:
    results: dict[str, EvalResult]  # COMPARISONS keys
    source_errors: dict[str, float]  # GGUF tensor name -> source.err

    def _ppl(self, k: str) -> float:
        return self.results[k].ppl.value

    def _kld(self, k: str) -> float:
        return self.results[k].divergence.kld.value

    @property
    def floor(self) -> dict[str, float]:
        rel = lambda x, ref: abs(self._ppl(x) - self._ppl(ref)) / self._ppl(ref)  # noqa: E731
        return {"ppl": rel("f16", "source") + rel("rounded", "torch"), "kld": self._kld("f16") + self._kld("rounding")}

    @property
    def checks(self) -> dict[str, Check]:
        floor, worst = self.floor, max(self.source_errors.values())
        return {"ppl": Check(abs(self._ppl("llama") - self._ppl("torch")) / self._ppl("torch"),
                             max(2 * floor["ppl"], PPL_MIN_LIMIT)),
                "kld": Check(self._kld("gap"), max(2 * floor["kld"], KLD_MIN_LIMIT)),
                "source": Check(worst, SOURCE_LIMIT)}

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks.values())

    def as_dict(self) -> dict:
        """JSON-ready: every comparison (runners.perplexity's keys), the floor, the checks and the verdict."""
        labels = {**MODELS, "gap": "(c) vs (b)", "rounding": "(e) vs (b)"}
        return {
            "comparisons": {k: {"label": labels[k], "model": COMPARISONS[k][0], "base": COMPARISONS[k][1],
                                **r.as_dict()} for k, r in self.results.items()},
            "noise_floor": self.floor,
            "checks": {k: {"value": c.value, "limit": c.limit, "ok": c.ok} for k, c in self.checks.items()},
            "source_errors": self.source_errors,
            "worst_tensor": max(self.source_errors, key=self.source_errors.get),
            "pass": self.ok,
        }


def parity(model: str, gguf_path: str | os.PathLike, text: bytes, *, n_ctx: int, n_chunks: int | None,
           device: torch.device, n_threads: int | None = None, progress=None) -> ParityReport:
    from edgequant.build import build

    m = SourceModel(model)
    with tempfile.TemporaryDirectory(prefix="edgequant-parity-") as tmp, \
            llama.LlamaCppModel(gguf_path, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=0) as quant:
        if quant.n_vocab != m.hp.n_vocab:
            raise UserError(f"{gguf_path} has {quant.n_vocab} tokens, {model} {m.hp.n_vocab}: not built from it")
        weights, errors = gguf_weights(m, quant.header)
        windows = make_windows(quant.tokenize(text), n_ctx, n_chunks, quant.bos if quant.add_bos else None)
        f16_path = Path(tmp) / "f16.gguf"
        build(model, "F16", f16_path, method="rtn", quiet=True)
        with llama.LlamaCppModel(f16_path, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=0) as f16:
            rounded = TorchLM(m, weights, device)
            rounded.round_linear_inputs(linear_roundings(m, quant.header))
            models = {"source": TorchLM(m, source_weights(m), device).window_logits,
                      "torch": TorchLM(m, weights, device).window_logits,
                      "llama": quant.window_logits, "f16": f16.window_logits, "rounded": rounded.window_logits}
            task = progress.add_task("parity", total=windows.n_chunk) if progress is not None else None
            results = score(models, windows, None if task is None else lambda i: progress.advance(task))
    return ParityReport(results, errors)
