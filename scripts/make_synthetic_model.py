"""Write a Hugging Face checkpoint with random weights in the exact shapes of a published model (Llama-3.1-8B,
Mixtral-8x7B-v0.1, Qwen3-30B-A3B), or a tiny model built the same way.  No download: the configs are written out
below; the tokenizer is a test fixture's (tiny-llama's SentencePiece; tiny-qwen3-moe's byte-level BPE for Qwen3-MoE,
whose real tokenizer is BPE too).

    python scripts/make_synthetic_model.py OUT_DIR [--config NAME] [--device cuda|cpu] [--seed N] [--layers N]
    NAME: llama-3.1-8b, mixtral-8x7b, qwen3-30b-a3b, or tiny, tiny-mixtral, tiny-qwen3-moe

What is random and how (one torch.Generator on --device, seeded once, tensors drawn in file order, rows in fixed
chunks; the same seed on the same device type gives the same files):

    | tensor                                                  | values                                    |
    |---------------------------------------------------------|-------------------------------------------|
    | every matrix (embeddings, q/k/v/o, MLP, experts, head)  | normal, std = config's initializer_range  |
    | MoE routers (Mixtral block_sparse_moe.gate, Qwen3 mlp.gate) | normal, the same std                  |
    | RMSNorm weights                                         | ones                                      |
    | Qwen3-MoE's QK-norm weights (self_attn.q_norm, k_norm)  | QK_NORM (4)                               |

The 8B uses std 0.02 (Llama's initializer_range, also about the scale of trained weights); tiny uses 0.02·√(4096/512),
the same gain per matrix (std·√fan_in), so that its activations evolve like the 8B's.  Measured on 256 random token
ids (fp32, CPU): through the 8B shape's 32 layers the residual stream's RMS goes 0.02 (embeddings) -> 2.50 (after
layer 0) -> 7.5 (8) -> 10.4 (16) -> 12.6 (24) -> 14.25 (32); each layer changes it by 18-100 % of its RMS, tokens stay
distinct (mean cosine between positions 0.03), every value finite; the logits have std 1.28 and entropy 10.9 nats
(uniform: 11.76).  The tiny shape stretched to 32 layers: RMS 14.0, mean cosine 0.03.  (At std 0.02 the tiny model's
positions blur together: mean cosine 0.86.)

The mixtures of experts use their configs' initializer_range, 0.02, and their tiny versions the same gain per matrix
(0.02·√(hidden/tiny hidden)).  The router's logits for a token are then normal with std 0.02·√hidden·RMS(its normed
input) ≈ 0.9 (Qwen3, hidden 2048) and 1.28 (Mixtral, 4096): distinct tokens pick distinct experts, so the load
spreads over all of them, as long as positions stay distinct.  QK-norm makes that depend on its weights: it sets
every query's and key's RMS to its weight, so with ones the attention logits have std ~1, each position averages its
whole prefix, neighbouring positions' residual streams converge and route alike.  Measured on the tiny Qwen3-MoE
(2 windows of 2048 random token ids, fp32, CPU; the largest expert's tokens / the mean, mean cosine between the
router inputs of 512 positions): with ones 5.3x (layer 0) and 7.2x (layer 1, 11 of 128 experts get no token,
cosine 0.34); with 2, 1.8x, 1.9x, then 2.6x ... 3.8x by layer 5 (cosine 0.11 and rising); with 4, 1.6x-2.0x through
6 layers, cosine <= 0.012, no expert below 0.4x the mean.  Hence QK_NORM = 4 (trained Qwen3 models learn QK-norm
weights well above 1, too).  At Qwen3-30B-A3B's own shapes (2 layers, bf16, one window of 2048 random ids): 1.54x and
1.65x, the least-used expert 0.68x and 0.59x the mean, cosine 0.003 and 0.006.  The tiny Mixtral (no QK-norm, attention logits std ~1.6): 2.1x and 1.6x, cosine 0.09,
0.02.

The tokenizer's token ids are < 512 (SentencePiece) or < 640 (BPE), so only those embedding rows are ever read;
edgequant pads the GGUF token list with [PADn] entries up to vocab_size.  bos/eos ids in config.json are the
tokenizer's (SentencePiece 1, 2; BPE 605 <|endoftext|>, 607 <|im_end|>, the roles of Qwen3's 151643/151645), not the
published models', so that they are real tokens.

Output is streamed: safetensors shards of --shard-layers decoder layers (the embeddings join the first shard, the final
norm and lm_head the last), each tensor drawn on the device in chunks of rows, cast to bf16 and written straight to
its place in the file, so host memory holds one chunk at a time whatever the model size.  model.safetensors.index.json
maps every tensor to its shard, as transformers writes it.  Experts are written in the Hub's per-expert layout (one
2-D tensor per expert and projection), as Mixtral-8x7B-v0.1 and Qwen3-30B-A3B are published.
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
FIXTURES = ROOT / "tests" / "fixtures"
# tokenizer kind -> (fixture, its files)
TOKENIZERS = {"spm": (FIXTURES / "tiny-llama", ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")),
              "bpe": (FIXTURES / "tiny-qwen3-moe", ("tokenizer.json", "tokenizer_config.json"))}
QK_NORM = 4.0  # Qwen3-MoE's q_norm/k_norm weights: peaked attention, distinct positions, routing spread (above)
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

# mistralai/Mixtral-8x7B-v0.1's config.json, but for the token ids (see above)
MIXTRAL = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_act": "silu",
           "attention_dropout": 0.0, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
           "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
           "output_router_logits": False, "router_aux_loss_coef": 0.02, "bos_token_id": 1, "eos_token_id": 2,
           "num_local_experts": 8, "num_experts_per_tok": 2}
CONFIGS["mixtral-8x7b"] = {**MIXTRAL, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                           "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 32000,
                           "initializer_range": 0.02}
# same structure (8 experts, 2 per token, 4 query heads per KV head, expert FFN 3.5x hidden rounded to 256s), the
# full model's gain per matrix
CONFIGS["tiny-mixtral"] = {**MIXTRAL, "hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 4,
                           "num_key_value_heads": 1, "num_hidden_layers": 2, "vocab_size": 1000,
                           "initializer_range": 0.02 * math.sqrt(4096 / 256)}
# Qwen/Qwen3-30B-A3B's config.json, but for the token ids (see above)
QWEN3_MOE = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_act": "silu",
             "attention_bias": False, "attention_dropout": 0.0, "decoder_sparse_step": 1, "mlp_only_layers": [],
             "max_position_embeddings": 40960, "norm_topk_prob": True, "output_router_logits": False,
             "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": 1e6, "router_aux_loss_coef": 0.001,
             "sliding_window": None, "use_sliding_window": False, "tie_word_embeddings": False,
             "torch_dtype": "bfloat16", "use_cache": True, "bos_token_id": 605, "eos_token_id": 607,
             "tokenizer": "bpe", "num_experts": 128, "num_experts_per_tok": 8}
CONFIGS["qwen3-30b-a3b"] = {**QWEN3_MOE, "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
                            "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                            "num_hidden_layers": 48, "max_window_layers": 48, "vocab_size": 151936,
                            "initializer_range": 0.02}
# same structure (128 experts, 8 per token, query width 2x hidden, 8 query heads per KV head, QK-norm), dimensions
# that are multiples of 256 (the expert FFN is 768 = 3/8 hidden in the full model; 256 here, the least a K-quant row
# takes), the full model's gain per matrix
CONFIGS["tiny-qwen3-moe"] = {**QWEN3_MOE, "hidden_size": 256, "intermediate_size": 768, "moe_intermediate_size": 256,
                             "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 64,
                             "num_hidden_layers": 2, "max_window_layers": 2, "vocab_size": 1000,
                             "initializer_range": 0.02 * math.sqrt(2048 / 256)}


def tensor_shapes(c: dict) -> dict[int | str, list[tuple[str, tuple[int, ...]]]]:
    """HF tensor names and shapes, grouped: "embed", each layer index, "head"; in the order transformers'
    save_pretrained writes a layer (its modules' order), experts in the Hub's per-expert layout."""
    d, hd = c["hidden_size"], c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    groups: dict[int | str, list] = {"embed": [("model.embed_tokens.weight", (c["vocab_size"], d))]}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        attn = [(p + "self_attn.q_proj.weight", (q, d)), (p + "self_attn.k_proj.weight", (kv, d)),
                (p + "self_attn.v_proj.weight", (kv, d)), (p + "self_attn.o_proj.weight", (d, q))]
        if c["model_type"] == "qwen3_moe":
            attn += [(p + "self_attn.q_norm.weight", (hd,)), (p + "self_attn.k_norm.weight", (hd,))]
        groups[i] = [(p + "input_layernorm.weight", (d,)), *attn, (p + "post_attention_layernorm.weight", (d,)),
                     *ffn_shapes(c, p)]
    groups["head"] = [("model.norm.weight", (d,)), ("lm_head.weight", (c["vocab_size"], d))]
    return groups


def ffn_shapes(c: dict, p: str) -> list[tuple[str, tuple[int, ...]]]:
    d = c["hidden_size"]
    if c["model_type"] == "mixtral":  # Hub names: block_sparse_moe, w1 gate, w3 up, w2 down
        f, n = c["intermediate_size"], c["num_local_experts"]
        out = [(p + "block_sparse_moe.gate.weight", (n, d))]
        for e in range(n):
            x = f"{p}block_sparse_moe.experts.{e}."
            out += [(x + "w1.weight", (f, d)), (x + "w2.weight", (d, f)), (x + "w3.weight", (f, d))]
        return out
    if c["model_type"] == "qwen3_moe":
        f, n = c["moe_intermediate_size"], c["num_experts"]
        out = [(p + "mlp.gate.weight", (n, d))]
        for e in range(n):
            x = f"{p}mlp.experts.{e}."
            out += [(x + "gate_proj.weight", (f, d)), (x + "up_proj.weight", (f, d)), (x + "down_proj.weight", (d, f))]
        return out
    f = c["intermediate_size"]
    return [(p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)), (p + "mlp.down_proj.weight", (d, f))]


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
        value = QK_NORM if name.endswith(("q_norm.weight", "k_norm.weight")) else 1.0
        f.write(torch.full(shape, value, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes())
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
    tokenizer, files = TOKENIZERS[c.pop("tokenizer", "spm")]
    if layers is not None:
        c["num_hidden_layers"] = layers
        if "max_window_layers" in c:
            c["max_window_layers"] = layers
    dev = torch.device(device)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(c, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": c["bos_token_id"], "eos_token_id": c["eos_token_id"]}, indent=2) + "\n")
    for name in files:
        shutil.copyfile(tokenizer / name, out / name)
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
