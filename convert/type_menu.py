"""Which GGML types a size-budgeted build may give one tensor: `menu(name, shape)`, as a pure function.

A type is on a tensor's menu when llama.cpp can load and run the tensor in it and edgequant can encode it:

- llama.cpp quantizes only what `recipes.is_quantizable` accepts (llama-quant.cpp, tensor_allows_quantization:
  2-D and larger weights, not norms or MoE routers).  The rest (norms, biases) keep the recipe's type and are not
  allocated: their menu is empty.
- A row (GGUF ne[0], the last numpy dim: the input dimension) must be a whole number of blocks.  The GGUF loader
  refuses any other tensor (ggml/src/gguf.cpp, gguf_init_from_reader: "not a multiple of block size"), and
  llama-quantize demotes such a type to one whose block fits, else to F16 (llama-quant.cpp, tensor_type_fallback).
  So rows of whole 256-blocks get the K-quants and IQ4_XS, rows of whole 32-blocks only the 32-block types, and
  other rows F16 alone.
- No type is kept from token_embd or a tied output: llama.cpp keeps the input layer on the CPU (llama-model.cpp,
  load_tensors: "always keep it on the CPU"), whose get_rows takes every quantized type and F16 (ggml-cpu/ops.cpp,
  ggml_compute_forward_get_rows), and the CPU's mul_mat (a tied token_embd is also the output projection) takes every
  type here too; on a GPU the loader falls back to a buffer whose device supports the op (llama-model-loader.cpp,
  select_weight_buft).
- None needs an importance matrix: llama.cpp requires one only for the 1- to 3-bit IQ types, and for Q2_K only in a
  Q2_K_S file (llama-quant.cpp, tensor_requires_imatrix), none of which is on a menu.

F16 is on every menu so that budgets between the Q8_0 and the F16 file can be spent.  Each menu is ordered by
bytes per weight (ties in the order listed below), smallest first.
"""

from __future__ import annotations

import gguf

from .codecs import CODECS
from .recipes import is_quantizable

Q = gguf.GGMLQuantizationType

_ROWS_OF_256 = (Q.Q2_K, Q.Q3_K, Q.IQ4_XS, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0, Q.F16)
_ROWS_OF_32 = (Q.IQ4_NL, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.F16)
_ANY_ROWS = (Q.F16,)
_FLOATS = frozenset({Q.F16})  # encoded by gguf-py (convert.encode), not by a block codec


def bytes_per_weight(qtype: Q) -> float:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return size / block


def _menu(types: tuple[Q, ...]) -> tuple[Q, ...]:
    """`types` that edgequant can encode, smallest first (sorted is stable: ties keep the listed order)."""
    return tuple(sorted((t for t in types if t in CODECS or t in _FLOATS), key=bytes_per_weight))


_MENUS = {256: _menu(_ROWS_OF_256), 32: _menu(_ROWS_OF_32), 1: _menu(_ANY_ROWS)}


def menu(name: str, shape: tuple[int, ...]) -> tuple[Q, ...]:
    """The types tensor `name` (numpy `shape`, rows last) may be stored in, smallest first; () when it is not
    quantized at all (norms, biases, 1-D tensors: they keep the recipe's type)."""
    if not is_quantizable(name, shape):
        return ()
    return next(types for block, types in _MENUS.items() if shape[-1] % block == 0)
