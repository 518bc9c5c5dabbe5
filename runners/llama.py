"""llama.cpp through llama-cpp-python: open a GGUF quietly, decode token windows, describe the build.

llama.cpp logs every load step to stderr. We route its log into a small ring buffer instead, so commands stay
quiet and a failed load can still quote llama.cpp's own reason in the one-line UserError.
"""

from __future__ import annotations

import collections
import ctypes
import os
import pathlib
from dataclasses import dataclass

import gguf
import llama_cpp
import llama_cpp.llama  # installs llama-cpp-python's own log callback; ours below replaces it
import numpy as np

from edgequant.convert.gguf_in import open_gguf
from edgequant.errors import UserError

_LOG_TAIL: collections.deque[str] = collections.deque(maxlen=64)
_LOG_ERROR = 4  # ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5


@llama_cpp.llama_log_callback
def _keep_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if level == _LOG_ERROR:
        _LOG_TAIL.append(text.decode("utf-8", "replace").strip())


llama_cpp.llama_log_set(_keep_log, ctypes.c_void_p(0))


def default_threads() -> int:
    """All CPUs this process may run on (llama.cpp's own default counts physical cores)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class Backend:
    """What the installed llama.cpp can run on."""

    gpu_offload: bool
    devices: tuple[str, ...]  # "NAME: description" per ggml backend device, CPU included

    def __str__(self) -> str:
        return ", ".join(self.devices) + ("" if self.gpu_offload else " (no GPU offload in this build)")


def backend() -> Backend:
    lib_dir = pathlib.Path(llama_cpp.__file__).parent / "lib"
    ggml = next((ctypes.CDLL(str(p)) for p in sorted(lib_dir.glob("*ggml.*"))), None)
    devices: list[str] = []
    if ggml is not None:  # libggml sits next to libllama in every llama-cpp-python wheel we know of
        ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
        ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
        ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
        for fn in (ggml.ggml_backend_dev_name, ggml.ggml_backend_dev_description):
            fn.restype, fn.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
        for i in range(ggml.ggml_backend_dev_count()):
            dev = ggml.ggml_backend_dev_get(i)
            name, desc = ggml.ggml_backend_dev_name(dev).decode(), ggml.ggml_backend_dev_description(dev).decode()
            devices.append(f"{name}: {desc}")
    return Backend(gpu_offload=bool(llama_cpp.llama_supports_gpu_offload()), devices=tuple(devices))


def open_gguf_header(path: str | os.PathLike) -> gguf.GGUFReader:
    """Check that `path` is a readable, complete GGUF (bounds-checked header, see convert.gguf_in); return its reader."""
    return open_gguf(pathlib.Path(path))


def tensor_type_bytes(reader: gguf.GGUFReader) -> dict[str, int]:
    """Bytes of tensor data per ggml type, largest first."""
    sizes: collections.Counter[str] = collections.Counter()
    for t in reader.tensors:
        sizes[t.tensor_type.name] += int(t.n_bytes)
    return dict(sizes.most_common())


def _field(reader: gguf.GGUFReader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def context_length(reader: gguf.GGUFReader) -> int:
    """The training context the GGUF declares (0 when absent)."""
    arch = _field(reader, "general.architecture")
    return int(_field(reader, f"{arch}.context_length") or 0)


class _Batch:
    """A llama_batch for one sequence, with numpy views on its arrays so a window is filled without a Python loop."""

    def __init__(self, capacity: int):
        self.raw = llama_cpp.llama_batch_init(capacity, 0, 1)
        self.capacity = capacity
        view = lambda ptr: np.ctypeslib.as_array(ptr, shape=(capacity,))  # noqa: E731
        self.token, self.pos, self.n_seq_id, self.logits = (
            view(self.raw.token), view(self.raw.pos), view(self.raw.n_seq_id), view(self.raw.logits))
        for i in range(capacity):
            self.raw.seq_id[i][0] = 0
        self.n_seq_id[:] = 1

    def fill(self, tokens: np.ndarray, start_pos: int, outputs_from: int) -> None:
        """Tokens at positions start_pos.., asking for logits of tokens[outputs_from:]."""
        n = len(tokens)
        self.token[:n] = tokens
        self.pos[:n] = np.arange(start_pos, start_pos + n)
        self.logits[:n] = 0
        self.logits[outputs_from:n] = 1
        self.raw.n_tokens = n

    def free(self) -> None:
        if self.raw is not None:
            llama_cpp.llama_batch_free(self.raw)
            self.raw = None


class LlamaCppModel:
    """One GGUF opened in llama.cpp, with a context of n_ctx tokens decoded n_batch at a time.

    Flash attention is on: llama.cpp's tools (llama-perplexity, llama-bench, llama-cli) default to "auto", which turns
    it on wherever the backend has the kernel; llama-cpp-python only offers on/off. The attention numerics differ
    slightly with it (PPL by ~4e-4 relative on the tiny test model), so matching the tools means matching this.
    """

    def __init__(self, path: str | os.PathLike, *, n_ctx: int = 512, n_batch: int | None = None,
                 n_threads: int | None = None, n_gpu_layers: int = -1, seed: int = 0):
        self.path = pathlib.Path(path)
        self.header = open_gguf_header(self.path)
        n_threads = n_threads or default_threads()
        n_batch = min(n_batch or n_ctx, n_ctx)
        _LOG_TAIL.clear()
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(self.path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=n_threads,
                n_threads_batch=n_threads, n_gpu_layers=n_gpu_layers, seed=seed, flash_attn=True, logits_all=False,
                verbose=False)
        except ValueError:
            reason = next((line for line in _LOG_TAIL if line), "llama.cpp gave no reason")  # the first says most
            raise UserError(f"{self.path}: llama.cpp cannot load it: {reason}") from None
        self.n_ctx, self.n_batch, self.n_threads = n_ctx, n_batch, n_threads
        self.n_vocab = self.llm.n_vocab()
        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        self.bos = int(llama_cpp.llama_vocab_bos(vocab))
        self._batch = _Batch(n_batch)

    # -- description -------------------------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        return self.llm.metadata.get("tokenizer.chat_template")

    def describe(self) -> dict:
        """Path, sizes and types, for reports and --json."""
        buf = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self.llm.model, buf, len(buf))
        n_params = int(llama_cpp.llama_model_n_params(self.llm.model))
        tensor_bytes = int(llama_cpp.llama_model_size(self.llm.model))
        return {
            "path": str(self.path),
            "file_bytes": self.path.stat().st_size,
            "desc": buf.value.decode(),
            "n_params": n_params,
            "bits_per_weight": round(8 * tensor_bytes / n_params, 4),
            "tensor_types": tensor_type_bytes(self.header),
        }

    # -- decoding ----------------------------------------------------------------------------------------------------

    def tokenize(self, text: bytes) -> np.ndarray:
        """llama.cpp's tokenization of `text`, BOS first when the vocab adds one (special tokens not parsed)."""
        return np.asarray(self.llm.tokenize(text, add_bos=True, special=False), dtype=np.int32)

    def clear(self) -> None:
        """Forget the KV cache."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.llm.ctx), True)

    def decode(self, tokens: np.ndarray, start_pos: int, outputs_from: int) -> np.ndarray:
        """Decode `tokens` (at most n_batch) after start_pos cached ones.

        Returns the float32 logits [n, V] of tokens[outputs_from:], a view of llama.cpp's buffer valid until the next
        decode."""
        if len(tokens) > self._batch.capacity:
            raise ValueError(f"{len(tokens)} tokens exceed the batch of {self._batch.capacity}")
        outputs_from = min(outputs_from, len(tokens))
        self._batch.fill(tokens, start_pos, outputs_from)
        rc = llama_cpp.llama_decode(self.llm.ctx, self._batch.raw)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} ({self.path.name})")
        n_out = len(tokens) - outputs_from
        if n_out == 0:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.llm.ctx), shape=(n_out, self.n_vocab))

    def window_logits(self, window: np.ndarray, first: int) -> np.ndarray:
        """Logits at positions first .. len(window)-2 of a fresh window: the perplexity.WindowLogits contract."""
        self.clear()
        out = []
        for start in range(0, len(window), self.n_batch):
            part = window[start:start + self.n_batch]
            logits = self.decode(part, start, max(first - start, 0))
            out.append(logits.copy())
        return np.concatenate(out)[:-1]

    def close(self) -> None:
        self._batch.free()
        self.llm.close()

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
