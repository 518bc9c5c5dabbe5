"""Calibration windows sampled from the model itself (`--calib self`): no data, no licence, no network, and text from
the distribution the model will be used on.

Each window starts at BOS and is sampled token by token, batched with a KV cache on the build's device, at
temperature 1 with min-p 0.05 (Nguyen et al. 2024: only tokens at least 5 % as likely as the most likely one): the
model's own distribution without its long tail of unlikely tokens, which at temperature 1 would derail a window every
few hundred tokens, and without top-p's sort of the vocabulary at every step.  The end-of-text token is never
sampled in plain windows (a window is one document).  A model with a chat template gets CHAT_SHARE of its windows as
conversations: they start with the template's opening of a user turn, the model writes the question and (after its
end-of-turn token, allowed there) the answer, and whatever turns follow.

Deterministic per seed: one generator per batch, seeded from (seed, batch index), and batch sizes that depend on the
model's shape only, not on free memory.  The whole model is loaded on the device; `fits` says whether it can be.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from .errors import UserError
from .model import SourceModel
from .tokens import ReferenceTokenizer

TEMPERATURE = 1.0
MIN_P = 0.05
CHAT_SHARE = 0.25
KV_BUDGET = 4 << 30  # bytes of KV cache per batch on the CPU: batch sizes follow the model's shape, so builds repeat
MAX_BATCH = 256  # decoding is matrix-vector work per window: the more windows per step, the closer to GEMM speed


def param_bytes(m: SourceModel, dtype: torch.dtype) -> int:
    return m.n_params * dtype.itemsize


def kv_bytes_per_token(m: SourceModel, dtype: torch.dtype) -> int:
    hp = m.hp
    return 2 * hp.n_layers * hp.n_head_kv * (hp.n_embd // hp.n_head) * dtype.itemsize


def batch_size(m: SourceModel, n: int, length: int, device: torch.device) -> int:
    """Windows sampled at once.  On a GPU as many as half the memory left beside the weights holds (each step reads
    all the weights: an 8B's 16 GB for 16 windows or for 128); on the CPU KV_BUDGET's worth (an eighth of the host's
    memory at most)."""
    dtype = gen_dtype(device)
    if device.type == "cuda":
        budget = max(KV_BUDGET, (available_memory(device) - param_bytes(m, dtype)) // 2)
    else:  # the host's total memory, not what is free now: the same batches on every run
        budget = min(KV_BUDGET, os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 8)
    return max(1, min(n, MAX_BATCH, budget // (length * kv_bytes_per_token(m, dtype))))


def gen_dtype(device: torch.device) -> torch.dtype:
    # bf16 on a GPU (the checkpoints' own precision); float32 on the CPU, where bf16 matmuls may pick kernels that the
    # CPU cannot run (AMX advertised but faulting) and builds must reproduce bit for bit
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not every OS reports available pages
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def fits(m: SourceModel, n: int, length: int, device: torch.device) -> tuple[bool, str]:
    """Whether the whole model and the KV cache of a few windows fit in 80 % of the device's available memory, and
    why not."""
    dtype = gen_dtype(device)
    need = param_bytes(m, dtype) + min(n, 8) * length * kv_bytes_per_token(m, dtype)
    have = int(0.8 * available_memory(device))
    if need > have:
        return False, (f"sampling from the model needs {need / 2**30:.1f} GiB on {device.type}, "
                       f"{have / 2**30:.1f} GiB are available")
    return True, ""


def load_model(m: SourceModel, device: torch.device, dtype: torch.dtype):
    """The whole HF model on `device` in `dtype`, weights from the checkpoint (the layer pass's skeleton)."""
    from .layerwise import set_buffers, skeleton

    model = skeleton(m, device).to(dtype)
    # transformers' own SDPA: it reads grouped key/value heads as they are, where the layer pass's attention would
    # copy the whole preallocated cache into repeated heads at every step (unless the adapter says SDPA cannot
    # compute the model: Gemma 2's soft-capped attention stays eager)
    if m.arch.attention == "sdpa":
        model.config._attn_implementation = "sdpa"
    layout = m.arch.layout
    rotary = {path: model.get_submodule(path) for path in layout.rotary}  # computed at init, on the device:
    for path in rotary:  # to_empty would drop their buffers
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, None)
    model.to_empty(device=device)
    for path, module in rotary.items():
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, module)
    set_buffers(model, m.arch, m.hp, device)
    if m.hp.tied_embeddings:
        model.get_submodule(layout.head).weight = model.get_submodule(layout.embed).weight
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(m.param(name))  # experts fused as transformers holds them
    return model


def document_start(tok: ReferenceTokenizer) -> int:
    """The token a document follows: BOS, or for tokenizers without one (Qwen, GPT-2 style) their end-of-text
    separator, which is what precedes a document in their training data."""
    start = tok.bos_id if tok.bos_id is not None else tok.token_id("<|endoftext|>")
    start = start if start is not None else tok.eos_id
    if start is None:
        raise UserError(f"{tok.dir}: the tokenizer has neither a BOS nor an end-of-text token to start sampling from")
    return start


def chat_prompt(tok: ReferenceTokenizer) -> list[int] | None:
    """Token ids opening a user turn in the model's chat template (system prompt included where the template adds
    one), starting with BOS; None without a template."""
    marker = "\x00edgequant\x00"
    text = tok.render_chat([{"role": "user", "content": marker}])
    if text is None or marker not in text:
        return None
    ids = tok.encode(text[: text.index(marker)], add_bos=False, special=True)
    if tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
        ids = [tok.bos_id] + ids
    return ids


def next_token(logits: torch.Tensor, gen: torch.Generator, banned: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row, drawn at temperature TEMPERATURE from the tokens at least MIN_P times as likely as the most
    likely one; `banned`, a boolean mask broadcast against the logits, takes tokens out first.  Drawn by inverting the
    cumulative sum with one uniform number per row: no sort, no multinomial and no random number per token (each took
    a tenth to a third of a step on the CPU), and nothing that waits for the device (a boolean index would)."""
    logits = logits.float() / TEMPERATURE
    if banned is not None:
        logits = logits.masked_fill(banned, -torch.inf)
    p = torch.softmax(logits, -1)
    p = p.masked_fill(p < MIN_P * p.amax(-1, keepdim=True), 0)
    c = p.cumsum(-1)
    u = (1 - torch.rand(len(p), 1, device=p.device, generator=gen)) * c[:, -1:]  # in (0, Σp]
    return torch.searchsorted(c, u).squeeze(-1).clamp_(max=p.shape[-1] - 1)


def kv_cache(n_layers: int, length: int):
    """A KV cache that holds `length` positions in place: transformers' DynamicCache copies the whole cache at every
    step (quadratic in the window), its StaticCache makes every step attend to all `length` positions (and the
    layer pass's attention repeat them per head); this one writes each step into preallocated storage and hands the
    attention a view of the positions filled so far."""
    from transformers.cache_utils import Cache, DynamicLayer

    class Preallocated(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self.k = key_states.new_empty(*key_states.shape[:2], length, key_states.shape[3])
                self.v = value_states.new_empty(*value_states.shape[:2], length, value_states.shape[3])
                self.filled = 0
            end = self.filled + key_states.shape[-2]
            self.k[:, :, self.filled : end] = key_states
            self.v[:, :, self.filled : end] = value_states
            self.filled = end
            self.keys, self.values = self.k[:, :, :end], self.v[:, :, :end]
            return self.keys, self.values

    return Cache(layers=[Preallocated() for _ in range(n_layers)])


@torch.no_grad()
def generate(model, prompts: list[list[int]], banned: list[list[int]], length: int, batch: int, seed: int,
             device: torch.device, progress=None) -> torch.Tensor:
    """(len(prompts), length) token ids: row r continues prompts[r] without ever sampling a token of banned[r],
    `batch` rows at a time.  Rows with different prompts share a batch: every row is fed one token per step, its
    prompt's while it lasts, then what it sampled, so plain and chat windows decode in the same steps."""
    import inspect

    # transformers 5 renamed the forward's past_key_values to cache
    cache_arg = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    n, vocab = len(prompts), model.get_output_embeddings().weight.shape[0]
    P = max(map(len, prompts))
    forced = torch.tensor([p + [0] * (P - len(p)) for p in prompts], device=device)
    is_forced = torch.tensor([[t < len(p) for t in range(P)] for p in prompts], device=device)
    ban = torch.zeros(n, vocab, dtype=torch.bool, device=device)
    for r, b in enumerate(banned):
        ban[r, b] = True
    out = torch.empty(n, length, dtype=torch.int64)
    task = progress.add_task(f"sampling {n} windows", total=n * (length - 1)) if progress is not None else None
    with decoding_attention(device):
        for k, b in enumerate(range(0, n, batch)):
            rows = slice(b, min(b + batch, n))
            gen = torch.Generator(device=device).manual_seed(int(np.random.SeedSequence([seed, k]).generate_state(1)[0]))
            cache = kv_cache(model.config.num_hidden_layers, length)
            tokens = [forced[rows, 0]]
            finite = torch.ones((), dtype=torch.bool, device=device)
            for t in range(1, length):
                logits = model(tokens[-1][:, None], **{cache_arg: cache}, use_cache=True, logits_to_keep=1).logits[:, -1]
                finite &= torch.isfinite(logits).all()  # checked once per batch: per step, it would wait for the device
                sampled = next_token(logits, gen, ban[rows])
                tokens.append(torch.where(is_forced[rows, t], forced[rows, t], sampled) if t < P else sampled)
                if task is not None:
                    progress.advance(task, len(tokens[-1]))
            if not bool(finite):
                raise UserError("NaN or Inf in the model's output while sampling calibration text: the weights overflow")
            out[rows] = torch.stack(tokens, 1).cpu()
            del cache
    if task is not None:
        progress.remove_task(task)
    return out


def decoding_attention(device: torch.device):
    """SDPA backends for decoding: on CUDA any but cuDNN's, which builds an execution plan for every new key length,
    so at every step, and that took longer than the step itself (docs/BENCHMARKS.md, scripts/bench_sampling.py)."""
    import contextlib

    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def self_windows(m: SourceModel, n: int, length: int, seed: int, device: torch.device, progress=None) -> tuple[torch.Tensor, dict]:
    """(n, length) windows sampled from the model, CHAT_SHARE of them as conversations when it has a chat template;
    and a record of what was done, for the build's summary."""
    if length < 2:
        raise UserError(f"need windows of at least 2 tokens to sample (got {length})")
    ok, why = fits(m, n, length, device)
    if not ok:
        raise UserError(f"--calib self: {why}; calibrate on text instead (--calib FILE)")
    t0 = time.perf_counter()
    tok = ReferenceTokenizer(m.dir)
    dtype = gen_dtype(device)
    model = load_model(m, device, dtype)
    start = document_start(tok)
    chat = chat_prompt(tok)
    n_chat = round(n * CHAT_SHARE) if chat is not None and len(chat) < length // 2 else 0
    batch = batch_size(m, n, length, device)
    ends = sorted({*tok.eos_ids, start} - {tok.bos_id})
    prompts = [[start]] * (n - n_chat) + [chat] * n_chat
    ids = generate(model, prompts, [ends] * (n - n_chat) + [[]] * n_chat, length, batch, seed, device, progress)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    record = {"source": "self", "windows": n, "chat_windows": n_chat, "seqlen": length, "seconds": time.perf_counter() - t0,
              "sampling": f"temperature {TEMPERATURE:g}, min-p {MIN_P:g}", "dtype": str(dtype).removeprefix("torch.")}
    return ids, record
