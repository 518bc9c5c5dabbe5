"""Vector GPTQ: GPTQ onto the lattice i-quants' codebooks (issue 19), one linear layer, as a pure function.

The lattice types (convert/codecs/lattice.py) store each group of `dim` consecutive weights of a row (4 for IQ3_*, 8
for IQ2_*/IQ1_*) as one point of a fixed codebook, times a sub-block scale, with a sign per weight (IQ1_S: none, a
per-sub-block shift instead).  There is no per-weight grid, so the scalar solver's column-by-column rounding does not
apply; here the columns go in groups of `dim`:

  - entering a codec block (256 columns), its block and sub-block scales (and IQ1_S's shift) are fitted by the
    codec's own fit from the weights as updated so far, with importance diag(H + λI), as the scalar path does;
  - each group's signs are the signs of its updated weights; where a type stores only 7 sign bits per 8 weights
    (IQ3_XXS, IQ2_XXS, IQ2_XS: the count of negatives is even) the group that closes the 8 flips, if needed, its
    coordinate of least A_jj·w_j² (ggml's rule, with the exact metric's diagonal for ggml's weight);
  - with the signs fixed, each row's codebook point is the one of least exact OBS loss of fixing the group,
        e_gᵀ (H⁻¹_gg)⁻¹ e_g,  e_g = w_g − q_g,
    over the whole codebook.  With U the upper Cholesky factor of H⁻¹ (of the columns not yet fixed, GPTQ's
    identity), H⁻¹_gg = U_ggᵀ U_gg, so the metric is A = U_gg⁻¹ U_gg⁻ᵀ and the loss is ‖U_gg⁻ᵀ e_g‖²: exactly the
    sum of GPTQ's per-column errors (w'_j − q_j)² / U_jj² had the group's columns been rounded one by one to q_g;
  - the group's errors err = U_gg⁻ᵀ e_g are spread over the later columns as GPTQ does (rank-dim updates inside a
    lazy batch, one GEMM per batch for the rest);
  - with act_order, runs of 8 columns (whole groups, and IQ3_XXS's pairs of groups that share a sign parity) go by
    descending Σ diag(H), the scales fitted once up front from the original weights (GGUF cannot record a
    permutation, as for the scalar grids); refine then refits those scales.

The loss of a point p (signs σ, scale s, IQ1_S shift δ, q = s·σ⊙(p + δ)) is, up to a constant,
s²·(σσᵀ⊙A)·ppᵀ − 2s·(σ⊙A(w − sδσ))·p: one (rows, dim²) x (dim², K) and one (rows, dim) x (dim, K) product per
group, K the codebook's size (256 to 2048).

The written bytes are the fitted blocks with the chosen indices and signs: codec.dequantize of them is Ŵ, bit for
bit (each q is computed in the codec's own float32 order).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch

from edgequant.convert.codecs import Codec

from .fitter import fit
from .solver import Solution, concat_blocks, damped, inverse_cholesky

F32 = np.float32
BLOCK = 256  # every lattice type's super-block
FLIP_SEARCH = True  # the parity flip by the exact metric (False: ggml's least-weight rule; kept to measure it)
SIGN_MOVES = True  # refine may also change a group's signs (False: signs fixed after GPTQ; kept to measure it)


@dataclasses.dataclass(frozen=True)
class Lattice:
    """How vector GPTQ reads and writes one lattice codec's blocks.

    dim: weights per codebook point; sub: weights per sub-block scale; signs: "parity" (7 stored bits per 8
    weights, even count of negatives), "free" (8 bits per 8) or "none" (IQ1_S); grid: gguf-py's codebook name;
    scale(blocks) -> (rows, nb, 256 // sub) float32, the multiplier of a point's values exactly as the codec's
    dequantize computes it; shift(blocks) -> the same shape, IQ1_S's ±δ added to a point (None: no shift).
    unit, scale_bits: every type's sub-block scale is unit·d·(l + ½) for its stored integer l in [0, 2^scale_bits)
    (equal in float32 to `scale`, the factors being powers of two): what --refine steps."""

    dim: int
    sub: int
    signs: str
    grid: str
    scale: Callable
    unit: float
    scale_bits: int = 4
    shift: Callable | None = None


def _db(half: float, quarter: float):
    return lambda b: b.d.astype(F32)[..., None] * (F32(half) + b.scales.astype(F32)) * F32(quarter)


def _iq1_shift(b):
    from edgequant.convert.codecs.iq1_s import DELTA
    return np.where(b.negative, -DELTA, DELTA).astype(F32)


LATTICES = {
    "IQ3_XXS": Lattice(4, 32, "parity", "IQ3_XXS", _db(0.5, 0.5), 0.5),
    "IQ3_S": Lattice(4, 32, "free", "IQ3_S", lambda b: b.d.astype(F32)[..., None] * (F32(1) + F32(2) * b.scales.astype(F32)),
                     2.0),
    "IQ2_XXS": Lattice(8, 32, "parity", "IQ2_XXS", _db(0.5, 0.25), 0.25),
    "IQ2_XS": Lattice(8, 16, "parity", "IQ2_XS", _db(0.5, 0.25), 0.25),
    "IQ2_S": Lattice(8, 16, "free", "IQ2_S", _db(0.5, 0.25), 0.25),
    "IQ1_S": Lattice(8, 32, "none", "IQ1_S",
                     lambda b: b.d.astype(F32)[..., None] * (F32(2) * b.scales.astype(F32) + F32(1)), 2.0, 3, _iq1_shift),
    # IQ1_M: a scale per 16 weights and a shift per 8, so described per 8 with each scale read twice
    "IQ1_M": Lattice(8, 8, "none", "IQ1_M",
                     lambda b: np.repeat(b.d.astype(F32)[..., None] * (F32(2) * b.scales.astype(F32) + F32(1)), 2, axis=-1),
                     2.0, 3, _iq1_shift),
}


def codebook_values(name: str) -> np.ndarray:
    """gguf-py's codebook of type `name`: (K, dim) float32, the values the dequantization multiplies."""
    from gguf import quants
    cls = getattr(quants, name)
    cls.init_grid()
    return np.ascontiguousarray(cls.grid.reshape(cls.grid_shape), dtype=F32)


@torch.no_grad()
def solve_lattice(W, H, codec: Codec, *, block_size: int = 128, damp: float = 0.01, act_order: bool = False,
                  refine: int = 0, refine_damp: float = 0.1) -> Solution:
    """Vector GPTQ of W (rows = output features, cols = input features) given H = 2XᵀX, onto lattice `codec`
    (module docstring), on H's device (the block fits through the fit contract, which takes lattice fits to the
    host); then `refine` rounds of refine_lattice on H + λ'I, λ' = refine_damp · mean(diag H) (or GPTQ's λ if
    larger), as solver.solve's.  Loss as solver.Solution's: ½ tr(E (H + λI) Eᵀ), split over columns."""
    if codec.name not in LATTICES:
        raise ValueError(f"{codec.name}: vector GPTQ has no lattice description of this type")
    lat = LATTICES[codec.name]
    device = H.device if isinstance(H, torch.Tensor) else torch.device("cpu")
    W = torch.as_tensor(W, dtype=torch.float32).detach().to(device)
    H = torch.as_tensor(H, dtype=torch.float32).detach().to(device, copy=True)
    rows, cols = W.shape
    codec.check_shape(cols)
    if block_size % lat.dim or (block_size % BLOCK and BLOCK % block_size):
        raise ValueError(f"block_size {block_size} must be a multiple of {lat.dim} and a multiple or divisor of 256")
    dead = H.diagonal() == 0  # as solver.solve: dead columns keep their weights' nearest point, decoupled
    H[dead, dead] = 1
    perm = torch.arange(cols, device=device)
    if act_order:  # runs of 8 columns (whole groups; IQ3_XXS's parity pairs of groups of 4) by descending Σ diag(H)
        runs = torch.argsort(H.diagonal().reshape(-1, 8).sum(1), descending=True, stable=True)
        perm = (runs[:, None] * 8 + torch.arange(8, device=device)).flatten()
    U, lam, damp = inverse_cholesky(H[perm][:, perm] if act_order else H, damp)
    importance = H.diagonal() + lam
    dim = lat.dim
    P = torch.from_numpy(codebook_values(lat.grid)).to(device)  # (K, dim)
    eye = torch.eye(dim, device=device)
    PP = (P[:, :, None] * P[:, None, :]).reshape(len(P), dim * dim)  # (K, dim²): p_i p_j
    Wt = W.T[perm].contiguous()  # (cols, rows) in processing order: a column is a contiguous row
    Err = torch.empty(cols, rows, device=device)
    index = torch.empty(cols // dim, rows, dtype=torch.int64, device=device)  # processing order, as neg
    neg = torch.empty(cols, rows, dtype=torch.bool, device=device)
    scale = torch.empty(cols // lat.sub, rows, device=device)  # every sub-block's multiplier, original order
    shift = None if lat.shift is None else torch.empty_like(scale)
    fits, original = [], perm.tolist()

    def put(first: int, blocks) -> None:
        scale[first // lat.sub:][:blocks.d.shape[1] * (BLOCK // lat.sub)] = \
            torch.from_numpy(lat.scale(blocks).reshape(rows, -1).T.copy())
        if shift is not None:
            shift[first // lat.sub:][:blocks.d.shape[1] * (BLOCK // lat.sub)] = \
                torch.from_numpy(lat.shift(blocks).reshape(rows, -1).T.copy())

    if act_order:  # GGUF cannot record a permutation: the scales are fitted once, up front (as solver.solve's grid)
        fits.append(fit(codec, W, importance).blocks())
        put(0, fits[0])
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        for j in range(i1, i2, dim):
            if not act_order and j % BLOCK == 0:  # entering a codec block: all its columns are up to date
                fits.append(fit(codec, Wt[j:j + BLOCK].T, importance[j:j + BLOCK]).blocks())
                put(j, fits[-1])
            g = slice(j, j + dim)
            Ugg = U[g, g]
            Uinv = torch.linalg.solve_triangular(Ugg, eye, upper=True)
            A = Uinv @ Uinv.T  # (H⁻¹_gg)⁻¹ of the columns not yet fixed
            w = Wt[g]  # (dim, rows), updated by every earlier error
            sub = original[j] // lat.sub
            s = scale[sub]
            W8 = A8 = None
            if lat.signs == "parity" and dim < 8 and j % 8 == 0:
                U8inv = torch.linalg.solve_triangular(U[j:j + 8, j:j + 8], torch.eye(8, device=device), upper=True)
                W8, A8 = Wt[j:j + 8], U8inv @ U8inv.T
            sigma = choose_signs(lat, w, neg, j, A, W8, A8)
            t = w if shift is None else w - s * shift[sub]
            idx, best = best_points(P, PP, A, t, s, sigma, lat.signs == "none")
            if FLIP_SEARCH and lat.signs == "parity" and (j + dim) % 8 == 0:
                # the parity flip by the exact metric: each coordinate of the closing group, for the rows that flipped
                flipped = (sigma < 0) != (w < 0)
                odd = torch.nonzero(flipped.any(0)).flatten()
                if len(odd):
                    natural = torch.where(w[:, odd] < 0, -1.0, 1.0)
                    for k in range(dim):
                        trial = natural.clone()
                        trial[k] = -trial[k]
                        i_k, l_k = best_points(P, PP, A, t[:, odd], s[odd], trial, False)
                        better = l_k < best[odd]
                        rows_k = odd[better]
                        best[rows_k], idx[rows_k] = l_k[better], i_k[better]
                        sigma[:, rows_k] = trial[:, better]
                    neg[g] = sigma < 0
            index[j // dim] = idx
            pts = P[idx].T  # (dim, rows)
            if shift is None:
                q = (s * pts) * sigma  # the codec's (db * grid) * sign
            else:
                q = s * (pts + shift[sub])  # IQ1_S's dl * (grid + delta)
            err = torch.linalg.solve_triangular(Ugg.T, w - q, upper=False)  # U_ggᵀ err = e: GPTQ's errors in a row
            Err[g] = err
            Wt[j + dim:i2].addmm_(U[g, j + dim:i2].T, err, alpha=-1)
        Wt[i2:].addmm_(U[i1:i2, i2:].T, Err[i1:i2], alpha=-1)
    fitted = concat_blocks(fits)
    if act_order:  # back to the original column order
        index[perm[::dim] // dim] = index.clone()
        neg[perm] = neg.clone()
        Err[perm] = Err.clone()
    if refine:
        fitted = refine_lattice(W, damped(H, max(refine_damp * float(H.diagonal().mean()), lam)), lat, P, fitted,
                                index, neg, refine, block_size)
    blocks = write(codec, lat, fitted, index, neg)
    w_hat = torch.from_numpy(codec.dequantize(blocks)).to(device)  # where the caller goes on with it, as solve's
    if refine:
        E = w_hat - W
        column_loss = ((E @ damped(H, lam)) * E).sum(0).div_(2).cpu().numpy()
    else:
        column_loss = (Err.square().sum(1) / 2).cpu().numpy()
    return Solution(blocks, w_hat, float(column_loss.sum(dtype=np.float64)), column_loss, damp)


@torch.no_grad()
def refine_lattice(W, H, lat: Lattice, P, fitted, index, neg, iterations: int, block_size: int):
    """After vector GPTQ, exact coordinate descent on what the GGUF stores, as refine.py does for the scalar grids:
    each round refits every sub-block's integer scale l (Ŵ of a sub-block is unit·d·(l + ½) times its points' fixed
    values, so refine.refit_scales' integer Newton step applies as is), then moves each group of `dim` weights to
    the codebook point of least exact loss with every other weight's error known: with its signs kept, or (SIGN_MOVES;
    free-sign types, and the parity types' groups of 8) with the signs of the group's continuous optimum Ŵ_J - H_JJ⁻¹G_J, parity-corrected by
    flipping its least |value| — the better of the two (IQ1's shifts are kept):
    for a change Δ of Ŵ[r, J], ΔL = 2Δ·G[r, J] + Δᵀ H_JJ Δ, G = (Ŵ - W) H, kept current.  Only decreases are taken.
    W (rows, cols), H (damped) and P (K, dim) on one device; fitted: the fitted blocks of all the columns (d,
    scales, IQ1's shift); index (cols/dim, rows) and neg (cols, rows) are updated in place.  Returns fitted with
    the new scales."""
    from .refine import refit_scales, torch_refit

    device, dim = H.device, lat.dim
    rows, cols = W.shape
    nb = cols // BLOCK
    stored = fitted.scales.shape[-1]  # scales per block
    group = BLOCK // stored
    on_dev = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=F32)).to(device)  # noqa: E731
    d = on_dev(np.repeat(F32(lat.unit) * fitted.d.astype(F32), stored, axis=1))  # (rows, groups)
    sc = on_dev(fitted.scales.reshape(rows, -1).astype(F32) + F32(0.5))
    sign = torch.where(neg.T, -1.0, 1.0) if lat.signs != "none" else torch.ones(rows, cols, device=device)
    shift = None if lat.shift is None else on_dev(np.repeat(lat.shift(fitted).reshape(rows, -1), lat.sub, axis=1))
    idx = index.T.contiguous()  # (rows, groups of dim)
    lo, hi = 0.5, 2 ** lat.scale_bits - 0.5
    zero = torch.zeros(rows, nb * stored, device=device)
    PP = (P[:, :, None] * P[:, None, :]).reshape(len(P), dim * dim)

    def values():  # the fixed factor of every weight: sign · point (+ shift), (rows, cols)
        v = P[idx].reshape(rows, cols)
        return v * sign if shift is None else v + shift

    for _ in range(iterations):
        refit_scales(W, H, values(), d, sc, None, None, lo, hi, zero, block_size, torch_refit)
        s = torch.repeat_interleave(d * sc, group, dim=1)  # (rows, cols): each weight's sub-block scale
        Gt = H @ (s * values() - W).T  # (cols, rows)
        St, Sg = s.T.contiguous(), sign.T.contiguous()
        for i1 in range(0, cols, block_size):
            i2 = min(i1 + block_size, cols)
            Dt = torch.zeros(i2 - i1, rows, device=device)
            for j in range(i1, i2, dim):
                J, Jb = slice(j, j + dim), slice(j - i1, j - i1 + dim)
                HJJ, sg, sj = H[J, J], Sg[J], St[j]
                old = P[idx[:, j // dim]].T  # (dim, rows)
                w_cur = sj * sg * old if shift is None else sj * (old + shift[:, J].T)
                grad = Gt[J] - HJJ @ w_cur  # ΔL(q) = qᵀH_JJ q + 2q·grad + const, q the group's new Ŵ
                score = group_scores(P, PP, HJJ, grad, sj, sg, lat.signs == "none")
                best, new = score.min(1)
                cur = score.gather(1, idx[:, j // dim, None])[:, 0]
                new_sg = sg
                if SIGN_MOVES and lat.signs != "none" and (lat.signs == "free" or dim == 8):
                    # the signs of the group's continuous optimum w - H_JJ⁻¹G_J as a second candidate (parity
                    # types: its least |value| flipped where the count of negatives is odd)
                    u = w_cur - torch.linalg.solve(HJJ, Gt[J])
                    n = u < 0
                    if lat.signs == "parity":
                        odd = n.sum(0) % 2 == 1
                        n ^= odd[None, :] & (torch.arange(dim, device=device)[:, None] == u.abs().argmin(0)[None, :])
                    alt = torch.where(n, -1.0, 1.0)
                    best2, new2 = group_scores(P, PP, HJJ, grad, sj, alt, False).min(1)
                    take = best2 < best
                    best, new = torch.where(take, best2, best), torch.where(take, new2, new)
                    new_sg = torch.where(take[None, :], alt, sg)
                move = best < cur - 1e-6 * cur.abs()  # not a float tie; no branch on it (a host sync per group)
                new = torch.where(move, new, idx[:, j // dim])
                new_sg = torch.where(move[None, :], new_sg, sg)
                delta = sj * (new_sg * P[new].T - sg * old)  # the shift cancels; Ŵ changes by s·(σ'⊙p' - σ⊙p)
                idx[:, j // dim] = new
                Sg[J] = new_sg
                Dt[Jb] = delta
                Gt[j + dim:i2] += H[j + dim:i2, J] @ delta
            Gt[i2:].addmm_(H[i2:, i1:i2], Dt)
        sign = Sg.T.contiguous() if lat.signs != "none" else sign
    index.copy_(idx.T)
    if lat.signs != "none":
        neg.copy_(sign.T < 0)
    scales = (sc - 0.5).round().to(torch.int64).cpu().numpy().reshape(fitted.scales.shape)
    return dataclasses.replace(fitted, scales=scales.astype(fitted.scales.dtype))


def group_scores(P, PP, HJJ, grad, s, sigma, unsigned: bool) -> torch.Tensor:
    """ΔL of moving each row's group to q = s·σ⊙p, for every codebook point p (up to a constant), (rows, K):
    s²·pᵀ(σσᵀ⊙H_JJ)p + 2s·(σ⊙grad)·p."""
    if unsigned:
        quad = (PP @ HJJ.reshape(-1))[None, :]
    else:
        dim = len(HJJ)
        quad = (HJJ[:, :, None] * (sigma[:, None, :] * sigma[None, :, :])).reshape(dim * dim, -1).T @ PP.T
    return s[:, None].square() * quad + 2 * s[:, None] * ((sigma * grad).T @ P.T)


def best_points(P, PP, A, t, s, sigma, unsigned: bool):
    """Each row's codebook point of least exact loss given its signs: (indices (rows,), the loss up to the constant
    tᵀAt, which does not depend on the signs)."""
    lin = (sigma * (A @ t)).T @ P.T  # (rows, K)
    if unsigned:
        quad = (PP @ A.reshape(-1))[None, :]
    else:
        dim = len(A)
        quad = (A[:, :, None] * (sigma[:, None, :] * sigma[None, :, :])).reshape(dim * dim, -1).T @ PP.T
    loss = s[:, None].square() * quad - 2 * s[:, None] * lin
    best, idx = loss.min(1)
    return idx, best


def choose_signs(lat: Lattice, w: torch.Tensor, neg: torch.Tensor, j: int, A: torch.Tensor,
                 W8: torch.Tensor | None = None, A8: torch.Tensor | None = None) -> torch.Tensor:
    """The signs (dim, rows) ±1 of the group at column j, recorded in neg[j:j + dim]: the updated weights' signs; a
    parity type's group that closes 8 weights flips, where the 8 have an odd count of negatives, its coordinate of
    least A_jj·w_j².  IQ3_XXS's 8 are two groups: the first one, given the 8 (W8) and their metric (A8), makes the
    flip where the 8's least A_jj·w_j² is its own (the second then flips only if the updates changed the parity).
    A flip inside the second group alone cost 20 % more loss than the fit with no correlations at all."""
    dim = lat.dim
    if lat.signs == "none":
        neg[j:j + dim] = False
        return torch.ones_like(w)
    n = w < 0
    if lat.signs == "parity" and dim < 8 and j % 8 == 0 and W8 is not None:
        # the first of two groups of 4 (IQ3_XXS): where the 8's least weight is here, its flip is made here
        odd = (W8 < 0).sum(0) % 2 == 1
        least = (A8.diagonal()[:, None] * W8.square()).argmin(0)
        n ^= odd[None, :] & (torch.arange(dim, device=w.device)[:, None] == least[None, :])
    if lat.signs == "parity" and (j + dim) % 8 == 0:
        before = neg[j + dim - 8:j].sum(0) if dim < 8 else 0
        odd = (n.sum(0) + before) % 2 == 1
        least = (A.diagonal()[:, None] * w.square()).argmin(0)
        n ^= odd[None, :] & (torch.arange(dim, device=w.device)[:, None] == least[None, :])
    neg[j:j + dim] = n
    return torch.where(n, -1.0, 1.0)


def write(codec: Codec, lat: Lattice, fitted, index: torch.Tensor, neg: torch.Tensor):
    """The row's Blocks: the fitted scales (and shift) of its codec blocks with the chosen indices (groups, rows)
    and signs (cols, rows)."""
    rows = index.shape[1]
    nb = fitted.d.shape[1]
    index, neg = index.cpu(), neg.cpu()
    fields = {"index": index.T.numpy().reshape(rows, nb, -1).astype(fitted.index.dtype)}
    if lat.signs != "none":
        bits = (neg.T.reshape(rows, nb, 32, 8).to(torch.int64) << torch.arange(8)).sum(-1)
        if lat.signs == "parity":
            bits &= 127
        fields["signs"] = bits.numpy().astype(fitted.signs.dtype)
    return dataclasses.replace(fitted, **fields)
