"""Write a Hugging Face LLaMA checkpoint with random weights: Llama-3.1-8B's exact shapes, or a tiny model built the
same way.  No download: the configs are written out below, the tokenizer is tests/fixtures/tiny-llama's.

    python scripts/make_synthetic_model.py OUT_DIR [--config llama-3.1-8b|tiny] [--device cuda|cpu] [--seed N]

What is random and how (one torch.Generator on --device, seeded once, tensors drawn in file order, rows in fixed
chunks; the same seed on the same device type gives the same files):

    | tensor                                        | values                                    |
    |-----------------------------------------------|-------------------------------------------|
    | every matrix (embeddings, q/k/v/o, MLP, head) | normal, std = config's initializer_range  |
    | RMSNorm weights                               | ones                                      |

The 8B uses std 0.02 (Llama's initializer_range, also about the scale of trained weights); tiny uses 0.02·√(4096/512),
the same gain per matrix (std·√fan_in), so that its activations evolve like the 8B's.  Measured on 256 random token
ids (fp32, CPU): through the 8B shape's 32 layers the residual stream's RMS goes 0.02 (embeddings) -> 2.50 (after
layer 0) -> 7.5 (8) -> 10.4 (16) -> 12.6 (24) -> 14.25 (32); each layer changes it by 18-100 % of its RMS, tokens stay
distinct (mean cosine between positions 0.03), every value finite; the logits have std 1.28 and entropy 10.9 nats
(uniform: 11.76).  The tiny shape stretched to 32 layers: RMS 14.0, mean cosine 0.03.  (At std 0.02 the tiny model's
positions blur together: mean cosine 0.86.)

The tokenizer is the fixture's 512-piece SentencePiece model, so the token ids of any text are < 512 and only those
embedding rows are ever read; edgequant pads the GGUF token list with [PADn] entries up to vocab_size.  bos/eos ids in
config.json are the tokenizer's (1, 2), not Llama 3's 128000/128001, so that BOS is a real token.

Output is streamed: safetensors shards of --shard-layers decoder layers (the embeddings join the first shard, the final
norm and lm_head the last), each tensor drawn on the device in chunks of rows, cast to bf16 and written straight to
its place in the file, so host memory holds one chunk at a time whatever the model size.  model.safetensors.index.json
maps every tensor to its shard, as transformers writes it.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tests" / "fixtures" / "tiny-llama"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")
CHUNK = 2**25  # values drawn per call: 128 MiB of float32 on the device, 64 MiB of bf16 on the host

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
COMMON = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "attention_bias": False,
    "attention_dropout": 0.0, "mlp_bias": False, "max_position_embeddings": 131072,
    "pretraining_tp": 1, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "bos_token_id": 1, "eos_token_id": 2,
}
CONFIGS = {
    # meta-llama/Llama-3.1-8B's config.json, but for the token ids (see above)
    "llama-3.1-8b": {**COMMON, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256, "initializer_range": 0.02},
    # same structure (head_dim 128, 4 query heads per KV head, FFN 3.5x hidden, llama3 rope, untied, vocab larger than
    # the tokenizer), dimensions that are still multiples of 256 so the K-quants apply everywhere
    # the 8B's gain per matrix (std·√fan_in), so activations evolve as in the 8B
    "tiny": {**COMMON, "hidden_size": 512, "intermediate_size": 1792, "num_attention_heads": 4,
             "num_key_value_heads": 1, "num_hidden_layers": 4, "vocab_size": 1000,
             "initializer_range": 0.02 * math.sqrt(4096 / 512)},
}


def tensor_shapes(c: dict) -> dict[int | str, list[tuple[str, tuple[int, ...]]]]:
    """HF tensor names and shapes, grouped: "embed", each layer index, "head"."""
    d, f, hd = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    groups: dict[int | str, list] = {"embed": [("model.embed_tokens.weight", (c["vocab_size"], d))]}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        groups[i] = [(p + "input_layernorm.weight", (d,)),
                     (p + "self_attn.q_proj.weight", (d, d)), (p + "self_attn.k_proj.weight", (kv, d)),
                     (p + "self_attn.v_proj.weight", (kv, d)), (p + "self_attn.o_proj.weight", (d, d)),
                     (p + "post_attention_layernorm.weight", (d,)),
                     (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)),
                     (p + "mlp.down_proj.weight", (d, f))]
    groups["head"] = [("model.norm.weight", (d,)), ("lm_head.weight", (c["vocab_size"], d))]
    return groups


def shard_plan(c: dict, shard_layers: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    groups = tensor_shapes(c)
    n = c["num_hidden_layers"]
    shards = [[t for i in range(s, min(s + shard_layers, n)) for t in groups[i]] for s in range(0, n, shard_layers)]
    shards[0][:0] = groups["embed"]
    shards[-1] += groups["head"]
    return shards


def safetensors_header(tensors: list[tuple[str, tuple[int, ...]]]) -> bytes:
    """The header of a bf16 safetensors file holding `tensors` in this order: 8-byte length, JSON, padded to 8."""
    meta, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = 2 * numel(shape)
        meta[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def write_tensor(f, name: str, shape: tuple[int, ...], std: float, gen: torch.Generator, device: torch.device) -> None:
    """Draw one tensor (norm weights: ones) in chunks of whole rows and append its bf16 bytes to f."""
    if name.endswith("norm.weight"):
        f.write(torch.ones(shape, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes())
        return
    rows, cols = shape
    step = max(1, CHUNK // cols)
    for r in range(0, rows, step):
        x = torch.randn(min(step, rows - r), cols, generator=gen, device=device).mul_(std).to(torch.bfloat16)
        f.write(x.cpu().view(torch.uint8).numpy().data)


def make(out: Path, config: str = "tiny", device: str = "cpu", seed: int = 0, layers: int | None = None,
         shard_layers: int = 4, log=print) -> dict:
    """Write the checkpoint into `out` (created); returns its config."""
    c = dict(CONFIGS[config])
    if layers is not None:
        c["num_hidden_layers"] = layers
    dev = torch.device(device)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(c, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": c["bos_token_id"], "eos_token_id": c["eos_token_id"]}, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER / name, out / name)
    shards = shard_plan(c, shard_layers)
    weight_map, total = {}, 0
    for k, tensors in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        t0 = time.perf_counter()
        with open(out / fname, "wb") as f:
            f.write(safetensors_header(tensors))
            for name, shape in tensors:
                write_tensor(f, name, shape, c["initializer_range"], gen, dev)
                weight_map[name] = fname
        nbytes = sum(2 * numel(s) for _, s in tensors)
        total += nbytes
        dt = time.perf_counter() - t0
        log(f"[{time.strftime('%H:%M:%S')}] {fname}: {len(tensors)} tensors, {nbytes / 2**30:.2f} GiB in {dt:.1f}s "
            f"({nbytes / 2**30 / max(dt, 1e-9):.2f} GiB/s)")
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return c


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="output directory (created)")
    p.add_argument("--config", choices=sorted(CONFIGS), default="llama-3.1-8b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where weights are drawn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, help="override num_hidden_layers (same shapes, fewer layers)")
    p.add_argument("--shard-layers", type=int, default=4, help="decoder layers per safetensors shard (default 4)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    c = make(a.out, a.config, a.device, a.seed, a.layers, a.shard_layers, log=lambda s: print(s, file=sys.stderr, flush=True))
    n = sum(numel(s) for g in tensor_shapes(c).values() for _, s in g)
    print(json.dumps({"out": str(a.out), "config": a.config, "layers": c["num_hidden_layers"], "params": n,
                      "bytes": 2 * n, "seconds": round(time.perf_counter() - t0, 2), "device": a.device}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
