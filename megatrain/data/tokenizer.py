"""Lossless sentencepiece tokenizer: training, loading, special-token ids, HF export.

Use:
    from megatrain.data.tokenizer import TokenizerConfig, train_tokenizer, load_tokenizer, special_token_ids
    train_tokenizer(texts, TokenizerConfig(vocab_size=32000), "tok/")   # writes tok/tokenizer.model + HF files
    sp = load_tokenizer("tok/"); ids = sp.encode("hello\n\tworld")

Recipe (default): BPE with byte_fallback, identity normalization, no whitespace collapsing, no dummy prefix, so
decode(encode(s)) == s for any UTF-8 string, with one sentencepiece-inherent exception: the character U+2581 "▁"
(sentencepiece's internal space marker) decodes as a plain space.
Fixed ids: <unk>=0, <s>=1, </s>=2 (also the end-of-document token), <pad>=3, <mask>=4 (control symbols: text that
spells "<mask>" is tokenized as ordinary characters, never as the special id; a masked LM's HF folder alone maps
them, see save_hf_tokenizer). "\n" and "\t" are single tokens.

Training input: documents are split into lines, and lines longer than ``max_sentence_length`` bytes are cut into
pieces of that size (sentencepiece silently skips longer lines). At most ``input_sentence_size`` of those lines are
used: sentencepiece samples them uniformly at random (seeded) when the corpus has more.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import warnings
from typing import Iterable, Iterator

SPECIAL_PIECES = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>", "mask": "<mask>"}
MODEL_FILE = "tokenizer.model"


@dataclasses.dataclass
class TokenizerConfig:
    vocab_size: int = 32000
    model_type: str = "bpe"
    input_sentence_size: int = 2_000_000   # lines sampled for training when the corpus is larger
    max_sentence_length: int = 16384       # bytes; longer lines are split before training
    character_coverage: float = 1.0        # rare characters still get byte-fallback tokens
    num_threads: int = 2
    seed: int = 0

    def __post_init__(self):
        if self.model_type not in ("bpe", "unigram"):
            raise ValueError(f"model_type must be 'bpe' or 'unigram', got {self.model_type!r}")
        if self.vocab_size < 300:
            raise ValueError(f"vocab_size {self.vocab_size} too small: byte fallback alone needs 256 + "
                             f"{len(SPECIAL_PIECES) + 2} special ids (use >= 300)")


def _training_lines(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    for text in texts:
        for line in text.split("\n"):
            raw = line.encode("utf-8")
            if len(raw) <= max_bytes:
                if line:
                    yield line
                continue
            # Cut on UTF-8 character boundaries: decode with "ignore" drops at most a partial char per cut.
            for i in range(0, len(raw), max_bytes):
                piece = raw[i:i + max_bytes].decode("utf-8", errors="ignore")
                if piece:
                    yield piece


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, out_dir: str) -> str:
    """Train on an iterable of documents; write tokenizer.model and HF files into ``out_dir``; return the model path."""
    import sentencepiece as spm

    os.makedirs(out_dir, exist_ok=True)
    lines = _training_lines(texts, cfg.max_sentence_length)
    first = next(lines, None)
    if first is None:
        raise ValueError("tokenizer training input has no text")

    def all_lines():
        yield first
        yield from lines

    model = io.BytesIO()
    spm.set_random_generator_seed(cfg.seed)  # line sampling is then reproducible
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=all_lines(), model_writer=model, vocab_size=cfg.vocab_size, model_type=cfg.model_type,
            byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
            character_coverage=cfg.character_coverage, input_sentence_size=cfg.input_sentence_size,
            shuffle_input_sentence=True, max_sentence_length=cfg.max_sentence_length,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, control_symbols=["<mask>"], user_defined_symbols=["\n", "\t"],
            num_threads=cfg.num_threads, minloglevel=2, train_extremely_large_corpus=False)
    except RuntimeError as e:
        msg = str(e)
        if "Vocabulary size" in msg:
            raise ValueError(f"vocab_size={cfg.vocab_size} does not fit this corpus: {msg.strip()}") from None
        raise ValueError(f"sentencepiece training failed: {msg.strip()}") from None
    path = os.path.join(out_dir, MODEL_FILE)
    with open(path, "wb") as f:
        f.write(model.getvalue())
    save_hf_tokenizer(out_dir)
    return path


def save_hf_tokenizer(out_dir: str, specials_in_text: bool = False) -> None:
    """Write tokenizer.json/tokenizer_config.json so ``AutoTokenizer.from_pretrained(out_dir)`` gives
    ``hf_encode(sp, text, specials_in_text)``: sentencepiece's ids, by default for any text.

    LlamaTokenizerFast converts the .model exactly when the prefix space is off. specials_in_text=False
    (split_special_tokens): text such as "<s>" is ordinary characters, as in sentencepiece (a causal LM's folder).
    True (a masked LM's folder): text that spells a special piece is its id, so "Paris is the <mask> of France" has
    the mask id where pipeline("fill-mask") and every masked-LM user put it.
    """
    try:
        from transformers import LlamaTokenizerFast
    except ImportError:  # transformers is a dev extra; training works without it
        warnings.warn(f"transformers is not installed: wrote only {MODEL_FILE} (no HF tokenizer files)")
        return
    tok = LlamaTokenizerFast(vocab_file=os.path.join(out_dir, MODEL_FILE), from_slow=True, legacy=False,
                             add_prefix_space=False, add_bos_token=False, add_eos_token=False,
                             split_special_tokens=not specials_in_text, unk_token=SPECIAL_PIECES["unk"],
                             bos_token=SPECIAL_PIECES["bos"], eos_token=SPECIAL_PIECES["eos"],
                             pad_token=SPECIAL_PIECES["pad"], mask_token=SPECIAL_PIECES["mask"])
    tok.save_pretrained(out_dir)


def hf_encode(sp, text: str, specials_in_text: bool = False) -> list[int]:
    """The ids a folder written by ``save_hf_tokenizer(.., specials_in_text)`` gives `text` (no added specials):
    sentencepiece's; with specials_in_text, each spelled special piece is its id and the text between is
    sentencepiece's."""
    if not specials_in_text:
        return sp.encode(text)
    pieces = sorted(SPECIAL_PIECES.values(), key=len, reverse=True)
    out, rest = [], text
    while rest:
        hits = [(rest.find(p), -len(p), p) for p in pieces if p in rest]
        if not hits:
            out += sp.encode(rest)
            break
        at, _, piece = min(hits)
        out += sp.encode(rest[:at]) + [sp.piece_to_id(piece)]
        rest = rest[at + len(piece):]
    return out


def model_path(tokenizer: str) -> str:
    path = os.path.join(tokenizer, MODEL_FILE) if os.path.isdir(tokenizer) else tokenizer
    if not os.path.isfile(path):
        raise ValueError(f"tokenizer {tokenizer!r}: no {MODEL_FILE} found")
    return path


def load_tokenizer(tokenizer: str):
    """SentencePieceProcessor from a folder (or a .model file)."""
    import sentencepiece as spm

    path = model_path(tokenizer)
    try:
        return spm.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as e:
        raise ValueError(f"tokenizer {path}: not a sentencepiece model ({e})") from None


def tokenizer_sha256(tokenizer: str) -> str:
    with open(model_path(tokenizer), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def special_token_ids(sp) -> dict[str, int]:
    """{"unk", "bos", "eos", "eod", "pad", "mask"} -> id; eod is eos. Error if the model lacks one of them."""
    ids = {}
    for name, piece in SPECIAL_PIECES.items():
        tid = sp.piece_to_id(piece)
        if tid == sp.unk_id() and name != "unk":
            raise ValueError(f"tokenizer has no {piece} token (train it with megatrain's train_tokenizer)")
        ids[name] = int(tid)
    ids["eod"] = ids["eos"]
    return ids


def token_byte_lengths(sp) -> list[int]:
    """UTF-8 bytes each id decodes to (0 for control/unknown ids), so the bytes of any run of ids from a text are
    the sum over its ids: exact for our lossless tokenizer (a byte-fallback piece is one byte, "▁" one space).
    Bits per byte (megatrain/eval) divides by these sums; build_shards stores the table in index.json."""
    out = []
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i):
            out.append(0)
        elif sp.is_byte(i):
            out.append(1)
        else:
            out.append(len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8")))
    return out
