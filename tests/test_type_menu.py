"""The types a size-budgeted build may give each tensor (edgequant.convert.type_menu), against a table and llama.cpp.

The oracle quantizes tiny synthetic GGUFs with llama.cpp's llama_model_quantize in --pure mode (every quantizable
tensor gets the ftype's base type unless its rows do not split into that type's blocks): a type is on our menu for a
tensor exactly when llama.cpp keeps it for that tensor.
"""

from __future__ import annotations

import ctypes

import gguf
import numpy as np
import pytest

from edgequant.plan import plan_tensors
from edgequant.write import write_gguf
from edgequant.convert.codecs import CODECS
from edgequant.convert.gguf_out import TensorPlan
from edgequant.convert.recipes import FTYPES, tensor_type
from edgequant.convert.type_menu import bytes_per_weight, menu
from edgequant.write import rtn_encoder
from edgequant.model import SourceModel
from edgequant.progress import Progress
from test_recipes import ORACLE_MODELS, _write_f16_gguf

Q = gguf.GGMLQuantizationType

K256 = (Q.Q2_K, Q.Q3_K, Q.IQ4_XS, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0, Q.F16)
B32 = (Q.IQ4_NL, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.F16)

# (name, numpy shape, menu)
TABLE = [
    ("blk.0.attn_q.weight", (4096, 4096), K256),
    ("blk.0.ffn_down.weight", (4096, 14336), K256),  # 14336 = 56 * 256
    ("token_embd.weight", (128256, 4096), K256),  # no restriction on the embedding: see type_menu's docstring
    ("output.weight", (128256, 4096), K256),
    ("blk.0.ffn_down.weight", (896, 4864), K256),  # Qwen2-0.5B: 4864 = 19 * 256
    ("blk.0.attn_q.weight", (896, 896), B32),  # 896 = 28 * 32, not a multiple of 256
    ("token_embd.weight", (151936, 896), B32),
    ("blk.0.ffn_down.weight", (544, 1440), B32),
    ("blk.0.ffn_down.weight", (288, 1000), (Q.F16,)),  # 1000 is no multiple of 32
    ("blk.0.attn_q.weight", (64, 48), (Q.F16,)),
    ("blk.0.ffn_up_exps.weight", (8, 14336, 4096), K256),  # 3-D (experts): rows are still the last dim
    # not quantized: not allocated
    ("blk.0.attn_norm.weight", (4096,), ()),
    ("output_norm.weight", (4096,), ()),
    ("blk.0.attn_q.bias", (4096,), ()),
    ("blk.0.attn_q_norm.weight", (1, 128), ()),  # ne = [128, 1]: 1-D to ggml
    ("blk.0.ffn_gate_inp.weight", (8, 4096), ()),  # MoE router
    ("rope_freqs", (64, 64), ()),  # llama.cpp quantizes only names ending in "weight"
]


@pytest.mark.parametrize(("name", "shape", "expected"), TABLE)
def test_menu_table(name, shape, expected):
    assert menu(name, shape) == expected


def test_menus_are_encodable_and_smallest_first():
    for _, shape, _ in TABLE:
        types = menu("blk.0.ffn_up.weight", shape)
        assert all(t in CODECS or t == Q.F16 for t in types)
        assert [bytes_per_weight(t) for t in types] == sorted(bytes_per_weight(t) for t in types)


@pytest.mark.parametrize("ftype", ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "IQ4_XS", "F16"])
def test_recipes_of_the_k_quant_files_stay_on_the_menu(ftype):
    """An allocation can always reproduce these ftypes' own files (the 32-block ftypes on rows of 256 cannot: their
    same-size K-quant counterparts take that place on the menu)."""
    for model in ORACLE_MODELS.values():
        for name, layer, shape in model.tensors():
            types = menu(name, shape)
            if types:
                assert tensor_type(name, layer, model.n_layers, ftype, shape, model.facts) in types, (name, shape)


# --- llama.cpp itself as the reference -------------------------------------------------------------

# ftypes whose base type is each menu type (llama.cpp's default type for the ftype; --pure puts it everywhere)
PURE_FTYPES = ["Q2_K", "Q3_K_S", "IQ4_XS", "Q4_K_S", "Q5_K_S", "Q6_K", "Q8_0", "IQ4_NL", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


def _llama_quantize_pure(src, dst, ftype: str) -> dict[str, Q]:
    llama_cpp = pytest.importorskip("llama_cpp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(FTYPES[ftype])
    params.nthread = 1
    params.pure = True
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return {t.name: Q(t.tensor_type) for t in gguf.GGUFReader(dst).tensors}


@pytest.mark.parametrize("model_name", ["odd3-tied", "odd5", "mha2-tied"])
def test_menu_is_what_llama_quantize_keeps(model_name, tmp_path):
    """Every menu type but F16 is one llama.cpp keeps for the tensor; where rows are not whole 256-blocks, the menu
    holds every type it keeps; and where it falls back, it falls back to a type on the menu."""
    model = ORACLE_MODELS[model_name]
    src = tmp_path / "f16.gguf"
    _write_f16_gguf(src, model)
    kept: dict[str, set[Q]] = {name: set() for name, _, _ in model.tensors()}
    for ftype in PURE_FTYPES:
        base = Q[ftype.removesuffix("_S")]
        theirs = _llama_quantize_pure(src, tmp_path / f"{ftype}.gguf", ftype)
        for name, _, shape in model.tensors():
            types = menu(name, shape)
            if theirs[name] == base:
                kept[name].add(base)
            elif types:
                assert theirs[name] in types, (ftype, name, shape, theirs[name])
            else:
                assert theirs[name] in (Q.F32, Q.F16), name  # not quantized: the source type
    for name, _, shape in model.tensors():
        types = set(menu(name, shape))
        assert types - {Q.F16} <= kept[name], (name, shape)
        if shape[-1] % 256:
            assert kept[name] <= types, (name, shape)


@pytest.mark.parametrize("model", ["odd_llama", "tiny_qwen2", "tiny_llama"])
def test_llama_cpp_runs_every_menu_type(request, model, tmp_path):
    """Files where each tensor takes, in turn, every type on its menu (tied embeddings too, on tiny-qwen2): llama.cpp
    loads them and computes finite logits."""
    llama_cpp = pytest.importorskip("llama_cpp")
    m = SourceModel(str(request.getfixturevalue(model)))
    recipe = plan_tensors(m, "Q4_K_M")
    for shift in range(len(menu("blk.0.ffn_up.weight", (1, 256)))):
        plan = [TensorPlan(t.name, t.shape, types[(i + shift) % len(types)]) if (types := menu(t.name, t.shape)) else t
                for i, t in enumerate(recipe)]
        out = tmp_path / f"{shift}.gguf"
        write_gguf(out, m, "Q4_K_M", plan, rtn_encoder(), Progress(quiet=True))
        llm = llama_cpp.Llama(str(out), n_ctx=32, logits_all=True, verbose=False, n_threads=1)
        llm.eval([1, 5, 9, 13, 17, 21, 25, 29])
        assert np.isfinite(np.array(llm.scores[:8])).all(), shift
        llm.close()
        out.unlink()
