"""Build the tiny trained models the test suite ships in tests/fixtures/.

Everything is generated here, deterministically, so the fixtures carry no third-party text or weights:

    tests/fixtures/text/{train,eval}.txt   English-like text from a small probabilistic grammar (WikiText-like lines)
    tests/fixtures/tiny-llama/             LlamaForCausalLM + Llama-2-style SentencePiece BPE (byte fallback)
    tests/fixtures/tiny-qwen2/             Qwen2ForCausalLM + Qwen2-style byte-level BPE (tokenizers library)
    tests/fixtures/tiny-phi3/              Phi3ForCausalLM (fused qkv/gate_up, partial LongRoPE) + Phi-3's
                                           Llama-2-style SentencePiece with its added chat tokens
    tests/fixtures/tiny-phi4-mini/         Phi3ForCausalLM in Phi-4-mini's shape (tied, partial LongRoPE 4k -> 128k) +
                                           byte-level BPE with o200k's split and Phi-4-mini's chat and tool tokens
    tests/fixtures/tiny-gemma2/            Gemma2ForCausalLM + Gemma-style SentencePiece (no dummy prefix)
    tests/fixtures/tiny-gemma3/            Gemma3ForCausalLM (text) + the same tokenizer
    tests/fixtures/tiny-gemma3-vl/         Gemma3ForConditionalGeneration: tiny-gemma3 as the text tower of a
                                           vision-language checkpoint (a small SigLIP tower and projector)
    tests/fixtures/tiny-qwen3-moe/         Qwen3MoeForCausalLM, experts in transformers 5's fused layout + tiny-qwen2's
                                           byte-level BPE
    tests/fixtures/tiny-mixtral/           MixtralForCausalLM, one tensor per expert as published Mixtral checkpoints
                                           (block_sparse_moe.experts.E.w1/w2/w3) + tiny-llama's SentencePiece

The two models deliberately differ where converters tend to break:

    | property              | tiny-llama                       | tiny-qwen2                          |
    |-----------------------|----------------------------------|-------------------------------------|
    | hidden / FFN          | 256 / 512 (all dims % 256 == 0)  | 320 / 512 (hidden % 256 != 0)       |
    | heads x head_dim, KV  | 8 x 64 (q dim 512 != hidden), 4  | 5 x 64, 1 KV head                   |
    | q/k/v bias            | no                               | yes                                 |
    | embeddings            | untied                           | tied                                |
    | vocab                 | 512 = tokenizer size             | 640 > 608 tokenizer entries (padded)|
    | tokenizer             | SentencePiece BPE, BOS added     | byte-level BPE, no BOS, ChatML      |
    | RoPE theta            | 500000, classic top-level key    | 1e6, in `rope_parameters` (HF v5)   |

tiny-phi3 has Phi-3's config shape where converters break: fused qkv_proj (q 256 + k/v 2 x 128 rows: GQA as Phi-3-medium
and Phi-4-mini) and gate_up_proj (2 x 512 rows), Phi-4-mini's partial rotary (3/4 of each head) with Phi-3-128k's
LongRoPE (short/long factor lists, 8192 positions over an original 2048), a sliding window, no BOS added, and the
chat tokens after the SentencePiece vocabulary with the embedding padded past them (as Phi-3's 32064).

tiny-phi4-mini is Phi-4-mini-instruct where it parts from Phi-3: GPT-4o's tokenizer (byte-level BPE, the o200k split
regex exactly as its tokenizer.json has it, llama.cpp's pre-tokenizer "gpt-4o"; <|endoftext|> as BOS, EOS, padding and
unknown token, then <|endofprompt|>, the chat and tool tokens; tokenizer_class GPT2Tokenizer, which llama.cpp's
converter reads to take the BPE path), tied embeddings, 3:1 GQA (6 heads of 32 over 2 KV heads), 3/4 of each head
rotated, LongRoPE from 4096 to 131072 positions (attention factor 1.19), a sliding_window larger than any context, the
embedding padded past the tokenizer (640 > 617, as 200064 > 200029), and its Hub config layout and extra keys.

tiny-gemma2 and tiny-gemma3 have their families' layer structure (norms before and after attention and the FFN,
GELU-tanh, embeddings scaled by sqrt(hidden) and tied, head_dim given in the config) with a 32-token sliding
window, so that a 128-token test window crosses it: Gemma 2 alternates sliding and global layers and soft-caps
attention scores and final logits (at 10 and 15 rather than 50 and 30, so that the caps bite in a tiny model);
Gemma 3 has six layers (five sliding, one global, its local layers on their own rope base), QK-norm, hidden 288,
not a multiple of 256 (as Gemma-3-1B's 1152: 32-wide fallback types), and q 128 wide (2 heads of 64).  Their
SentencePiece follows Gemma's: no dummy prefix, <pad>/<eos>/<bos>/<unk> as ids 0-3, the chat turn markers as
user-defined pieces.

tiny-qwen3-moe has Qwen3-MoE's layer: QK-norm, a softmax router over 6 experts of which each token takes the top 2,
renormalised (norm_topk_prob), SwiGLU experts of 256 (moe_intermediate_size) beside an unused dense
intermediate_size, stored fused as transformers 5 holds them (mlp.experts.gate_up_proj (E, 2·256, d), down_proj);
tiny-mixtral has Mixtral's: LLaMA attention (GQA 8/2), 8 experts top-2, stored one tensor per expert under Mixtral's
published names.  8 experts is also the count llama.cpp's recipes bump attention types for; 6 is not.

Each model is trained for a few hundred AdamW steps on 128-token windows of train.txt (CPU, single thread, fixed
seeds), saved in bf16, and its train/eval loss written to TRAINING.txt. Run from the repository root:

    python scripts/make_fixtures.py            # about two CPU-minutes (training runs on one thread)
    python scripts/make_fixtures.py phi3       # only the named fixtures (llama, qwen2, phi3, phi4_mini, gemma2,
                                               # gemma3, gemma3_vl, qwen3_moe, mixtral)

tiny-gemma3-vl is how Gemma 3's 4B/12B/27B are published: Gemma3ForConditionalGeneration, a config whose text_config
holds only what differs from Gemma3TextConfig's defaults (here: everything tiny, plus gemma-3-4b's linear rope
scaling of the global layers, factor 8), and the Hub's original tensor names (language_model.model.*,
vision_tower.vision_model.*, multi_modal_projector.*).  Its text weights are tiny-gemma3's (made first), the vision
tower's random: only the text tower is converted, as llama.cpp's converter does (the vision part is its mmproj file).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

import sentencepiece as spm  # noqa: E402
import torch  # noqa: E402
from tokenizers import (  # noqa: E402
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (  # noqa: E402
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
    PreTrainedTokenizerFast,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaTokenizer,
    Phi3Config,
    Phi3ForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
TEXT_DIR = FIXTURES / "text"
TRAIN_SEED, EVAL_SEED = 20240601, 20240602
TRAIN_BYTES, EVAL_BYTES = 300_000, 30_000

WINDOW = 128  # tokens per training/eval window
STEPS = 300
BATCH = 8
PEAK_LR = 3e-3
WARMUP = 20

# Qwen2's pre-tokenizer split (its tokenizer.json applies this via Split, then ByteLevel without its own regex).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<<SYS>>\\n' + message['content'] + '\\n<</SYS>>\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# Phi-4-mini-instruct's tokenizer_config.json chat template (tools in the system turn; no newlines between turns)
PHI4_MINI_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] is not none %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}"
    "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)
# o200k's (GPT-4o's) split, as Phi-4-mini's tokenizer.json has it (llama.cpp's pre-tokenizer "gpt-4o")
O200K_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


# --------------------------------------------------------------------------------------------------------------------
# Text: a small probabilistic grammar. Its output is low-entropy enough for a ~2M-parameter model to learn in a few
# hundred steps, yet has what tokenizer tests need: names, digits, contractions, accents, an em dash, rare symbols
# (left to byte fallback), lines with and without a leading space, empty lines and WikiText-style " = Heading = " lines.
# --------------------------------------------------------------------------------------------------------------------

NAMES = ["Alice", "Bruno", "Chloé", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ingrid", "José",
         "Kenji", "Léa", "Mateo", "Nadia", "Oskar", "Priya", "Renée", "Søren", "Tomás", "Zoë"]
PLACES = ["Lisbon", "Oslo", "Kyoto", "Montréal", "Zürich", "Nairobi", "Lima", "Quebec", "Århus", "Porto"]
NOUNS = [("baker", "bakers"), ("captain", "captains"), ("student", "students"), ("river", "rivers"),
         ("boat", "boats"), ("café", "cafés"), ("map", "maps"), ("garden", "gardens"), ("bridge", "bridges"),
         ("letter", "letters"), ("engine", "engines"), ("village", "villages"), ("market", "markets"),
         ("song", "songs"), ("lamp", "lamps"), ("window", "windows"), ("teacher", "teachers"),
         ("farmer", "farmers"), ("horse", "horses"), ("book", "books"), ("city", "cities"), ("child", "children")]
PEOPLE = {"baker", "captain", "student", "teacher", "farmer", "child"}
ADJECTIVES = ["old", "young", "red", "quiet", "naïve", "bright", "small", "large", "green", "tired", "clever",
              "distant", "wooden", "famous", "strange", "blue"]
# (base, third person singular, past)
VERBS = [("see", "sees", "saw"), ("build", "builds", "built"), ("find", "finds", "found"),
         ("carry", "carries", "carried"), ("paint", "paints", "painted"), ("sell", "sells", "sold"),
         ("visit", "visits", "visited"), ("repair", "repairs", "repaired"), ("write", "writes", "wrote"),
         ("follow", "follows", "followed"), ("open", "opens", "opened"), ("watch", "watches", "watched"),
         ("count", "counts", "counted"), ("lose", "loses", "lost"), ("remember", "remembers", "remembered")]
INTRANSITIVE = [("sleep", "sleeps", "slept"), ("arrive", "arrives", "arrived"), ("laugh", "laughs", "laughed"),
                ("wait", "waits", "waited"), ("sing", "sings", "sang"), ("leave", "leaves", "left")]
ADVERBS = ["slowly", "quietly", "again", "early", "late", "carefully", "together", "often"]
PREPOSITIONS = ["near", "behind", "under", "beside", "across", "inside"]
MONTHS = ["January", "March", "May", "July", "September", "November"]
DAYS = ["Monday", "Tuesday", "Friday", "Sunday"]
SINGULAR_CONTRACTIONS = ["'s", "'d", "'ll"]
PLURAL_CONTRACTIONS = ["'ve", "'re", "'ll", "'d"]
RARE = ["→", "½", "Ω", "ß", "ł", "日本", "🙂", "°", "±", "ñ"]  # mostly below SentencePiece's character coverage


class Grammar:
    """Sentences and paragraphs drawn from fixed word lists with a seeded `random.Random`."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def pick(self, items):
        return self.rng.choice(items)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def count(self) -> str:
        kind = self.rng.choices(["small", "big", "thousands"], weights=[6, 3, 1])[0]
        if kind == "small":
            return str(self.rng.randint(2, 12))
        if kind == "big":
            return str(self.rng.randint(13, 999))
        return f"{self.rng.randint(1, 99)},{self.rng.randint(0, 999):03d}"

    def amount(self) -> str:
        kind = self.rng.choice(["decimal", "percent", "money"])
        if kind == "decimal":
            return f"{self.rng.randint(0, 99)}.{self.rng.randint(0, 9)}"
        if kind == "percent":
            return f"{self.rng.randint(1, 99)}%"
        return self.pick(["$", "$", "€", "£"]) + f"{self.rng.randint(1, 500)}.{self.rng.randint(0, 99):02d}"

    def time(self) -> str:
        kind = self.rng.randint(0, 5)
        if kind == 0:
            return f"in {self.rng.randint(1850, 2030)}"
        if kind == 1:
            return f"at {self.rng.randint(1, 12)}:{self.rng.randint(0, 59):02d}"
        if kind == 2:
            return f"on {self.pick(DAYS)}"
        if kind == 3:
            return f"on {self.rng.randint(1, 28)} {self.pick(MONTHS)}"
        return self.pick(["in the morning", "at night", "before dawn", "last week", "after the rain"])

    def noun_phrase(self, plural: bool | None = None) -> str:
        if plural is None:
            plural = self.chance(0.3)
        singular, many = self.pick(NOUNS)
        adjective = self.pick(ADJECTIVES) + " " if self.chance(0.4) else ""
        if plural:
            count = self.count() if self.chance(0.5) else "the"
            return f"{count} {adjective}{many}"
        if self.chance(0.15):
            return f"{self.pick(NAMES)}'s {adjective}{singular}"
        article = "the" if self.chance(0.6) else ("an" if (adjective or singular)[0] in "aeiou" else "a")
        return f"{article} {adjective}{singular}"

    def subject(self) -> str:
        if self.chance(0.45):
            return self.pick(NAMES)
        singular, _ = self.pick([n for n in NOUNS if n[0] in PEOPLE])
        adjective = self.pick(ADJECTIVES) + " " if self.chance(0.3) else ""
        return f"the {adjective}{singular}"

    def clause(self) -> str:
        past = self.chance(0.5)
        if self.chance(0.25):
            verb = self.pick(INTRANSITIVE)[2 if past else 1]
            rest = ""
        else:
            verb = self.pick(VERBS)[2 if past else 1]
            rest = " " + self.noun_phrase()
            if self.chance(0.1):
                rest += " for " + self.amount()
        if self.chance(0.35):
            rest += f" {self.pick(PREPOSITIONS)} {self.noun_phrase(False)}"
        if self.chance(0.2):
            rest += " in " + self.pick(PLACES)
        if self.chance(0.25):
            rest += " " + self.pick(ADVERBS)
        if self.chance(0.3):
            rest += " " + self.time()
        return f"{self.subject()} {verb}{rest}"

    def sentence(self) -> str:
        kind = self.rng.choices(range(10), weights=[10, 3, 2, 2, 2, 1, 2, 1, 1, 1])[0]
        if kind == 0:
            text = self.clause() + "."
        elif kind == 1:
            text = f"{self.clause()}, and {self.clause()}."
        elif kind == 2:
            text = f"{self.clause()}; {self.clause()}."
        elif kind == 3:
            base = self.pick(VERBS)[0]
            text = f"Why did {self.pick(NAMES)} {base} {self.noun_phrase()}?"
        elif kind == 4:
            text = f'{self.pick(NAMES)} said, "{cap(self.clause())}."'
        elif kind == 5:
            text = f"{self.noun_phrase(False)} — {self.pick(ADJECTIVES)} and {self.pick(ADJECTIVES)} — " \
                   f"{self.pick(INTRANSITIVE)[2]} {self.time()}."
        elif kind == 6:
            text = f"{self.clause()} ({self.time()})."
        elif kind == 7:
            text = (f"{self.pick(['It', 'She', 'He'])}{self.pick(SINGULAR_CONTRACTIONS)} "
                    f"{self.pick(['not', 'never', 'surely'])} {self.pick(ADVERBS)}, "
                    f"{self.pick(['but we', 'and they', 'so I', 'yet you'])}{self.pick(PLURAL_CONTRACTIONS)} "
                    f"{self.pick(VERBS)[2]} {self.noun_phrase()}.")
        elif kind == 8:
            text = f"{self.pick(NAMES)} counted {self.noun_phrase(True)}, {self.noun_phrase(True)} " \
                   f"and {self.noun_phrase(True)}."
        else:
            text = f"{self.clause()}!"
            if self.chance(0.3):
                text = text.upper()  # "IT'S" etc.: Qwen2's contraction rule is case-insensitive
        text = cap(text)
        if self.chance(0.01):
            text = text[:-1] + " " + self.pick(RARE) + text[-1]
        return text

    def paragraph(self) -> str:
        n = self.rng.choices([1, 2, 3, 4, 6, 9], weights=[3, 3, 3, 2, 2, 1])[0]
        sep = "  " if self.chance(0.03) else " "
        return sep.join(self.sentence() for _ in range(n))

    def heading(self, depth: int) -> str:
        title = self.pick([f"{self.pick(NAMES)} of {self.pick(PLACES)}", f"The {cap(self.pick(NOUNS)[1])}",
                           f"{self.pick(PLACES)} in {self.rng.randint(1850, 2030)}", cap(self.pick(ADJECTIVES))])
        marks = " ".join("=" * depth)
        return f" {marks} {title} {marks} "

    def document(self) -> list[str]:
        """A WikiText-style article (leading-space lines, " " blank lines, spaced punctuation) or a plain one."""
        if self.chance(0.5):
            lines = [" ", self.heading(1), " "]
            for _ in range(self.rng.randint(1, 3)):
                if self.chance(0.5):
                    lines += [self.heading(2), " "]
                for _ in range(self.rng.randint(1, 3)):
                    lines += [" " + wikitext_spacing(self.paragraph()) + " ", " "]
            return lines
        lines = []
        for _ in range(self.rng.randint(1, 4)):
            lines.append(self.paragraph())
            if self.chance(0.7):
                lines.append("")
        if self.chance(0.1):
            lines.append("\t" + self.paragraph())
        return lines

    def text(self, n_bytes: int) -> str:
        lines: list[str] = []
        size = 0
        while size < n_bytes:
            for line in self.document():
                lines.append(line)
                size += len(line.encode()) + 1
        return "\n".join(lines) + "\n"


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def wikitext_spacing(text: str) -> str:
    """WikiText's tokenised look: spaces around punctuation, ' @,@ ' inside numbers, "the baker 's"."""
    out = []
    for i, ch in enumerate(text):
        if ch == "," and 0 < i < len(text) - 1 and text[i - 1].isdigit() and text[i + 1].isdigit():
            out.append(" @,@ ")
        elif ch == "." and 0 < i < len(text) - 1 and text[i - 1].isdigit() and text[i + 1].isdigit():
            out.append(" @.@ ")
        elif ch in ",.;!?()\"":
            out.append(f" {ch} ")
        elif ch == "'" and text[i + 1: i + 2] == "s":
            out.append(" '")
        else:
            out.append(ch)
    return re.sub(" +", " ", "".join(out)).strip()


def write_texts() -> tuple[Path, Path]:
    TEXT_DIR.mkdir(parents=True, exist_ok=True)
    train, evaluation = TEXT_DIR / "train.txt", TEXT_DIR / "eval.txt"
    train.write_text(Grammar(TRAIN_SEED).text(TRAIN_BYTES), encoding="utf-8")
    evaluation.write_text(Grammar(EVAL_SEED).text(EVAL_BYTES), encoding="utf-8")
    return train, evaluation


# --------------------------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------------------------

def train_sentencepiece(train: Path, out: Path, vocab_size: int, **settings) -> None:
    """SentencePiece BPE with Llama-2's trainer settings (also Phi-3's tokenizer), changed by `settings`,
    -> out/tokenizer.model."""
    prefix = out / "sp"
    spm.SentencePieceTrainer.train(**{
        **dict(input=str(train), model_prefix=str(prefix), model_type="bpe", vocab_size=vocab_size,
               byte_fallback=True, split_digits=True, add_dummy_prefix=True, normalization_rule_name="identity",
               remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=0.9995,
               unk_id=0, bos_id=1, eos_id=2, pad_id=-1, input_sentence_size=0, shuffle_input_sentence=False,
               max_sentence_length=16384, num_threads=1, minloglevel=2),
        **settings})
    (out / "sp.vocab").unlink()
    (out / "sp.model").rename(out / "tokenizer.model")


def make_phi3_tokenizer(train: Path, out: Path):
    """Phi-3's tokenizer: Llama-2's SentencePiece, its chat tokens added after the vocabulary (<|endoftext|> first,
    the end-of-text and padding token), no BOS added (tokenizer_config.json as Phi-3-mini's)."""
    train_sentencepiece(train, out, 480)
    tok = LlamaTokenizer.from_pretrained(out, add_bos_token=False, add_eos_token=False, legacy=False,
                                         model_max_length=8192, chat_template=PHI3_CHAT_TEMPLATE)
    tok.add_special_tokens({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                            "additional_special_tokens": ["<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]})
    tok.save_pretrained(out, save_jinja_files=False)

    def phi3(cfg: dict) -> None:
        """Phi-3-mini's tokenizer_config.json: every added token listed (converters read them from here)."""
        cfg.update(add_bos_token=False, add_eos_token=False, tokenizer_class="LlamaTokenizer")
        cfg["added_tokens_decoder"] = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(tok.added_tokens_decoder.items())}
        cfg.pop("is_local", None)
        cfg.pop("local_files_only", None)

    rewrite_json(out / "tokenizer_config.json", phi3)
    return AutoTokenizer.from_pretrained(out)


def make_gemma_tokenizer(train: Path, out: Path):
    """Gemma's SentencePiece layout: no dummy prefix, <pad> <eos> <bos> <unk> as ids 0-3, the chat turn markers as
    user-defined pieces; BOS added; tokenizer_config.json lists the added tokens (as Gemma's does)."""
    train_sentencepiece(train, out, 512, add_dummy_prefix=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
                        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"])
    tok = GemmaTokenizer.from_pretrained(out, add_bos_token=True, add_eos_token=False, model_max_length=8192,
                                         chat_template=GEMMA_CHAT_TEMPLATE,
                                         additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    tok.save_pretrained(out, save_jinja_files=False)

    def gemma(cfg: dict) -> None:
        cfg.update(add_bos_token=True, add_eos_token=False, tokenizer_class="GemmaTokenizer")
        cfg["added_tokens_decoder"] = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(tok.added_tokens_decoder.items())}
        cfg.pop("is_local", None)
        cfg.pop("local_files_only", None)

    rewrite_json(out / "tokenizer_config.json", gemma)
    return AutoTokenizer.from_pretrained(out)


def make_llama_tokenizer(train: Path, out: Path):
    """SentencePiece BPE with Llama-2's trainer settings; tokenizer.json converted from it by transformers.

    Note: transformers' conversion uses a Metaspace pre-tokenizer that skips the dummy prefix when a text already
    starts with a space, so for such lines tokenizer.json gives one "▁" fewer than tokenizer.model (as in bench-a).
    """
    train_sentencepiece(train, out, 512)
    tok = LlamaTokenizer.from_pretrained(out, add_bos_token=True, add_eos_token=False, model_max_length=2048,
                                         chat_template=LLAMA_CHAT_TEMPLATE)
    tok.save_pretrained(out, save_jinja_files=False)  # chat template inside tokenizer_config.json

    def classic(cfg: dict) -> None:
        """Spell out the BOS/EOS policy as Llama-2 checkpoints do; drop this machine's loading state."""
        cfg.update(add_bos_token=True, add_eos_token=False)
        cfg.pop("is_local", None)
        cfg.pop("local_files_only", None)

    rewrite_json(out / "tokenizer_config.json", classic)
    return AutoTokenizer.from_pretrained(out)


def train_byte_level_bpe(train: Path, split: str, nfc: bool) -> Tokenizer:
    """A byte-level BPE (605 entries before the special tokens) trained on `train` with the pipeline of Qwen2's and
    Phi-4-mini's tokenizer.json: the Split regex `split`, then byte-level; an NFC normalizer where the model has one."""
    byte_level = dict(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(**byte_level),
    ])
    tok.decoder = decoders.ByteLevel(**byte_level)
    tok.post_processor = processors.ByteLevel(**byte_level)
    trainer = trainers.BpeTrainer(vocab_size=605, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train([str(train)], trainer)
    return tok


def make_qwen2_tokenizer(train: Path, out: Path):
    """Byte-level BPE with the pipeline of Qwen2's tokenizer.json; tokenizer_config.json written as Qwen2's."""
    tok = train_byte_level_bpe(train, QWEN2_SPLIT, nfc=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.add_special_tokens(specials)  # after the BPE vocabulary, as in Qwen2
    tok.save(str(out / "tokenizer.json"))
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(tok.token_to_id(s)): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                      "single_word": False, "special": True} for s in specials},
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 2048,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return AutoTokenizer.from_pretrained(out)


def make_phi4_mini_tokenizer(train: Path, out: Path):
    """Phi-4-mini's tokenizer: byte-level BPE with o200k's split and no normalizer, its chat and tool tokens added
    after the vocabulary (<|endoftext|> first: BOS, EOS, padding and unknown token); tokenizer_config.json as
    Phi-4-mini-instruct's (GPT2Tokenizer, which is what llama.cpp's converter reads to take the BPE path)."""
    tok = train_byte_level_bpe(train, O200K_SPLIT, nfc=False)
    specials = ["<|endoftext|>", "<|endofprompt|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>", "<|tool|>",
                "<|/tool|>", "<|tool_call|>", "<|/tool_call|>", "<|tool_response|>", "<|tag|>"]
    tok.add_special_tokens(specials)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(tok.token_to_id(s)): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                      "single_word": False, "special": True} for s in specials},
        "bos_token": "<|endoftext|>",
        "chat_template": PHI4_MINI_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": "<|endoftext|>",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    # tokenizer.json's pipeline, as llama.cpp and AutoTokenizer (once config.json is there) read it: AutoTokenizer on
    # the bare folder would take tokenizer_class and build transformers' GPT2Tokenizer, GPT-2's split instead of o200k's
    return PreTrainedTokenizerFast.from_pretrained(out)


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------

def token_stream(tok, path: Path) -> torch.Tensor:
    ids = tok(path.read_text(encoding="utf-8"), add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, starts: torch.Tensor, bos: int | None) -> torch.Tensor:
    batch = torch.stack([stream[s: s + WINDOW] for s in starts.tolist()])
    if bos is not None:  # as llama-perplexity does: every window starts with BOS
        batch[:, 0] = bos
    return batch


@torch.no_grad()
def mean_loss(model, stream: torch.Tensor, bos: int | None) -> float:
    """Mean next-token loss over non-overlapping windows (the last partial window dropped)."""
    model.eval()
    starts = torch.arange(0, len(stream) - WINDOW + 1, WINDOW)
    total = 0.0
    for chunk in starts.split(32):
        batch = windows(stream, chunk, bos)
        total += model(batch, labels=batch).loss.item() * len(chunk)
    return total / len(starts)


def unigram_entropy(stream: torch.Tensor) -> float:
    counts = Counter(stream.tolist())
    n = len(stream)
    return -sum(c / n * math.log(c / n) for c in counts.values())


def train(model, stream: torch.Tensor, bos: int | None, seed: int) -> float:
    """AdamW, linear warm-up then cosine decay; returns the mean loss of the last 20 steps."""
    def lr_factor(step: int) -> float:
        return min((step + 1) / WARMUP, 0.05 + 0.5 * (1 + math.cos(math.pi * step / STEPS)))

    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, betas=(0.9, 0.95), weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    recent = []
    for step in range(STEPS):
        batch = windows(stream, torch.randint(0, len(stream) - WINDOW, (BATCH,), generator=gen), bos)
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        recent = (recent + [loss.item()])[-20:]
        if step % 50 == 0 or step == STEPS - 1:
            print(f"  step {step:4d}  loss {loss.item():.3f}", flush=True)
    return sum(recent) / len(recent)


def train_and_save(name: str, model, tok, out: Path, train_path: Path, eval_path: Path, bos: int | None,
                   seed: int, **save) -> None:
    train_stream, eval_stream = token_stream(tok, train_path), token_stream(tok, eval_path)
    train_loss = train(model, train_stream, bos, seed)
    model = model.to(torch.bfloat16).to(torch.float32)  # measure what is shipped: bf16 weights
    eval_loss = mean_loss(model, eval_stream, bos)
    model.to(torch.bfloat16).save_pretrained(out, **save)
    n_params = sum(p.numel() for p in model.parameters())
    record = (f"arch={name} params={n_params} steps={STEPS} batch={BATCH} window={WINDOW} lr={PEAK_LR} seed={seed} "
              f"train_tokens={len(train_stream)} train_loss_last20={train_loss:.4f} eval_loss_bf16={eval_loss:.4f} "
              f"eval_unigram_entropy={unigram_entropy(eval_stream):.4f} ln_vocab={math.log(model.config.vocab_size):.4f} "
              f"torch={torch.__version__}\n")
    (out / "TRAINING.txt").write_text(record)
    print(record, end="")


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def rewrite_json(path: Path, edit) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def make_llama(train_path: Path, eval_path: Path) -> None:
    out = fresh_dir(FIXTURES / "tiny-llama")
    tok = make_llama_tokenizer(train_path, out)
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, head_dim=64, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=500000.0,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )
    train_and_save("llama", LlamaForCausalLM(config), tok, out, train_path, eval_path, bos=1, seed=11)

    def classic(cfg: dict) -> None:
        """The pre-`rope_parameters` layout most published Llama checkpoints still have."""
        cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
        cfg["rope_scaling"] = None
        cfg["torch_dtype"] = cfg.pop("dtype")

    rewrite_json(out / "config.json", classic)


def make_phi3(train_path: Path, eval_path: Path) -> None:
    out = fresh_dir(FIXTURES / "tiny-phi3")
    tok = make_phi3_tokenizer(train_path, out)
    torch.manual_seed(3)
    head_dim, partial = 64, 0.75
    n_factors = int(head_dim * partial) // 2
    # LongRoPE's searched factors: short ones near 1, long ones growing towards the low frequencies
    short = [round(1.0 + 0.05 * i / n_factors, 4) for i in range(n_factors)]
    long = [round(1.0 + 15.0 * (i / (n_factors - 1)) ** 2, 4) for i in range(n_factors)]
    config = Phi3Config(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=8192, original_max_position_embeddings=2048,
        rms_norm_eps=1e-5, sliding_window=2047, tie_word_embeddings=False, partial_rotary_factor=partial,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short, "long_factor": long,
                         "original_max_position_embeddings": 2048, "partial_rotary_factor": partial},
        bos_token_id=1, eos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
    )
    train_and_save("phi3", Phi3ForCausalLM(config), tok, out, train_path, eval_path, bos=None, seed=33)

    def classic(cfg: dict) -> None:
        """Phi-3-128k's published layout: rope_theta, partial_rotary_factor and original_max_position_embeddings at
        the top level, rope_scaling {type, long_factor, short_factor}."""
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rope["rope_theta"]
        cfg["rope_scaling"] = {"type": rope["rope_type"], "long_factor": rope["long_factor"],
                               "short_factor": rope["short_factor"]}
        cfg["torch_dtype"] = cfg.pop("dtype")

    rewrite_json(out / "config.json", classic)


def make_phi4_mini(train_path: Path, eval_path: Path) -> None:
    """Phi-4-mini-instruct's config shape: tied embeddings, 3:1 GQA, 3/4 of each head rotated, LongRoPE from 4k to
    128k, sliding_window larger than any context, and a vocabulary padded beyond the tokenizer (200064 > 200029)."""
    out = fresh_dir(FIXTURES / "tiny-phi4-mini")
    tok = make_phi4_mini_tokenizer(train_path, out)
    torch.manual_seed(4)
    head_dim, partial = 32, 0.75
    n_factors = int(head_dim * partial) // 2
    short = [round(1.0 + 0.05 * i / n_factors, 4) for i in range(n_factors)]
    long = [round(1.0 + 30.0 * (i / (n_factors - 1)) ** 2, 4) for i in range(n_factors)]
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    config = Phi3Config(
        vocab_size=640, hidden_size=192, intermediate_size=512, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=131072, original_max_position_embeddings=4096,
        rms_norm_eps=1e-5, sliding_window=262144, tie_word_embeddings=True, partial_rotary_factor=partial,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short, "long_factor": long,
                         "original_max_position_embeddings": 4096, "partial_rotary_factor": partial},
        bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
    )
    assert len(tok) < config.vocab_size
    train_and_save("phi4_mini", Phi3ForCausalLM(config), tok, out, train_path, eval_path, bos=None, seed=44)

    def hub(cfg: dict) -> None:
        """Phi-4-mini-instruct's published layout: rope_theta, partial_rotary_factor and
        original_max_position_embeddings at the top level, rope_scaling {type, long_factor, short_factor}, and its
        extra keys (full_attn_mod, interpolate_factor, lm_head_bias)."""
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rope["rope_theta"]
        cfg["rope_scaling"] = {"type": rope["rope_type"], "long_factor": rope["long_factor"],
                               "short_factor": rope["short_factor"]}
        cfg["torch_dtype"] = cfg.pop("dtype")
        cfg.update(full_attn_mod=1, interpolate_factor=1, lm_head_bias=False)

    rewrite_json(out / "config.json", hub)


GEMMA_SHAPE = dict(vocab_size=512, max_position_embeddings=8192, rms_norm_eps=1e-6, sliding_window=32,
                   hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
                   bos_token_id=2)


def make_gemma2(train_path: Path, eval_path: Path) -> None:
    out = fresh_dir(FIXTURES / "tiny-gemma2")
    tok = make_gemma_tokenizer(train_path, out)
    torch.manual_seed(4)
    config = Gemma2Config(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, query_pre_attn_scalar=64, rope_theta=10000.0, attn_logit_softcapping=10.0,
        final_logit_softcapping=15.0, **GEMMA_SHAPE)
    config._attn_implementation = "eager"  # transformers' Gemma 2 default: SDPA cannot soft-cap
    train_and_save("gemma2", Gemma2ForCausalLM(config), tok, out, train_path, eval_path, bos=2, seed=44)

    def classic(cfg: dict) -> None:
        """Gemma-2's published layout: rope_theta at the top level, no layer_types."""
        cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
        cfg.pop("layer_types", None)
        cfg["torch_dtype"] = cfg.pop("dtype")

    rewrite_json(out / "config.json", classic)


def make_gemma3(train_path: Path, eval_path: Path) -> None:
    out = fresh_dir(FIXTURES / "tiny-gemma3")
    tok = make_gemma_tokenizer(train_path, out)
    torch.manual_seed(5)
    config = Gemma3TextConfig(
        hidden_size=288, intermediate_size=256, num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1,
        head_dim=64, query_pre_attn_scalar=64, sliding_window_pattern=6, final_logit_softcapping=None,
        attn_logit_softcapping=None, rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        **GEMMA_SHAPE)
    config.architectures = ["Gemma3ForCausalLM"]
    train_and_save("gemma3", Gemma3ForCausalLM(config), tok, out, train_path, eval_path, bos=2, seed=55)

    def classic(cfg: dict) -> None:
        """Gemma-3-1B's published layout: rope_theta and rope_local_base_freq, sliding_window_pattern."""
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rope["full_attention"]["rope_theta"]
        cfg["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        cfg["rope_scaling"] = None
        cfg["sliding_window_pattern"] = 6
        cfg.pop("layer_types", None)
        cfg["torch_dtype"] = cfg.pop("dtype")

    rewrite_json(out / "config.json", classic)


def make_gemma3_vl(train_path: Path, eval_path: Path) -> None:
    from safetensors.torch import load_file, save_file
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    text_dir = FIXTURES / "tiny-gemma3"
    if not (text_dir / "model.safetensors").exists():
        make_gemma3(train_path, eval_path)
    out = fresh_dir(FIXTURES / "tiny-gemma3-vl")
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(text_dir / f, out / f)
    text = json.loads((text_dir / "config.json").read_text())
    defaults = Gemma3TextConfig().to_dict()
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "query_pre_attn_scalar", "vocab_size", "sliding_window", "max_position_embeddings")
    text_config = {k: text[k] for k in keep if text[k] != defaults.get(k)}
    text_config.update(model_type="gemma3_text", rope_scaling={"factor": 8.0, "rope_type": "linear"})
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14, vision_use_head=False)
    config = Gemma3Config(text_config=Gemma3TextConfig(**text_config), vision_config=vision, mm_tokens_per_image=4,
                          boi_token_index=509, eoi_token_index=510, image_token_index=511)
    torch.manual_seed(6)
    from transformers import Gemma3ForConditionalGeneration
    model = Gemma3ForConditionalGeneration(config).to(torch.bfloat16)
    weights = {}
    for name, w in model.state_dict().items():  # the Hub's original names
        if name.startswith("model.language_model."):
            continue
        name = name.replace("model.vision_tower.", "vision_tower.").replace("model.multi_modal_projector.", "multi_modal_projector.")
        if name != "lm_head.weight":  # tied
            weights[name] = w.contiguous()
    for name, w in load_file(text_dir / "model.safetensors").items():
        if name.startswith("model."):
            weights["language_model." + name] = w
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    cfg = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "boi_token_index": 509,
           "eoi_token_index": 510, "image_token_index": 511, "mm_tokens_per_image": 4, "eos_token_id": [1],
           "initializer_range": 0.02, "text_config": text_config, "torch_dtype": "bfloat16",
           "vision_config": {k: v for k, v in vision.to_dict().items() if k in (
               "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
               "patch_size", "model_type", "vision_use_head")}}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "TRAINING.txt").write_text("tiny-gemma3's trained weights as the text tower; the vision tower random "
                                      "(seed 6), never converted\n")


def make_qwen2(train_path: Path, eval_path: Path) -> None:
    out = fresh_dir(FIXTURES / "tiny-qwen2")
    tok = make_qwen2_tokenizer(train_path, out)
    torch.manual_seed(2)
    config = Qwen2Config(
        vocab_size=640, hidden_size=320, intermediate_size=512, num_hidden_layers=2, num_attention_heads=5,
        num_key_value_heads=1, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=True, use_sliding_window=False,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
    )
    train_and_save("qwen2", Qwen2ForCausalLM(config), tok, out, train_path, eval_path, bos=None, seed=22)
    rewrite_json(out / "config.json", lambda cfg: None)  # only normalises key order/indentation


def make_qwen3_moe(train_path: Path, eval_path: Path) -> None:
    out = fresh_dir(FIXTURES / "tiny-qwen3-moe")
    tok = make_qwen2_tokenizer(train_path, out)
    torch.manual_seed(6)
    config = Qwen3MoeConfig(
        vocab_size=640, hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=6, num_experts_per_tok=2,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=2048,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
    )
    # transformers 5's own layout (3-D gate_up_proj/down_proj), not the per-expert one save_pretrained restores
    train_and_save("qwen3_moe", Qwen3MoeForCausalLM(config), tok, out, train_path, eval_path, bos=None, seed=66,
                   save_original_format=False)
    rewrite_json(out / "config.json", lambda cfg: None)


def make_mixtral(train_path: Path, eval_path: Path) -> None:
    out = fresh_dir(FIXTURES / "tiny-mixtral")
    tok = make_llama_tokenizer(train_path, out)
    torch.manual_seed(7)
    config = MixtralConfig(
        vocab_size=512, hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=32, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )
    train_and_save("mixtral", MixtralForCausalLM(config), tok, out, train_path, eval_path, bos=1, seed=77)

    def classic(cfg: dict) -> None:
        """Mixtral-8x7B's published layout: rope_theta at the top level."""
        cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
        cfg["torch_dtype"] = cfg.pop("dtype")

    rewrite_json(out / "config.json", classic)


MAKERS = {"llama": make_llama, "qwen2": make_qwen2, "phi3": make_phi3, "phi4_mini": make_phi4_mini,
          "gemma2": make_gemma2, "gemma3": make_gemma3,
          "gemma3_vl": make_gemma3_vl,
          "qwen3_moe": make_qwen3_moe, "mixtral": make_mixtral}


def main() -> None:
    import sys

    names = sys.argv[1:] or list(MAKERS)
    unknown = [n for n in names if n not in MAKERS]
    if unknown:
        sys.exit(f"unknown fixture {unknown[0]!r}; choose from {', '.join(MAKERS)}")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    started = time.time()
    train_path, eval_path = write_texts()
    for name in names:
        MAKERS[name](train_path, eval_path)
        print(f"tiny-{name} done after {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
