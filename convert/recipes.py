"""Which GGML type each tensor gets for a llama.cpp file type ("recipe"), as a pure function.

`tensor_type` reproduces the choice `llama-quantize in.gguf out.gguf <FTYPE>` makes per tensor
(llama.cpp src/llama-quant.cpp: the default type of the ftype, the per-role bumps, the output/embedding
rule and the fallback for rows that do not split into whole blocks), so that a GGUF we write at a
given --target mixes types exactly like llama.cpp's own file of that name.

Layer positions: llama.cpp walks tensors sorted by block number and counts attn_v-like and ffn_down
tensors as it goes; its "is this one of the first/last layers" tests use those running counters.
With exactly one such tensor per block (every dense model) the counter equals the block index, so
here the caller passes `layer` (the N of `blk.N.`) and `n_layers` (the block count) directly.

Reproduced for dense Llama/Mistral/Qwen2/Qwen3 GGUFs, plus the cheap model-wide bumps (the
"70B" attn_v bump, the 8-expert attention bumps), every i-quant recipe (IQ1_S ... IQ4_XS) and Q2_K_S.
The 1- and 2-bit ones (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ2_M) take a branch of their own in llama.cpp:
their attn_v/attn_k/ffn_down/attn_output rules, without the 70B and 8-expert bumps of the others.
Not reproduced: TQ*/MXFP4, Falcon-specific branches, --pure, --tensor-type/--output-tensor-type/
--token-embedding-type overrides and --leave-output-tensor.

`requires_imatrix` is llama.cpp's list of the tensors it refuses to quantize without an importance matrix (the
1- to 3-bit lattice types, and Q2_K inside a Q2_K_S file).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import gguf

from .errors import UserError

Q = gguf.GGMLQuantizationType
_FT = gguf.LlamaFileType


@dataclass(frozen=True)
class ArchFacts:
    """The model facts the recipes look at."""

    n_head: int
    n_head_kv: int
    has_output: bool = True  # False when token_embd doubles as the output projection (tied embeddings)
    n_expert: int = 0
    name: str = "llama"  # GGUF general.architecture

    @property
    def gqa(self) -> int:
        """Query heads per KV head, integer-divided as llama.cpp does (0 without KV heads)."""
        return self.n_head // self.n_head_kv if self.n_head_kv else 0


@dataclass(frozen=True)
class _Spot:
    """Where a per-block tensor sits: what a rule may depend on."""

    layer: int
    n_layers: int
    arch: ArchFacts
    has_imatrix: bool


# A rule gives the role's type for one tensor, or None to keep the recipe's default type.
_Rule = Callable[[_Spot], "Q | None"]


def _more_bits(s: _Spot) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the blocks, and every third one between."""
    i, n = s.layer, s.n_layers
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _below(fraction: int) -> Callable[[_Spot], bool]:
    """True for the first n_layers // fraction blocks."""
    return lambda s: s.layer < s.n_layers // fraction


def _first(count: int) -> Callable[[_Spot], bool]:
    """True for the first `count` blocks."""
    return lambda s: s.layer < count


def _gqa_at_least(k: int) -> Callable[[_Spot], bool]:
    return lambda s: s.arch.gqa >= k


def _with_imatrix_below(fraction: int) -> Callable[[_Spot], bool]:
    return lambda s: s.has_imatrix and s.layer < s.n_layers // fraction


def _without_imatrix_below(fraction: int) -> Callable[[_Spot], bool]:
    return lambda s: not s.has_imatrix and s.layer < s.n_layers // fraction


def _without_imatrix() -> Callable[[_Spot], bool]:
    return lambda s: not s.has_imatrix


def _middle() -> Callable[[_Spot], bool]:
    """Neither the first nor the last eighth of the blocks."""
    return lambda s: s.n_layers // 8 <= s.layer < 7 * s.n_layers // 8


def _gqa_or_experts_at_least(k: int) -> Callable[[_Spot], bool]:
    return lambda s: s.arch.gqa >= k or s.arch.n_expert >= k


def _experts(k: int) -> Callable[[_Spot], bool]:
    return lambda s: s.arch.n_expert == k


def _pick(test: Callable[[_Spot], bool], then: Q, otherwise: Q | None = None) -> _Rule:
    return lambda s: then if test(s) else otherwise


def _always(qtype: Q) -> _Rule:
    return lambda s: qtype


def _first_of(*rules: _Rule) -> _Rule:
    """The first rule that chooses a type."""
    return lambda s: next((t for t in (r(s) for r in rules) if t is not None), None)


@dataclass(frozen=True)
class _Recipe:
    file_type: gguf.LlamaFileType  # written to general.file_type
    base: Q  # what every quantizable tensor gets unless a rule says otherwise
    rules: Mapping[str, _Rule] = field(default_factory=dict)  # role -> rule
    output: Q = Q.Q6_K  # the output projection (and a tied token_embd) whose rows are whole `base` blocks
    token_embd: Q | None = None  # an untied token_embd, if not `base`
    low_bit: bool = False  # llama.cpp's 1-/2-bit i-quant branch: no 70B or generic 8-expert bumps


def _low_bit(file_type: gguf.LlamaFileType, base: Q, bump: Q, embd: Q, attn_output: Q | None) -> _Recipe:
    """llama.cpp's branch for IQ1_S/IQ1_M/IQ2_XXS/IQ2_XS/IQ2_S/IQ2_M: attn_v to Q4_K with 4+ query heads per KV
    head or 4+ experts, else `bump`; the first eighth of ffn_down to `bump`; attn_output to Q5_K with 8 experts,
    else `attn_output` (None: the base); attn_k to Q4_K with 8 experts; output Q5_K, token_embd `embd`."""
    return _Recipe(file_type, base, {
        "attn_v": _pick(_gqa_or_experts_at_least(4), Q.Q4_K, bump),
        "attn_k": _pick(_experts(8), Q.Q4_K),
        "ffn_down": _pick(_below(8), bump),
        "attn_output": _pick(_experts(8), Q.Q5_K, attn_output),
    }, output=Q.Q5_K, token_embd=embd, low_bit=True)


# Roles with rules: "attn_v" (also fused attn_qkv and MLA attn_kv_b: llama.cpp routes them through its
# attn_v branch first, so its separate attn_qkv branch never fires), "ffn_down", "attn_output"; attn_q, attn_k,
# ffn_gate and ffn_up only move in the 1- to 3-bit i-quant recipes.
_RECIPES: dict[str, _Recipe] = {
    "F32": _Recipe(_FT.ALL_F32, Q.F32),
    "F16": _Recipe(_FT.MOSTLY_F16, Q.F16),
    "BF16": _Recipe(_FT.MOSTLY_BF16, Q.BF16),
    "Q8_0": _Recipe(_FT.MOSTLY_Q8_0, Q.Q8_0),
    # With an imatrix, the first eighth of ffn_down goes to the 1-variant (guards early-layer outliers).
    "Q4_0": _Recipe(_FT.MOSTLY_Q4_0, Q.Q4_0, {"ffn_down": _pick(_with_imatrix_below(8), Q.Q4_1)}),
    "Q4_1": _Recipe(_FT.MOSTLY_Q4_1, Q.Q4_1),
    "Q5_0": _Recipe(_FT.MOSTLY_Q5_0, Q.Q5_0, {"ffn_down": _pick(_with_imatrix_below(8), Q.Q5_1)}),
    "Q5_1": _Recipe(_FT.MOSTLY_Q5_1, Q.Q5_1),
    "Q2_K": _Recipe(_FT.MOSTLY_Q2_K, Q.Q2_K, {
        "attn_v": _pick(_gqa_at_least(4), Q.Q4_K, Q.Q3_K),
        "ffn_down": _always(Q.Q3_K),
        "attn_output": _always(Q.Q3_K),
    }),
    "Q3_K_S": _Recipe(_FT.MOSTLY_Q3_K_S, Q.Q3_K),
    "Q3_K_M": _Recipe(_FT.MOSTLY_Q3_K_M, Q.Q3_K, {
        "attn_v": _pick(_first(2), Q.Q5_K, Q.Q4_K),
        "ffn_down": _pick(_below(16), Q.Q5_K, Q.Q4_K),
        "attn_output": _always(Q.Q4_K),
    }),
    "Q3_K_L": _Recipe(_FT.MOSTLY_Q3_K_L, Q.Q3_K, {
        "attn_v": _always(Q.Q5_K),
        "ffn_down": _always(Q.Q5_K),
        "attn_output": _always(Q.Q5_K),
    }),
    "Q4_K_S": _Recipe(_FT.MOSTLY_Q4_K_S, Q.Q4_K, {
        "attn_v": _pick(_first(4), Q.Q5_K),
        "ffn_down": _pick(_below(8), Q.Q5_K),
    }),
    "Q4_K_M": _Recipe(_FT.MOSTLY_Q4_K_M, Q.Q4_K, {
        "attn_v": _pick(_more_bits, Q.Q6_K),
        "ffn_down": _pick(_more_bits, Q.Q6_K),
    }),
    "Q5_K_S": _Recipe(_FT.MOSTLY_Q5_K_S, Q.Q5_K),
    "Q5_K_M": _Recipe(_FT.MOSTLY_Q5_K_M, Q.Q5_K, {
        "attn_v": _pick(_more_bits, Q.Q6_K),
        "ffn_down": _pick(_more_bits, Q.Q6_K),
    }),
    "Q6_K": _Recipe(_FT.MOSTLY_Q6_K, Q.Q6_K),
    # The non-uniform 4-bit types: attn_v to Q5_K when 4+ query heads share a KV head, and the first eighth of
    # ffn_down to Q5_K only without an imatrix (the opposite condition of Q4_0/Q5_0's bump).
    "IQ4_NL": _Recipe(_FT.MOSTLY_IQ4_NL, Q.IQ4_NL, {
        "attn_v": _pick(_gqa_at_least(4), Q.Q5_K),
        "ffn_down": _pick(_without_imatrix_below(8), Q.Q5_K),
    }),
    "IQ4_XS": _Recipe(_FT.MOSTLY_IQ4_XS, Q.IQ4_XS, {
        "attn_v": _pick(_gqa_at_least(4), Q.Q5_K),
        "ffn_down": _pick(_without_imatrix_below(8), Q.Q5_K),
    }),
    # Q2_K with an imatrix required (llama.cpp): attn_v to Q4_K with gqa >= 4, the first eighth of ffn_down to Q4_K.
    "Q2_K_S": _Recipe(_FT.MOSTLY_Q2_K_S, Q.Q2_K, {
        "attn_v": _pick(_gqa_at_least(4), Q.Q4_K),
        "ffn_down": _pick(_below(8), Q.Q4_K),
    }),
    # The 3-bit lattice types.  IQ3_XXS: attention q/k down to IQ2_S, attn_output up to IQ3_S; without an imatrix
    # (llama.cpp then refuses the IQ2_S tensors anyway) attn_v to IQ3_S and ffn_down to Q4_K/Q3_K.
    "IQ3_XXS": _Recipe(_FT.MOSTLY_IQ3_XXS, Q.IQ3_XXS, {
        "attn_v": _first_of(_pick(_gqa_at_least(4), Q.Q4_K), _pick(_without_imatrix(), Q.IQ3_S)),
        "attn_k": _always(Q.IQ2_S),
        "attn_q": _always(Q.IQ2_S),
        "ffn_down": _first_of(_pick(_without_imatrix_below(8), Q.Q4_K), _pick(_without_imatrix(), Q.Q3_K)),
        "attn_output": _always(Q.IQ3_S),
    }, output=Q.Q5_K, token_embd=Q.IQ3_S),
    # IQ3_XS: IQ3_S, with attention q/k and the middle blocks' ffn_gate/ffn_up at IQ3_XXS.
    "IQ3_XS": _Recipe(_FT.MOSTLY_IQ3_XS, Q.IQ3_S, {
        "attn_v": _pick(_gqa_at_least(4), Q.Q4_K),
        "attn_k": _always(Q.IQ3_XXS),
        "attn_q": _always(Q.IQ3_XXS),
        "ffn_gate": _pick(_middle(), Q.IQ3_XXS),
        "ffn_up": _pick(_middle(), Q.IQ3_XXS),
    }),
    "IQ3_S": _Recipe(_FT.MOSTLY_IQ3_S, Q.IQ3_S, {
        "attn_v": _pick(_gqa_at_least(4), Q.Q4_K),
    }),
    # IQ3_M: IQ3_S with attn_v, attn_output and the first eighth of ffn_down (with 8 experts also use_more_bits'
    # blocks) at Q4_K.
    "IQ3_M": _Recipe(_FT.MOSTLY_IQ3_M, Q.IQ3_S, {
        "attn_v": _always(Q.Q4_K),
        "ffn_down": _pick(lambda s: _below(8)(s) or (s.arch.n_expert == 8 and _more_bits(s)), Q.Q4_K),
        "attn_output": _always(Q.Q4_K),
    }),
    # The 1- and 2-bit ones (note IQ2_S's base is IQ2_XS, IQ2_M's IQ2_S).
    "IQ2_XXS": _low_bit(_FT.MOSTLY_IQ2_XXS, Q.IQ2_XXS, Q.Q2_K, Q.Q2_K, None),
    "IQ2_XS": _low_bit(_FT.MOSTLY_IQ2_XS, Q.IQ2_XS, Q.Q2_K, Q.Q2_K, None),
    "IQ2_S": _low_bit(_FT.MOSTLY_IQ2_S, Q.IQ2_XS, Q.IQ3_S, Q.IQ3_S, Q.IQ3_S),
    "IQ2_M": _low_bit(_FT.MOSTLY_IQ2_M, Q.IQ2_S, Q.IQ3_S, Q.IQ3_S, Q.IQ3_S),
    "IQ1_S": _low_bit(_FT.MOSTLY_IQ1_S, Q.IQ1_S, Q.Q2_K, Q.Q2_K, Q.IQ2_XXS),
    "IQ1_M": _low_bit(_FT.MOSTLY_IQ1_M, Q.IQ1_M, Q.Q2_K, Q.Q2_K, Q.IQ2_XXS),
}

#: --target names -> the GGUF general.file_type value llama-quantize writes for them.
FTYPES: Mapping[str, gguf.LlamaFileType] = MappingProxyType({k: r.file_type for k, r in _RECIPES.items()})

_UNQUANTIZED = frozenset({Q.F32, Q.F16, Q.BF16})

# With 8 experts, these ftypes put attn_output at Q5_K (and attn_v/attn_k always go to Q8_0).
_EIGHT_EXPERT_Q5K_ATTN_OUTPUT = frozenset({"Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "IQ4_NL", "IQ4_XS",
                                           "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M"})

# Where a type whose block does not divide a row goes instead (then F16 if that does not fit either).
_SMALLER_BLOCK = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0, Q.IQ4_XS: Q.IQ4_NL,
                  Q.IQ3_S: Q.IQ4_NL, Q.IQ3_XXS: Q.IQ4_NL, Q.IQ2_S: Q.IQ4_NL, Q.IQ2_XS: Q.IQ4_NL, Q.IQ2_XXS: Q.IQ4_NL,
                  Q.IQ1_M: Q.IQ4_NL, Q.IQ1_S: Q.IQ4_NL}

# The types llama.cpp will not write without an importance matrix (besides token_embd and output), and Q2_K in
# a Q2_K_S file.
_NEED_IMATRIX = frozenset({Q.IQ3_XXS, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ1_M, Q.IQ1_S})

# Substring -> role, first match wins (llama.cpp's tensor categories, reduced to the roles used here).
_ROLE_BY_SUBSTRING = (
    ("attn_qkv.weight", "attn_v"),
    ("attn_kv_b.weight", "attn_v"),
    ("attn_v.weight", "attn_v"),
    ("attn_k.weight", "attn_k"),
    ("attn_q.weight", "attn_q"),
    ("attn_output.weight", "attn_output"),
    ("ffn_up", "ffn_up"),
    ("ffn_gate", "ffn_gate"),
    ("ffn_down", "ffn_down"),
)
_EMBEDDING_NAMES = frozenset({"token_embd.weight", "per_layer_token_embd.weight"})


def _role(name: str) -> str:
    """The recipe role of a GGUF tensor name: "output", "token_embd", a _ROLE_BY_SUBSTRING role, or "other"."""
    if name == "output.weight":
        return "output"
    if name in _EMBEDDING_NAMES:
        return "token_embd"
    return next((role for part, role in _ROLE_BY_SUBSTRING if part in name), "other")


def tensor_type(
    name: str,
    layer: int | None,
    n_layers: int,
    ftype: str,
    shape: tuple[int, ...],
    arch: ArchFacts,
    *,
    has_imatrix: bool = False,
) -> Q:
    """The GGML type llama-quantize gives tensor `name` (numpy `shape`) in a file of type `ftype`.

    `layer` is the block index of a `blk.N.` tensor (None for others), `n_layers` the block count.
    `has_imatrix` matters only for the first eighth of ffn_down (Q4_0/Q5_0/IQ4_NL/IQ4_XS) and for IQ3_XXS's
    attn_v and ffn_down. Tensors llama.cpp never
    quantizes (norms, biases, 1-D, MoE routers) come back F32: the type our converter stores them in
    (llama.cpp keeps their source type).
    """
    recipe = _recipe(ftype)
    if not is_quantizable(name, shape):
        return Q.F32
    if recipe.base in _UNQUANTIZED:
        return recipe.base
    ncols = shape[-1]
    role = _role(name)
    if role == "output" or (role == "token_embd" and not arch.has_output):
        chosen = _output_type(recipe, ncols)
    elif role == "token_embd":
        chosen = recipe.token_embd or recipe.base
    else:
        chosen = _block_tensor_type(role, ftype, recipe, layer, n_layers, arch, has_imatrix, name)
    return _fit_rows(chosen, ncols)


def _recipe(ftype: str) -> _Recipe:
    try:
        return _RECIPES[ftype]
    except KeyError:
        raise UserError(f"unknown target type {ftype!r}; choose one of: {', '.join(_RECIPES)}") from None


def is_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """llama.cpp quantizes only weights with >= 2 non-trivial dims (ggml_n_dims), except norms and routers."""
    leading_ones = next((i for i, n in enumerate(shape) if n > 1), len(shape))
    n_dims = max(1, len(shape) - leading_ones)
    return (
        n_dims >= 2
        and name.endswith("weight")
        and "_norm.weight" not in name
        and "ffn_gate_inp.weight" not in name
    )


def _output_type(recipe: _Recipe, ncols: int) -> Q:
    """The output projection (and a tied token_embd): the recipe's (Q6_K; Q5_K for the 1- to 2-bit i-quants and
    IQ3_XXS), or Q8_0 for Q8_0 files and rows that are not whole blocks of the file's type."""
    if recipe.base == Q.Q8_0 or ncols % _block(recipe.base):
        return Q.Q8_0
    return recipe.output


def _block_tensor_type(
    role: str, ftype: str, recipe: _Recipe, layer: int | None, n_layers: int,
    arch: ArchFacts, has_imatrix: bool, name: str,
) -> Q:
    rule = recipe.rules.get(role)
    chosen = None
    if rule is not None:
        if layer is None:
            raise ValueError(f"{name}: the {ftype} rule for {role} needs the block index")
        chosen = rule(_Spot(layer, n_layers, arch, has_imatrix))
    if chosen is None:
        chosen = recipe.base
    if recipe.low_bit:  # llama.cpp's 1-/2-bit branch ends here: its 8-expert rules are in its recipes
        return chosen
    if role == "attn_v" and _is_70b(arch, n_layers) and chosen in (Q.Q3_K, Q.Q4_K):
        chosen = Q.Q5_K  # 8 query heads share each V head: more bits are nearly free
    if arch.n_expert == 8:
        if role in ("attn_v", "attn_k"):
            chosen = Q.Q8_0
        elif role == "attn_output":
            chosen = Q.Q5_K if ftype in _EIGHT_EXPERT_Q5K_ATTN_OUTPUT else recipe.base
    return chosen


def requires_imatrix(name: str, qtype: Q, ftype: str) -> bool:
    """Whether llama-quantize refuses to write tensor `name` as `qtype` in an `ftype` file without an importance
    matrix ("this quantization requires an imatrix!"): the 1- to 3-bit lattice types, and Q2_K in Q2_K_S files;
    never token_embd or output."""
    if name == "output.weight" or name in _EMBEDDING_NAMES:
        return False
    return qtype in _NEED_IMATRIX or (qtype == Q.Q2_K and ftype == "Q2_K_S")


def _is_70b(arch: ArchFacts, n_layers: int) -> bool:
    """llama.cpp's LLM_TYPE_70B for the architectures handled here (Llama-2/3 70B, Qwen2-72B)."""
    if n_layers != 80:
        return False
    return arch.name == "qwen2" or (arch.name == "llama" and arch.n_head != arch.n_head_kv)


def _block(qtype: Q) -> int:
    return gguf.GGML_QUANT_SIZES[qtype][0]


def _fit_rows(qtype: Q, ncols: int) -> Q:
    """Fall back to a smaller-block type when a row (ncols = GGUF ne[0]) is not a whole number of blocks."""
    if ncols % _block(qtype) == 0:
        return qtype
    fallback = _SMALLER_BLOCK.get(qtype, qtype)
    return fallback if ncols % _block(fallback) == 0 else Q.F16
