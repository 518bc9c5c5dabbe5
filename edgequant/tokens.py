"""The model's reference tokenizer, which llama.cpp's tokenization of our GGUF must equal.

SentencePiece models are tokenized by `sentencepiece` itself, byte-level BPE by the `tokenizers` library on
tokenizer.json (not transformers' converted tokenizers: transformers 5's Llama tokenizer drops SentencePiece's dummy
prefix on text starting with a space, so it disagrees with sentencepiece and llama.cpp on such lines).
"""

from __future__ import annotations

import json
import re
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
        self.eos_ids = self._eos_ids()
        self.eos_id = self.eos_ids[0] if self.eos_ids else None

    def encode(self, text: str, add_bos: bool | None = None, special: bool = False) -> list[int]:
        """special: the text's special-token strings ("<|im_start|>", "<s>") become those tokens, as in a rendered
        chat template (byte-level BPE always does this; SentencePiece would spell them out)."""
        if special and self.sp is not None:
            ids = []
            for k, piece in enumerate(self._special_split().split(text)):  # odd pieces: the special strings
                sid = self.token_id(piece) if k % 2 else None
                ids += [sid] if sid is not None else self.sp.EncodeAsIds(piece) if piece else []
        else:
            ids = self.sp.EncodeAsIds(text) if self.sp is not None else self.tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def chat_template(self) -> str | None:
        """The model's default chat template (tokenizer_config.json, or chat_template.jinja beside it), or None."""
        t = self._config().get("chat_template")
        if isinstance(t, list):  # named templates: the default one
            t = next((e.get("template") for e in t if e.get("name") == "default"), None)
        if t is None and (self.dir / "chat_template.jinja").is_file():
            t = (self.dir / "chat_template.jinja").read_text(encoding="utf-8")
        return t if isinstance(t, str) and t.strip() else None

    def render_chat(self, messages: list[dict]) -> str | None:
        """messages through the chat template, as transformers renders them (None without a template)."""
        template = self.chat_template()
        if template is None:
            return None
        from transformers.utils.chat_template_utils import render_jinja_template

        cfg = self._config()
        tokens = {k: v.get("content") if isinstance(v, dict) else v for k in ("bos_token", "eos_token") if (v := cfg.get(k))}
        try:
            rendered, _ = render_jinja_template(conversations=[messages], chat_template=template, **tokens)
        except Exception as e:  # a template's own raise_exception, or jinja's errors
            raise UserError(f"{self.dir}: the chat template failed on a conversation ({type(e).__name__}: {e})") from None
        return rendered[0]

    def _config(self) -> dict:
        path = self.dir / "tokenizer_config.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def _bpe_bos(self) -> int | None:
        bos = self._config().get("bos_token")
        bos = bos.get("content") if isinstance(bos, dict) else bos
        return self.tok.token_to_id(bos) if bos else None

    def _specials(self) -> list[str]:
        cfg = self._config()
        named = [cfg.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")]
        added = [e.get("content") for e in cfg.get("added_tokens_decoder", {}).values()]
        return sorted({t.get("content") if isinstance(t, dict) else t for t in named + added if t}, key=len, reverse=True)

    def _special_split(self) -> re.Pattern:
        specials = self._specials()
        return re.compile("(" + "|".join(map(re.escape, specials)) + ")" if specials else "(?!)")

    def token_id(self, token) -> int | None:
        """The id of a token given by its string (or a tokenizer_config entry), None if the vocabulary lacks it."""
        token = token.get("content") if isinstance(token, dict) else token
        if not token:
            return None
        if self.sp is not None:
            i = self.sp.PieceToId(token)
            return None if i == self.sp.unk_id() and token != self.sp.IdToPiece(i) else i
        return self.tok.token_to_id(token)

    def _eos_ids(self) -> list[int]:
        """End-of-text tokens: the tokenizer's eos, and the ids config.json/generation_config.json stop on."""
        ids = [self.token_id(self._config().get("eos_token"))]
        if self.sp is not None and self.sp.eos_id() >= 0:
            ids.append(self.sp.eos_id())
        for name in ("generation_config.json", "config.json"):
            path = self.dir / name
            e = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id") if path.is_file() else None
            ids += e if isinstance(e, list) else [e]
        return list(dict.fromkeys(i for i in ids if isinstance(i, int) and i >= 0))

    def _add_bos_default(self) -> bool:
        cfg = self._config()
        return bool(cfg.get("add_bos_token", self.sp is not None)) and self.bos_id is not None
