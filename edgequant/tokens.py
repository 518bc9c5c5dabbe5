"""The model's reference tokenizer, which llama.cpp's tokenization of our GGUF must equal.

SentencePiece models are tokenized by `sentencepiece` itself, byte-level BPE by the `tokenizers` library on
tokenizer.json (not transformers' converted tokenizers: transformers 5's Llama tokenizer drops SentencePiece's dummy
prefix on text starting with a space, so it disagrees with sentencepiece and llama.cpp on such lines).
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError


class ReferenceTokenizer:
    def __init__(self, model_dir: Path):
        self.dir = model_dir
        if (model_dir / "tokenizer.model").is_file():
            from sentencepiece import SentencePieceProcessor

            self.sp = SentencePieceProcessor()
            try:
                self.sp.LoadFromFile(str(model_dir / "tokenizer.model"))
            except (OSError, RuntimeError) as e:
                raise UserError(f"{model_dir / 'tokenizer.model'}: unreadable SentencePiece model ({e})") from None
            self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        else:
            from tokenizers import Tokenizer

            self.sp = None
            try:
                self.tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
            except Exception as e:  # tokenizers raises its own Exception types
                raise UserError(f"{model_dir / 'tokenizer.json'}: unreadable ({e})") from None
            self.bos_id = self._bpe_bos()
        self.add_bos = self._add_bos_default()

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.sp.EncodeAsIds(text) if self.sp is not None else self.tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def _config(self) -> dict:
        path = self.dir / "tokenizer_config.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def _bpe_bos(self) -> int | None:
        bos = self._config().get("bos_token")
        bos = bos.get("content") if isinstance(bos, dict) else bos
        return self.tok.token_to_id(bos) if bos else None

    def _add_bos_default(self) -> bool:
        cfg = self._config()
        return bool(cfg.get("add_bos_token", self.sp is not None)) and self.bos_id is not None
