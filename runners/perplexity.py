"""Perplexity and KL divergence computed the way llama-perplexity computes them, for any model that yields logits.

The text is tokenized once (BOS first when the model adds one) and cut into n_chunk windows of n_ctx tokens.
Each window is decoded from an empty cache, its first token replaced by BOS (when the model adds BOS), and only
its second half is scored, so every prediction sees at least n_ctx/2 tokens of context:

    window i = tokens[i*n_ctx : (i+1)*n_ctx]
    position  0    1 ... first-1 | first ........ n_ctx-2 | n_ctx-1
              BOS  context ...   | logits scored (n_ctx-1-first of them) -> predict tokens first+1 .. n_ctx-1
                                   first = n_ctx // 2

PPL = exp(mean -log p(target)) over all scored tokens, with llama-perplexity's "±" (standard error of the mean of
-log p, times PPL). Against a base distribution (another model, or a stored base file) we also report
KL(base || model), its percentiles, how often both put the same token on top, and ln(PPL/PPL_base) with the
uncertainty that accounts for the correlation of the two runs. As in llama-perplexity, the KL sum runs over the
tokens whose base log-probability is above -16 (its stored base keeps nothing finer).

Any model plugs in through a WindowLogits callable: llama.cpp (runners.llama.LlamaCppModel.window_logits) or a torch
model in the parity check. All reductions run in float64, where llama-perplexity accumulates in double.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from edgequant.errors import UserError

WindowLogits = Callable[[np.ndarray, int], np.ndarray]
"""(window int32 [n_ctx], first) -> float32 logits [n_ctx-1-first, n_vocab] at positions first .. n_ctx-2."""

KL_LOG_FLOOR = -16.0  # base log-probs at or below this do not enter the KL sum (llama-perplexity's cut)
KLD_PERCENTILES = {"max": 100.0, "p99.9": 99.9, "p99": 99.0, "p95": 95.0, "p90": 90.0, "median": 50.0,
                   "p10": 10.0, "p5": 5.0, "p1": 1.0, "p0.1": 0.1, "min": 0.0}


@dataclass(frozen=True)
class Windows:
    """The evaluation windows over a tokenized text."""

    tokens: np.ndarray  # int32, the whole text as tokenized (BOS included when the model adds it)
    n_ctx: int
    n_chunk: int
    bos: int | None  # replaces each window's first token; None when the model adds no BOS

    @property
    def first(self) -> int:
        return self.n_ctx // 2

    @property
    def n_scored(self) -> int:
        return self.n_ctx - 1 - self.first

    def window(self, i: int) -> np.ndarray:
        w = self.tokens[i * self.n_ctx:(i + 1) * self.n_ctx].copy()
        if self.bos is not None:
            w[0] = self.bos
        return w

    def targets(self, i: int) -> np.ndarray:
        return self.tokens[i * self.n_ctx + self.first + 1:(i + 1) * self.n_ctx]


def make_windows(tokens: np.ndarray, n_ctx: int, n_chunks: int | None, bos: int | None) -> Windows:
    """n_chunks windows (all that fit when None), refusing texts shorter than two windows like llama-perplexity."""
    if n_ctx < 4 or n_ctx % 2:
        raise UserError(f"--ctx must be an even number >= 4, got {n_ctx}")
    if len(tokens) < 2 * n_ctx:
        raise UserError(f"the text tokenizes to {len(tokens)} tokens; ctx {n_ctx} needs at least {2 * n_ctx}")
    n_max = len(tokens) // n_ctx
    if n_chunks is not None and n_chunks < 1:
        raise UserError(f"--chunks must be >= 1, got {n_chunks}")
    return Windows(np.asarray(tokens, dtype=np.int32), n_ctx, min(n_chunks or n_max, n_max), bos)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (rows = positions, columns = vocabulary)."""
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    return x


class BaseLogProbs(Protocol):
    """Log-probabilities of the base distribution for chunk i: float64 [n_scored, n_vocab]."""

    def chunk(self, i: int) -> np.ndarray: ...


class ModelBase:
    """A base model evaluated in the same run, on the same windows."""

    def __init__(self, logits: WindowLogits, windows: Windows):
        self.logits, self.windows = logits, windows

    def chunk(self, i: int) -> np.ndarray:
        return log_softmax(self.logits(self.windows.window(i), self.windows.first))


@dataclass(frozen=True)
class Estimate:
    """A mean and its standard error, as llama-perplexity prints `value ± err`."""

    value: float
    err: float


def _mean_err(s: float, s2: float, n: int) -> Estimate:
    """Mean of n samples from their sum and sum of squares, with the standard error of that mean."""
    mean = s / n
    var = s2 / n - mean * mean
    return Estimate(mean, math.sqrt(var / (n - 1)) if var > 0 and n > 1 else 0.0)


@dataclass
class Divergence:
    """Model against base, over the same scored tokens."""

    base_ppl: Estimate
    ln_ppl_ratio: Estimate  # ln(PPL / PPL_base)
    ppl_ratio: Estimate
    ppl_diff: Estimate
    ppl_correlation: float  # correlation of the two per-token mean -log p estimates
    kld: Estimate
    kld_percentiles: dict[str, float]
    same_top: Estimate  # fraction of positions where both rank the same token first
    rms_dp: Estimate  # RMS of p(target) - p_base(target)


@dataclass
class EvalResult:
    n_ctx: int
    n_chunk: int
    n_tokens: int  # scored tokens
    ppl: Estimate
    divergence: Divergence | None

    def as_dict(self) -> dict:
        """Flat JSON-ready metrics; the base-relative ones are None without a base."""
        d, pct = self.divergence, lambda e: None if e is None else 100 * e
        return {
            "ctx": self.n_ctx, "n_chunks": self.n_chunk, "n_tokens": self.n_tokens,
            "ppl": self.ppl.value, "ppl_err": self.ppl.err,
            "base_ppl": d and d.base_ppl.value, "base_ppl_err": d and d.base_ppl.err,
            "ln_ppl_ratio": d and d.ln_ppl_ratio.value, "ln_ppl_ratio_err": d and d.ln_ppl_ratio.err,
            "ppl_ratio": d and d.ppl_ratio.value, "ppl_ratio_err": d and d.ppl_ratio.err,
            "kld": d and {"mean": d.kld.value, "err": d.kld.err, **d.kld_percentiles},
            "same_top_pct": pct(d and d.same_top.value), "same_top_pct_err": pct(d and d.same_top.err),
            "rms_dp_pct": pct(d and d.rms_dp.value), "rms_dp_pct_err": pct(d and d.rms_dp.err),
        }


class Scorer:
    """Running float64 sums over scored tokens; one `add` per chunk."""

    def __init__(self) -> None:
        self.n = 0
        self.nll = self.nll2 = 0.0
        self.nll_base = self.nll_base2 = self.nll_cross = 0.0
        self.kld = self.kld2 = 0.0
        self.dp2 = self.dp4 = 0.0
        self.n_same_top = 0
        self.kld_values: list[np.ndarray] = []

    def add(self, logp: np.ndarray, targets: np.ndarray, base_logp: np.ndarray | None = None) -> None:
        rows = np.arange(len(targets))
        nll = -logp[rows, targets]
        self.n += len(targets)
        self.nll += nll.sum()
        self.nll2 += (nll * nll).sum()
        if base_logp is None:
            return
        nll_base = -base_logp[rows, targets]
        self.nll_base += nll_base.sum()
        self.nll_base2 += (nll_base * nll_base).sum()
        self.nll_cross += (nll * nll_base).sum()
        kept = base_logp > KL_LOG_FLOOR
        kld = np.where(kept, np.exp(base_logp) * (base_logp - logp), 0.0).sum(axis=1)
        self.kld += kld.sum()
        self.kld2 += (kld * kld).sum()
        self.kld_values.append(kld)
        self.n_same_top += int((logp.argmax(axis=1) == base_logp.argmax(axis=1)).sum())
        dp2 = (np.exp(-nll) - np.exp(-nll_base)) ** 2
        self.dp2 += dp2.sum()
        self.dp4 += (dp2 * dp2).sum()

    @property
    def ln_ppl(self) -> Estimate:
        return _mean_err(self.nll, self.nll2, self.n)

    def perplexity(self) -> Estimate:
        ln = self.ln_ppl
        ppl = math.exp(ln.value)
        return Estimate(ppl, ppl * ln.err)

    def divergence(self) -> Divergence | None:
        if not self.kld_values:
            return None
        n = self.n
        ln, ln_base = self.ln_ppl, _mean_err(self.nll_base, self.nll_base2, n)
        cov = (self.nll_cross / n - (self.nll / n) * (self.nll_base / n)) / (n - 1) if n > 1 else 0.0
        ratio_err = math.sqrt(max(ln.err ** 2 + ln_base.err ** 2 - 2 * cov, 0.0))
        ppl, base_ppl = self.perplexity(), Estimate(math.exp(ln_base.value), math.exp(ln_base.value) * ln_base.err)
        ratio = math.exp(ln.value - ln_base.value)
        diff_err = math.sqrt(max(ppl.err ** 2 + base_ppl.err ** 2 - 2 * ppl.value * base_ppl.value * cov, 0.0))
        kld_values = np.concatenate(self.kld_values)
        percentiles = np.percentile(kld_values, list(KLD_PERCENTILES.values()))
        same = self.n_same_top / n
        mse = _mean_err(self.dp2, self.dp4, n)
        rms = math.sqrt(mse.value)
        return Divergence(
            base_ppl=base_ppl,
            ln_ppl_ratio=Estimate(ln.value - ln_base.value, ratio_err),
            ppl_ratio=Estimate(ratio, ratio * ratio_err),
            ppl_diff=Estimate(ppl.value - base_ppl.value, diff_err),
            ppl_correlation=cov / (ln.err * ln_base.err) if ln.err and ln_base.err else 1.0,
            kld=_mean_err(self.kld, self.kld2, n),
            kld_percentiles=dict(zip(KLD_PERCENTILES, map(float, percentiles))),
            same_top=Estimate(same, math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0),
            rms_dp=Estimate(rms, 0.5 / rms * mse.err if rms else 0.0),
        )


def evaluate(logits: WindowLogits, windows: Windows, *, base: BaseLogProbs | None = None,
             on_chunk: Callable[[int, np.ndarray], None] | None = None) -> EvalResult:
    """Score every window; on_chunk(i, logp) sees each chunk's log-probs (to save them as a base, to show progress)."""
    scorer = Scorer()
    for i in range(windows.n_chunk):
        logp = log_softmax(logits(windows.window(i), windows.first))
        if logp.shape[0] != windows.n_scored:
            raise ValueError(f"window logits have {logp.shape[0]} rows, expected {windows.n_scored}")
        scorer.add(logp, windows.targets(i), None if base is None else base.chunk(i))
        if on_chunk is not None:
            on_chunk(i, logp)
    return EvalResult(windows.n_ctx, windows.n_chunk, scorer.n, scorer.perplexity(), scorer.divergence())
