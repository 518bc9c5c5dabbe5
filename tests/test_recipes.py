"""Per-tensor type choice (edgequant.convert.recipes) against hand-derived tables and llama.cpp itself.

The tables spell out llama.cpp's recipes for a few model shapes; the oracle tests then quantize tiny
synthetic GGUFs with llama.cpp's own llama_model_quantize (libllama from llama-cpp-python) and compare
every tensor's type with ours, for every ftype. With ../shared and the llama.cpp tools built
(scripts/build_llama_tools.sh), the llama-quantize binary does the same on bench-a.
"""

from __future__ import annotations

import ctypes
import pathlib
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

import gguf
import numpy as np
import pytest

from edgequant.convert.imatrix_file import write_imatrix_gguf
from edgequant.convert.recipes import FTYPES, ArchFacts, requires_imatrix, tensor_type
from edgequant.errors import UserError

Q = gguf.GGMLQuantizationType

BLOCK_ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class Model:
    """A dense model's shape: enough to name and shape every tensor."""

    n_layers: int
    n_head: int
    n_head_kv: int
    hidden: int
    ffn: int
    tied: bool = False
    arch: str = "llama"
    n_expert: int = 0
    stacked: bool = False  # the FFN is n_expert experts in llama.cpp's 3-D ffn_*_exps tensors, plus the router

    @property
    def facts(self) -> ArchFacts:
        return ArchFacts(self.n_head, self.n_head_kv, not self.tied, self.n_expert, self.arch)

    def ncols(self, role: str) -> int:
        return self.ffn if role == "ffn_down" else self.hidden

    def tensors(self, rows: int = 4) -> list[tuple[str, int | None, tuple[int, ...]]]:
        """(GGUF name, block index, numpy shape); `rows` is free: recipes only look at row length."""
        out = [("token_embd.weight", None, (rows, self.hidden)), ("output_norm.weight", None, (self.hidden,))]
        if not self.tied:
            out.append(("output.weight", None, (rows, self.hidden)))
        for i in range(self.n_layers):
            if self.stacked:
                out += [(f"blk.{i}.{r}.weight", i, (rows, self.ncols(r))) for r in BLOCK_ROLES[:4]]
                out += [(f"blk.{i}.{r}_exps.weight", i, (self.n_expert, rows, self.ncols(r))) for r in BLOCK_ROLES[4:]]
                out.append((f"blk.{i}.ffn_gate_inp.weight", i, (self.n_expert, self.hidden)))
            else:
                out += [(f"blk.{i}.{r}.weight", i, (rows, self.ncols(r))) for r in BLOCK_ROLES]
            out += [(f"blk.{i}.{n}.weight", i, (self.hidden,)) for n in ("attn_norm", "ffn_norm")]
        return out

    def type_of(self, ftype: str, name: str, layer: int | None = None, **kw) -> Q:
        shape = {n: s for n, _, s in self.tensors()}[name]
        return tensor_type(name, layer, self.n_layers, ftype, shape, self.facts, **kw)


GQA8 = Model(n_layers=8, n_head=8, n_head_kv=2, hidden=512, ffn=1536)  # gqa 4, untied
MHA2_TIED = Model(n_layers=2, n_head=4, n_head_kv=4, hidden=512, ffn=1536, tied=True)  # gqa 1
# rows of 544/1440 split into 32-blocks only; 1000 not even that
ODD = Model(n_layers=2, n_head=4, n_head_kv=4, hidden=544, ffn=1440)
ODDER = Model(n_layers=2, n_head=4, n_head_kv=4, hidden=544, ffn=1000, tied=True)

# gqa 4 and rows of 544/1440: the i-quants' Q5_K bumps fall back to Q5_1
ODD_GQA4 = Model(n_layers=8, n_head=8, n_head_kv=2, hidden=544, ffn=1440)

K2, K3, K4, K5, K6 = Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K
NL, XS = Q.IQ4_NL, Q.IQ4_XS
S3, XXS3, S2, XS2, XXS2, S1, M1 = Q.IQ3_S, Q.IQ3_XXS, Q.IQ2_S, Q.IQ2_XS, Q.IQ2_XXS, Q.IQ1_S, Q.IQ1_M

# The ftypes llama.cpp refuses to write without an importance matrix (some of their tensors' types need one).
NEED_IMATRIX = ("Q2_K_S", "IQ3_XXS", "IQ3_XS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M")

# ftype -> role -> types at GQA8's layers 0, 1, 3, 4, 7 (use_more_bits(i, 8) holds for 0, 3, 6, 7).
GQA8_LAYERS = (0, 1, 3, 4, 7)
GQA8_TABLE = {
    "Q2_K": {"attn_v": (K4,) * 5, "ffn_down": (K3,) * 5, "attn_output": (K3,) * 5, "attn_q": (K2,) * 5},
    "Q3_K_S": {"attn_v": (K3,) * 5, "ffn_down": (K3,) * 5, "attn_output": (K3,) * 5, "ffn_up": (K3,) * 5},
    "Q3_K_M": {"attn_v": (K5, K5, K4, K4, K4), "ffn_down": (K4,) * 5, "attn_output": (K4,) * 5, "attn_k": (K3,) * 5},
    "Q3_K_L": {"attn_v": (K5,) * 5, "ffn_down": (K5,) * 5, "attn_output": (K5,) * 5, "ffn_gate": (K3,) * 5},
    "Q4_K_S": {"attn_v": (K5, K5, K5, K4, K4), "ffn_down": (K5, K4, K4, K4, K4), "attn_output": (K4,) * 5},
    "Q4_K_M": {"attn_v": (K6, K4, K6, K4, K6), "ffn_down": (K6, K4, K6, K4, K6), "attn_q": (K4,) * 5},
    "Q5_K_S": {"attn_v": (K5,) * 5, "ffn_down": (K5,) * 5},
    "Q5_K_M": {"attn_v": (K6, K5, K6, K5, K6), "ffn_down": (K6, K5, K6, K5, K6), "ffn_up": (K5,) * 5},
    "Q6_K": {"attn_v": (K6,) * 5, "ffn_down": (K6,) * 5},
    "Q8_0": {"attn_v": (Q.Q8_0,) * 5, "ffn_down": (Q.Q8_0,) * 5},
    "Q4_0": {"attn_v": (Q.Q4_0,) * 5, "ffn_down": (Q.Q4_0,) * 5},
    "Q4_1": {"attn_v": (Q.Q4_1,) * 5, "ffn_down": (Q.Q4_1,) * 5},
    "Q5_0": {"attn_v": (Q.Q5_0,) * 5, "ffn_down": (Q.Q5_0,) * 5},
    "Q5_1": {"attn_v": (Q.Q5_1,) * 5, "ffn_down": (Q.Q5_1,) * 5},
    "F16": {"attn_v": (Q.F16,) * 5, "ffn_down": (Q.F16,) * 5},
    "BF16": {"attn_v": (Q.BF16,) * 5, "attn_q": (Q.BF16,) * 5},
    "F32": {"attn_v": (Q.F32,) * 5, "ffn_down": (Q.F32,) * 5},
    # gqa >= 4: attn_v to Q5_K; without an imatrix the first n_layers // 8 ffn_down to Q5_K
    "IQ4_NL": {"attn_v": (K5,) * 5, "ffn_down": (K5, NL, NL, NL, NL), "attn_output": (NL,) * 5, "attn_q": (NL,) * 5},
    "IQ4_XS": {"attn_v": (K5,) * 5, "ffn_down": (K5, XS, XS, XS, XS), "attn_output": (XS,) * 5, "ffn_up": (XS,) * 5},
    # gqa >= 4: attn_v to Q4_K; IQ3_XXS's ffn_down rule without an imatrix (with one: test_imatrix_rules_of_iq3_xxs)
    "Q2_K_S": {"attn_v": (K4,) * 5, "ffn_down": (K4, K2, K2, K2, K2), "attn_output": (K2,) * 5, "attn_q": (K2,) * 5},
    "IQ3_XXS": {"attn_v": (K4,) * 5, "ffn_down": (K4, K3, K3, K3, K3), "attn_output": (S3,) * 5, "attn_q": (S2,) * 5,
                "attn_k": (S2,) * 5, "ffn_up": (XXS3,) * 5, "ffn_gate": (XXS3,) * 5},
    "IQ3_XS": {"attn_v": (K4,) * 5, "ffn_down": (S3,) * 5, "attn_output": (S3,) * 5, "attn_q": (XXS3,) * 5,
               "attn_k": (XXS3,) * 5, "ffn_up": (S3, XXS3, XXS3, XXS3, S3), "ffn_gate": (S3, XXS3, XXS3, XXS3, S3)},
    "IQ3_S": {"attn_v": (K4,) * 5, "ffn_down": (S3,) * 5, "attn_output": (S3,) * 5, "attn_q": (S3,) * 5},
    "IQ3_M": {"attn_v": (K4,) * 5, "ffn_down": (K4, S3, S3, S3, S3), "attn_output": (K4,) * 5, "ffn_up": (S3,) * 5},
    "IQ2_XXS": {"attn_v": (K4,) * 5, "ffn_down": (K2, XXS2, XXS2, XXS2, XXS2), "attn_output": (XXS2,) * 5,
                "attn_k": (XXS2,) * 5},
    "IQ2_XS": {"attn_v": (K4,) * 5, "ffn_down": (K2, XS2, XS2, XS2, XS2), "attn_output": (XS2,) * 5, "attn_q": (XS2,) * 5},
    "IQ2_S": {"attn_v": (K4,) * 5, "ffn_down": (S3, XS2, XS2, XS2, XS2), "attn_output": (S3,) * 5, "ffn_up": (XS2,) * 5},
    "IQ2_M": {"attn_v": (K4,) * 5, "ffn_down": (S3, S2, S2, S2, S2), "attn_output": (S3,) * 5, "ffn_gate": (S2,) * 5},
    "IQ1_S": {"attn_v": (K4,) * 5, "ffn_down": (K2, S1, S1, S1, S1), "attn_output": (XXS2,) * 5, "attn_q": (S1,) * 5},
    "IQ1_M": {"attn_v": (K4,) * 5, "ffn_down": (K2, M1, M1, M1, M1), "attn_output": (XXS2,) * 5, "attn_k": (M1,) * 5},
}

# ftype -> (output, token_embd) for GQA8 (untied): output goes to Q6_K unless the file is Q8_0 or unquantized.
GQA8_ENDS = {
    "Q2_K": (K6, K2), "Q3_K_S": (K6, K3), "Q3_K_M": (K6, K3), "Q3_K_L": (K6, K3), "Q4_K_S": (K6, K4),
    "Q4_K_M": (K6, K4), "Q5_K_S": (K6, K5), "Q5_K_M": (K6, K5), "Q6_K": (K6, K6), "Q8_0": (Q.Q8_0, Q.Q8_0),
    "Q4_0": (K6, Q.Q4_0), "Q4_1": (K6, Q.Q4_1), "Q5_0": (K6, Q.Q5_0), "Q5_1": (K6, Q.Q5_1),
    "F16": (Q.F16, Q.F16), "BF16": (Q.BF16, Q.BF16), "F32": (Q.F32, Q.F32), "IQ4_NL": (K6, NL), "IQ4_XS": (K6, XS),
    # the 1- to 2-bit i-quants and IQ3_XXS: output Q5_K; token_embd Q2_K or IQ3_S
    "Q2_K_S": (K6, K2), "IQ3_XXS": (K5, S3), "IQ3_XS": (K6, S3), "IQ3_S": (K6, S3), "IQ3_M": (K6, S3),
    "IQ2_XXS": (K5, K2), "IQ2_XS": (K5, K2), "IQ2_S": (K5, S3), "IQ2_M": (K5, S3), "IQ1_S": (K5, K2), "IQ1_M": (K5, K2),
}

# ftype -> (attn_v, ffn_down) at MHA2_TIED's layers 0 and 1 (use_more_bits(i, 2) only for 1; gqa 1), and
# the tied token_embd, which takes the output rules.
MHA2_TABLE = {
    "Q2_K": ((K3, K3), (K3, K3), K6),
    "Q3_K_M": ((K5, K5), (K4, K4), K6),
    "Q3_K_L": ((K5, K5), (K5, K5), K6),
    "Q4_K_S": ((K5, K5), (K4, K4), K6),
    "Q4_K_M": ((K4, K6), (K4, K6), K6),
    "Q5_K_M": ((K5, K6), (K5, K6), K6),
    "Q4_0": ((Q.Q4_0, Q.Q4_0), (Q.Q4_0, Q.Q4_0), K6),
    "Q8_0": ((Q.Q8_0, Q.Q8_0), (Q.Q8_0, Q.Q8_0), Q.Q8_0),
    "F16": ((Q.F16, Q.F16), (Q.F16, Q.F16), Q.F16),
    "IQ4_NL": ((NL, NL), (NL, NL), K6),  # gqa 1, and 2 // 8 = 0 ffn_down bumps
    "IQ4_XS": ((XS, XS), (XS, XS), K6),
    "IQ3_XXS": ((S3, S3), (K3, K3), K5),  # without an imatrix: attn_v IQ3_S, ffn_down Q3_K (2 // 8 = 0 Q4_K)
    "IQ3_M": ((K4, K4), (S3, S3), K6),
    "IQ3_S": ((S3, S3), (S3, S3), K6),
    "IQ2_XXS": ((K2, K2), (XXS2, XXS2), K5),  # gqa 1: attn_v Q2_K
    "IQ2_M": ((S3, S3), (S2, S2), K5),
    "IQ1_M": ((K2, K2), (M1, M1), K5),
}

# Rows that are not whole 256-blocks: (model, ftype, name, layer, expected).
FALLBACKS = [
    (ODD, "Q4_K_M", "blk.1.attn_q.weight", 1, Q.Q5_0),  # Q4_K -> Q5_0
    (ODD, "Q4_K_M", "blk.1.attn_v.weight", 1, Q.Q8_0),  # more_bits: Q6_K -> Q8_0
    (ODD, "Q4_K_M", "blk.0.ffn_down.weight", 0, Q.Q5_0),
    (ODD, "Q4_K_M", "output.weight", None, Q.Q8_0),  # row not a Q4_K row -> output straight to Q8_0
    (ODD, "Q4_K_M", "token_embd.weight", None, Q.Q5_0),
    (ODD, "Q5_K_S", "blk.0.attn_k.weight", 0, Q.Q5_1),
    (ODD, "Q2_K", "blk.0.ffn_up.weight", 0, Q.Q4_0),
    (ODD, "Q2_K", "blk.0.attn_output.weight", 0, Q.Q4_0),  # Q3_K -> Q4_0
    (ODD, "Q3_K_L", "blk.0.attn_v.weight", 0, Q.Q5_1),  # Q5_K -> Q5_1
    (ODD, "Q6_K", "blk.0.ffn_gate.weight", 0, Q.Q8_0),
    (ODD, "Q4_0", "blk.0.attn_q.weight", 0, Q.Q4_0),  # 32-blocks fit
    (ODD, "Q4_0", "output.weight", None, Q.Q8_0),  # Q6_K -> Q8_0
    (ODDER, "Q4_K_M", "blk.0.ffn_down.weight", 0, Q.F16),  # 1000 columns: not even Q5_0 fits
    (ODDER, "Q4_0", "blk.1.ffn_down.weight", 1, Q.F16),
    (ODDER, "Q8_0", "blk.1.ffn_down.weight", 1, Q.F16),
    (ODDER, "Q4_K_M", "token_embd.weight", None, Q.Q8_0),  # tied: output rules
    (ODDER, "F16", "blk.1.ffn_down.weight", 1, Q.F16),
    (ODD, "IQ4_XS", "blk.1.attn_q.weight", 1, NL),  # IQ4_XS -> IQ4_NL
    (ODD, "IQ4_XS", "blk.0.ffn_down.weight", 0, NL),
    (ODD, "IQ4_XS", "token_embd.weight", None, NL),
    (ODD, "IQ4_XS", "output.weight", None, Q.Q8_0),  # row not an IQ4_XS row -> output straight to Q8_0
    (ODD, "IQ4_NL", "output.weight", None, Q.Q8_0),  # a whole IQ4_NL row: Q6_K, which falls back to Q8_0
    (ODD, "IQ4_NL", "blk.1.attn_k.weight", 1, NL),
    (ODD_GQA4, "IQ4_XS", "blk.3.attn_v.weight", 3, Q.Q5_1),  # Q5_K -> Q5_1
    (ODD_GQA4, "IQ4_NL", "blk.0.ffn_down.weight", 0, Q.Q5_1),
    (ODD_GQA4, "IQ4_NL", "blk.1.ffn_down.weight", 1, NL),
    (ODDER, "IQ4_XS", "blk.0.ffn_down.weight", 0, Q.F16),  # 1000 columns: not even IQ4_NL fits
    (ODDER, "IQ4_NL", "blk.1.ffn_down.weight", 1, Q.F16),
    (ODDER, "IQ4_XS", "token_embd.weight", None, Q.Q8_0),  # tied: output rules
    (ODD, "IQ3_S", "blk.1.attn_q.weight", 1, NL),  # every 256-block i-quant -> IQ4_NL
    (ODD, "IQ3_XS", "blk.1.attn_q.weight", 1, NL),
    (ODD, "IQ3_M", "output.weight", None, Q.Q8_0),
    (ODD, "IQ3_XXS", "output.weight", None, Q.Q8_0),  # before the Q5_K rule
    (ODD, "IQ2_M", "token_embd.weight", None, NL),  # IQ3_S -> IQ4_NL
    (ODD, "IQ1_S", "token_embd.weight", None, Q.Q4_0),  # Q2_K -> Q4_0
    (ODD, "IQ2_XXS", "blk.0.attn_v.weight", 0, Q.Q4_0),
    (ODD, "IQ1_M", "blk.1.ffn_up.weight", 1, NL),
    (ODD, "IQ2_S", "blk.1.attn_output.weight", 1, NL),
    (ODD_GQA4, "IQ2_XS", "blk.3.attn_v.weight", 3, Q.Q5_0),  # Q4_K -> Q5_0
    (ODDER, "IQ3_XXS", "blk.1.ffn_down.weight", 1, Q.F16),
    (ODDER, "IQ2_M", "token_embd.weight", None, Q.Q8_0),  # tied: output rules
]


@pytest.mark.parametrize("ftype", sorted(GQA8_TABLE))
def test_gqa8_block_tensors(ftype):
    for role, expected in GQA8_TABLE[ftype].items():
        got = tuple(GQA8.type_of(ftype, f"blk.{i}.{role}.weight", i) for i in GQA8_LAYERS)
        assert got == expected, (ftype, role)


@pytest.mark.parametrize("ftype", sorted(GQA8_ENDS))
def test_gqa8_output_and_untied_embeddings(ftype):
    output, embd = GQA8_ENDS[ftype]
    assert GQA8.type_of(ftype, "output.weight") == output
    assert GQA8.type_of(ftype, "token_embd.weight") == embd


@pytest.mark.parametrize("ftype", sorted(MHA2_TABLE))
def test_two_layer_tied_model(ftype):
    attn_v, ffn_down, embd = MHA2_TABLE[ftype]
    assert tuple(MHA2_TIED.type_of(ftype, f"blk.{i}.attn_v.weight", i) for i in (0, 1)) == attn_v
    assert tuple(MHA2_TIED.type_of(ftype, f"blk.{i}.ffn_down.weight", i) for i in (0, 1)) == ffn_down
    assert MHA2_TIED.type_of(ftype, "token_embd.weight") == embd


@pytest.mark.parametrize(("model", "ftype", "name", "layer", "expected"), FALLBACKS)
def test_row_length_fallback(model, ftype, name, layer, expected):
    assert model.type_of(ftype, name, layer) == expected


@pytest.mark.parametrize("ftype", sorted(FTYPES))
def test_norms_and_vectors_stay_f32(ftype):
    assert GQA8.type_of(ftype, "blk.3.attn_norm.weight", 3) == Q.F32
    assert GQA8.type_of(ftype, "output_norm.weight") == Q.F32
    facts = GQA8.facts
    assert tensor_type("blk.0.attn_q.bias", 0, 8, ftype, (512,), facts) == Q.F32
    assert tensor_type("blk.0.attn_q_norm.weight", 0, 8, ftype, (1, 64), facts) == Q.F32  # ne = [64, 1]: 1-D


def test_imatrix_moves_first_ffn_down_of_q4_0_and_q5_0():
    assert GQA8.type_of("Q4_0", "blk.0.ffn_down.weight", 0, has_imatrix=True) == Q.Q4_1
    assert GQA8.type_of("Q5_0", "blk.0.ffn_down.weight", 0, has_imatrix=True) == Q.Q5_1
    assert GQA8.type_of("Q4_0", "blk.1.ffn_down.weight", 1, has_imatrix=True) == Q.Q4_0


@pytest.mark.parametrize("ftype", ["IQ4_NL", "IQ4_XS"])
def test_imatrix_keeps_first_ffn_down_of_iq4(ftype):
    """Without an imatrix the first eighth of ffn_down goes to Q5_K; with one it stays at the file's type."""
    base = Q[ftype]
    assert GQA8.type_of(ftype, "blk.0.ffn_down.weight", 0) == K5
    assert GQA8.type_of(ftype, "blk.0.ffn_down.weight", 0, has_imatrix=True) == base
    assert GQA8.type_of(ftype, "blk.0.attn_v.weight", 0, has_imatrix=True) == K5  # the gqa bump does not care


def test_imatrix_rules_of_iq3_xxs():
    """IQ3_XXS's attn_v (gqa < 4) and ffn_down move only without an imatrix: with one they stay IQ3_XXS."""
    assert MHA2_TIED.type_of("IQ3_XXS", "blk.0.attn_v.weight", 0, has_imatrix=True) == XXS3
    assert GQA8.type_of("IQ3_XXS", "blk.0.ffn_down.weight", 0, has_imatrix=True) == XXS3
    assert GQA8.type_of("IQ3_XXS", "blk.0.attn_v.weight", 0, has_imatrix=True) == K4


def test_eight_experts():
    """With 8 experts the 3-bit i-quants put attn_v/attn_k at Q8_0 and attn_output at Q5_K, as the K-quants; the
    1- and 2-bit ones attn_v/attn_k at Q4_K and attn_output at Q5_K, no Q8_0."""
    moe = Model(n_layers=8, n_head=8, n_head_kv=8, hidden=512, ffn=1536, n_expert=8)
    for ftype in ("IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M"):
        assert [moe.type_of(ftype, f"blk.2.{r}.weight", 2) for r in ("attn_v", "attn_k", "attn_output")] == [Q.Q8_0, Q.Q8_0, K5]
    for ftype in ("IQ2_XXS", "IQ1_M", "IQ2_M"):
        assert [moe.type_of(ftype, f"blk.2.{r}.weight", 2) for r in ("attn_v", "attn_k", "attn_output")] == [K4, K4, K5]
    assert moe.type_of("IQ3_M", "blk.3.ffn_down.weight", 3) == K4  # use_more_bits(3, 8)
    assert moe.type_of("IQ3_M", "blk.4.ffn_down.weight", 4) == S3


MIXTRAL8 = Model(n_layers=16, n_head=8, n_head_kv=2, hidden=256, ffn=512, n_expert=8, stacked=True)
QWEN3MOE12 = Model(n_layers=16, n_head=8, n_head_kv=4, hidden=256, ffn=256, n_expert=12, stacked=True, arch="qwen3moe")
QWEN3MOE4_MHA = Model(n_layers=3, n_head=4, n_head_kv=4, hidden=256, ffn=512, n_expert=4, stacked=True, arch="qwen3moe")


@pytest.mark.parametrize("model, ftype, name, layer, want", [
    # 8 experts (Mixtral): attn_v and attn_k at Q8_0 whatever the layer, attn_output at Q5_K ...
    (MIXTRAL8, "Q4_K_M", "blk.5.attn_v.weight", 5, Q.Q8_0),
    (MIXTRAL8, "Q4_K_M", "blk.5.attn_k.weight", 5, Q.Q8_0),
    (MIXTRAL8, "Q4_K_M", "blk.5.attn_output.weight", 5, K5),
    (MIXTRAL8, "Q3_K_M", "blk.0.attn_v.weight", 0, Q.Q8_0),
    (MIXTRAL8, "Q3_K_M", "blk.9.attn_output.weight", 9, K5),
    (MIXTRAL8, "Q5_K_M", "blk.9.attn_output.weight", 9, K5),  # not in the list: the base type
    (MIXTRAL8, "Q2_K", "blk.9.attn_output.weight", 9, K5),
    # ... the 3-D ffn_down_exps follow the dense ffn_down rules by their block (use_more_bits at Q4_K_M: blocks
    # 0, 1, 4, 7, 10, 13, 14, 15 of 16), the gate/up stacks the base type
    (MIXTRAL8, "Q4_K_M", "blk.1.ffn_down_exps.weight", 1, K6),
    (MIXTRAL8, "Q4_K_M", "blk.2.ffn_down_exps.weight", 2, K4),
    (MIXTRAL8, "Q4_K_M", "blk.4.ffn_down_exps.weight", 4, K6),
    (MIXTRAL8, "Q4_K_M", "blk.14.ffn_down_exps.weight", 14, K6),
    (MIXTRAL8, "Q4_K_M", "blk.4.ffn_gate_exps.weight", 4, K4),
    (MIXTRAL8, "Q3_K_M", "blk.0.ffn_down_exps.weight", 0, K5),  # the first 16th
    (MIXTRAL8, "Q3_K_M", "blk.1.ffn_down_exps.weight", 1, K4),
    (MIXTRAL8, "Q3_K_M", "blk.1.ffn_up_exps.weight", 1, K3),
    (MIXTRAL8, "IQ3_M", "blk.4.ffn_down_exps.weight", 4, K4),  # 8 experts: use_more_bits' blocks too
    (MIXTRAL8, "IQ3_M", "blk.5.ffn_down_exps.weight", 5, S3),
    # the router is never quantized (kept as the converter stored it: F32)
    (MIXTRAL8, "Q4_K_M", "blk.3.ffn_gate_inp.weight", 3, Q.F32),
    (QWEN3MOE12, "Q3_K_M", "blk.3.ffn_gate_inp.weight", 3, Q.F32),
    # other expert counts: no attention bumps (only the dense rules: Q4_K_M's use_more_bits on attn_v)
    (QWEN3MOE12, "Q4_K_M", "blk.5.attn_v.weight", 5, K4),
    (QWEN3MOE12, "Q4_K_M", "blk.4.attn_v.weight", 4, K6),
    (QWEN3MOE12, "Q4_K_M", "blk.5.attn_k.weight", 5, K4),
    (QWEN3MOE12, "Q4_K_M", "blk.5.attn_output.weight", 5, K4),
    (QWEN3MOE12, "Q3_K_M", "blk.5.attn_output.weight", 5, K4),
    (QWEN3MOE12, "Q3_K_M", "blk.1.attn_v.weight", 1, K5),
    (QWEN3MOE12, "Q3_K_M", "blk.2.attn_v.weight", 2, K4),
    # 4+ experts give attn_v Q4_K in the 1-/2-bit recipes even without grouped-query heads
    (QWEN3MOE4_MHA, "IQ2_XXS", "blk.1.attn_v.weight", 1, K4),
    (QWEN3MOE4_MHA, "IQ2_XXS", "blk.1.attn_k.weight", 1, XXS2),  # attn_k's Q4_K is for exactly 8
    (MHA2_TIED, "IQ2_XXS", "blk.1.attn_v.weight", 1, K2),  # the same heads, dense: Q2_K
])
def test_mixture_of_experts_rules(model, ftype, name, layer, want):
    """llama-quant.cpp's expert-count rules, by hand: n_expert == 8 bumps attention; n_expert >= 4 the 1-/2-bit
    attn_v; expert stacks are placed by their block (its layer_info parses blk.N. once n_expert > 1)."""
    assert model.type_of(ftype, name, layer) == want


def test_requires_imatrix():
    """llama.cpp's list: the 1- to 3-bit lattice types and Q2_K in Q2_K_S, never token_embd or output."""
    for t in (XXS3, S2, XS2, XXS2, S1, M1):
        assert requires_imatrix("blk.0.attn_q.weight", t, "IQ2_M")
        assert not requires_imatrix("token_embd.weight", t, "IQ2_M") and not requires_imatrix("output.weight", t, "IQ2_M")
    assert requires_imatrix("blk.0.ffn_up.weight", K2, "Q2_K_S") and not requires_imatrix("blk.0.ffn_up.weight", K2, "Q2_K")
    for t in (S3, NL, XS, K4, Q.Q8_0):
        assert not requires_imatrix("blk.0.attn_q.weight", t, "IQ3_M")


def test_fused_qkv_follows_attn_v():
    got = tensor_type("blk.3.attn_qkv.weight", 3, 8, "Q4_K_M", (1536, 512), GQA8.facts)
    assert got == Q.Q6_K


def test_ftypes_name_the_gguf_file_types():
    assert FTYPES["Q4_K_M"] == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert FTYPES["F32"] == gguf.LlamaFileType.ALL_F32
    assert FTYPES["IQ4_XS"] == gguf.LlamaFileType.MOSTLY_IQ4_XS
    assert FTYPES["IQ3_M"] == gguf.LlamaFileType.MOSTLY_IQ3_M and FTYPES["IQ1_M"] == gguf.LlamaFileType.MOSTLY_IQ1_M
    assert FTYPES["Q2_K_S"] == gguf.LlamaFileType.MOSTLY_Q2_K_S
    assert len(FTYPES) == 30


def test_unknown_ftype_is_a_user_error():
    with pytest.raises(UserError, match="Q4_K_M"):
        GQA8.type_of("Q4_K_X", "blk.0.attn_v.weight", 0)


# --- llama.cpp itself as the reference -------------------------------------------------------------

ORACLE_MODELS = {
    "gqa8": Model(n_layers=8, n_head=8, n_head_kv=2, hidden=256, ffn=512),
    "mha2-tied": Model(n_layers=2, n_head=4, n_head_kv=4, hidden=256, ffn=768, tied=True),
    "gqa32": Model(n_layers=32, n_head=32, n_head_kv=8, hidden=256, ffn=512),
    "odd3-tied": Model(n_layers=3, n_head=4, n_head_kv=4, hidden=288, ffn=1000, tied=True),
    "odd5": Model(n_layers=5, n_head=4, n_head_kv=1, hidden=544, ffn=1440),
    "qwen3-28": Model(n_layers=28, n_head=16, n_head_kv=8, hidden=256, ffn=512, tied=True, arch="qwen3"),
    "llama-70b": Model(n_layers=80, n_head=64, n_head_kv=8, hidden=256, ffn=512),
    "qwen2-72b": Model(n_layers=80, n_head=8, n_head_kv=8, hidden=256, ffn=512, arch="qwen2"),
    "experts8": Model(n_layers=4, n_head=8, n_head_kv=2, hidden=256, ffn=512, n_expert=8),
    # MoE files as the converter writes them (3-D expert stacks, F32 router): Mixtral's 8 experts (llama arch) and
    # Qwen3-MoE's other counts, 16 blocks so the first/last-eighth rules of ffn_down_exps have blocks on both sides
    "mixtral-8": Model(n_layers=16, n_head=8, n_head_kv=2, hidden=256, ffn=512, n_expert=8, stacked=True),
    "qwen3moe-12": Model(n_layers=16, n_head=8, n_head_kv=4, hidden=256, ffn=256, n_expert=12, stacked=True,
                         arch="qwen3moe"),
    "qwen3moe-4-mha": Model(n_layers=3, n_head=4, n_head_kv=4, hidden=256, ffn=512, n_expert=4, stacked=True,
                            arch="qwen3moe"),
}


def _write_f16_gguf(path, model: Model) -> None:
    w = gguf.GGUFWriter(str(path), model.arch)
    w.add_context_length(64)
    w.add_embedding_length(model.hidden)
    w.add_block_count(model.n_layers)
    w.add_feed_forward_length(model.ffn)
    w.add_head_count(model.n_head)
    w.add_head_count_kv(model.n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    if model.n_expert:
        w.add_expert_count(model.n_expert)
        w.add_expert_used_count(2)
        if model.stacked:
            w.add_expert_feed_forward_length(model.ffn)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    rng = np.random.default_rng(0)
    for name, _, shape in model.tensors():
        dtype = np.float16 if len(shape) > 1 and "ffn_gate_inp" not in name else np.float32  # the router: F32
        w.add_tensor(name, rng.standard_normal(shape).astype(dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _llama_quantize(src, dst, ftype: str, with_imatrix: bool, model: Model | None = None) -> dict[str, Q] | None:
    """llama.cpp's types for every tensor, or None where llama_model_quantize fails.  with_imatrix: an importance
    of ones for every matrix of `model` (without `model`, an entry for no tensor: llama.cpp then only notes that an
    imatrix was given)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(FTYPES[ftype])
    params.nthread = 1
    if with_imatrix:
        # an expert stack's importance is one per expert (n_expert · cols values), as llama-imatrix writes it
        matrices = ([(n, s[-1] * (s[0] if len(s) == 3 else 1)) for n, _, s in model.tensors() if len(s) >= 2]
                    if model else [("unused", 1)])
        keep = [(n.encode(), (ctypes.c_float * cols)(*[1.0] * cols)) for n, cols in matrices]
        entries = (llama_cpp.llama_model_imatrix_data * (len(keep) + 1))()
        for e, (name, data), (_, cols) in zip(entries, keep, matrices):
            e.name, e.data, e.size = name, data, cols
        params.imatrix = entries
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        return None
    return {t.name: Q(t.tensor_type) for t in gguf.GGUFReader(dst).tensors}


@pytest.fixture(scope="module", params=sorted(ORACLE_MODELS))
def f16_model(request, tmp_path_factory):
    model = ORACLE_MODELS[request.param]
    path = tmp_path_factory.mktemp("recipes") / f"{request.param}-f16.gguf"
    _write_f16_gguf(path, model)
    return model, path


@pytest.mark.parametrize("ftype", sorted(set(FTYPES) - set(NEED_IMATRIX)))
def test_matches_llama_quantize(f16_model, ftype, tmp_path):
    model, src = f16_model
    theirs = _llama_quantize(src, tmp_path / "out.gguf", ftype, with_imatrix=False)
    ours = {name: tensor_type(name, layer, model.n_layers, ftype, shape, model.facts)
            for name, layer, shape in model.tensors()}
    assert ours == theirs


@pytest.mark.parametrize("ftype", sorted(set(NEED_IMATRIX) | {"IQ3_S", "IQ3_M", "IQ4_XS", "Q4_K_M"}))
def test_matches_llama_quantize_with_full_imatrix(f16_model, ftype, tmp_path):
    """The low-bit ftypes, which llama.cpp writes only with an importance matrix for every tensor that needs one."""
    model, src = f16_model
    theirs = _llama_quantize(src, tmp_path / "out.gguf", ftype, with_imatrix=True, model=model)
    ours = {name: tensor_type(name, layer, model.n_layers, ftype, shape, model.facts, has_imatrix=True)
            for name, layer, shape in model.tensors()}
    assert ours == theirs


@pytest.mark.parametrize("ftype", NEED_IMATRIX)
def test_llama_quantize_refuses_without_imatrix(ftype, tmp_path):
    """Where llama.cpp refuses an ftype without an importance matrix, requires_imatrix names a tensor of it."""
    model = ORACLE_MODELS["gqa8"]
    _write_f16_gguf(tmp_path / "in.gguf", model)
    assert _llama_quantize(tmp_path / "in.gguf", tmp_path / "out.gguf", ftype, with_imatrix=False) is None
    assert any(requires_imatrix(name, tensor_type(name, layer, model.n_layers, ftype, shape, model.facts), ftype)
               for name, layer, shape in model.tensors())


@pytest.mark.parametrize("ftype", ["Q4_0", "Q5_0", "Q4_K_M", "IQ4_NL", "IQ4_XS"])
def test_matches_llama_quantize_with_imatrix(ftype, tmp_path):
    model = ORACLE_MODELS["gqa32"]
    _write_f16_gguf(tmp_path / "in.gguf", model)
    theirs = _llama_quantize(tmp_path / "in.gguf", tmp_path / "out.gguf", ftype, with_imatrix=True)
    ours = {name: tensor_type(name, layer, model.n_layers, ftype, shape, model.facts, has_imatrix=True)
            for name, layer, shape in model.tensors()}
    assert ours == theirs


# --- the llama-quantize binary on bench-a ------------------------------------------------------------

REPO = pathlib.Path(__file__).resolve().parents[1]
TOOLS = REPO / ".cache" / "llama-tools"
BENCH_A = REPO.parent / "shared" / "models" / "bench-a"


def _llama_quantize_bin() -> str | None:
    local = TOOLS / "bin" / "llama-quantize"
    return str(local) if local.exists() else shutil.which("llama-quantize")


def _convert_script() -> pathlib.Path | None:
    return next(TOOLS.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"), None)


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.skipif(not BENCH_A.exists(), reason="../shared missing")
@pytest.mark.skipif(_llama_quantize_bin() is None or _convert_script() is None, reason="llama.cpp tools not built")
def test_bench_a_matches_llama_quantize_binary(tmp_path):
    """Every ftype, plus Q4_0/Q5_0 with an imatrix file from our writer (which llama-quantize must accept; the
    ftypes that need one always get it)."""
    f16 = tmp_path / "bench-a-f16.gguf"
    subprocess.run([sys.executable, str(_convert_script()), str(BENCH_A), "--outfile", str(f16), "--outtype", "f16"],
                   check=True, capture_output=True)
    reader = gguf.GGUFReader(f16)
    arch = reader.fields["general.architecture"].contents()
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
    facts = ArchFacts(reader.fields[f"{arch}.attention.head_count"].contents(),
                      reader.fields[f"{arch}.attention.head_count_kv"].contents(),
                      has_output="output.weight" in shapes, name=arch)
    n_layers = reader.fields[f"{arch}.block_count"].contents()
    imatrix = tmp_path / "imatrix.gguf"
    write_imatrix_gguf(imatrix, {n: (np.ones(s[-1]), 1) for n, s in shapes.items() if len(s) == 2},
                       datasets=["ones"], chunk_count=1, chunk_size=1)
    for ftype, with_imatrix in [(f, f in NEED_IMATRIX) for f in FTYPES] + [("Q4_0", True), ("Q5_0", True)]:
        out = tmp_path / f"{ftype}.gguf"
        options = ["--imatrix", str(imatrix)] if with_imatrix else []
        subprocess.run([_llama_quantize_bin(), *options, str(f16), str(out), ftype, "2"], check=True, capture_output=True)
        theirs = {t.name: Q(t.tensor_type) for t in gguf.GGUFReader(out).tensors}
        ours = {}
        for name, shape in shapes.items():
            block = re.match(r"blk\.(\d+)\.", name)
            layer = int(block[1]) if block else None
            ours[name] = tensor_type(name, layer, n_layers, ftype, shape, facts, has_imatrix=with_imatrix)
        assert ours == theirs, (ftype, with_imatrix)
        out.unlink()
