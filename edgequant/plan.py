"""The first stage of a build: every tensor's type from llama.cpp's recipe for the target ftype (convert.recipes)."""

from __future__ import annotations

from .convert.codecs import CODECS, codec
from .convert.encode import FLOAT_TYPES
from .convert.gguf_out import TensorPlan
from .convert.recipes import FTYPES, ArchFacts, requires_imatrix, tensor_type
from .errors import UserError
from .model import SourceModel, layer_of


def parse_target(target: str) -> str:
    name = target.upper()
    if name not in FTYPES:
        raise UserError(f"unknown --target {target!r}; choose one of: {', '.join(FTYPES)}")
    return name


def plan_tensors(m: SourceModel, ftype: str, has_imatrix: bool = False) -> list[TensorPlan]:
    facts = ArchFacts(n_head=m.hp.n_head, n_head_kv=m.hp.n_head_kv, has_output=not m.hp.tied_embeddings,
                      n_expert=m.n_expert, name=m.arch.name)
    return [
        TensorPlan(t.gguf_name, t.shape, tensor_type(t.gguf_name, layer_of(t.gguf_name), m.hp.n_layers, ftype, t.shape, facts, has_imatrix=has_imatrix))
        for t in m.tensors.values()
    ]


def calibrates(method: str, plan: list[TensorPlan]) -> bool:
    """Whether `method` needs calibration for `plan`: not for rtn, nor when every tensor stays a float type."""
    return method != "rtn" and any(t.qtype not in FLOAT_TYPES for t in plan)


def check_plan(plan: list[TensorPlan], ftype: str, method: str) -> None:
    """A UserError, before anything heavy, where `method` cannot write `plan`: a type without a codec yet; a type
    llama.cpp writes only with an importance matrix, under --method rtn (llama-quantize refuses it the same way); a
    codebook type vector GPTQ cannot write yet, under --method gptq."""
    missing = sorted({t.qtype.name for t in plan if t.qtype not in FLOAT_TYPES and t.qtype not in CODECS})
    if missing:
        raise UserError(f"--target {ftype}: its {', '.join(missing)} tensors are not implemented yet; "
                        f"edgequant writes {', '.join(t.name for t in CODECS if t.name != 'Q8_K')}")
    lattice = {t.qtype.name for t in plan if t.qtype in CODECS and not codec(t.qtype).scalar_grid}
    if method == "gptq" and lattice:
        from .gptq.vector import LATTICES  # the codebook types vector GPTQ can write (imports torch: only here)

        lattice = sorted(lattice - set(LATTICES))
        if lattice:
            raise UserError(f"--method gptq --target {ftype}: GPTQ cannot quantize onto the {', '.join(lattice)} "
                            f"codebook yet: use --method imatrix (with --imatrix FILE or --calib SOURCE)")
    if method == "rtn":
        need = [t for t in plan if requires_imatrix(t.name, t.qtype, ftype)]
        if need:
            raise UserError(f"--target {ftype}: {need[0].name} (and {len(need) - 1} more) is {need[0].qtype.name}, "
                            f"which llama.cpp writes only with an importance matrix: use --method imatrix and pass --imatrix "
                            f"FILE or --calib SOURCE")
