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
Any other sentencepiece model (e.g. Llama-2's tokenizer.model: no pad, no mask) is accepted where a tokenizer is
read: special_token_ids reads its own ids, build_shards records them in the manifest, and training (the model's
pad/bos/eos ids), evaluation, export and the HF tokenizer files follow them.

Training input: documents are split into lines, and lines longer than ``max_sentence_length`` bytes are cut into
pieces of that size (sentencepiece silently skips longer lines). At most ``input_sentence_size`` of those lines are
used: sentencepiece samples them uniformly at random (seeded) when the corpus has more.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import itertools
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

    LlamaTokenizerFast converts the .model exactly for identity normalization (ours; Llama-2's), with the prefix
    space as the model's own add_dummy_prefix (ours: off; Llama-2's: on). specials_in_text=False
    (split_special_tokens): text such as "<s>" is ordinary characters, as in sentencepiece (a causal LM's folder).
    True (a masked LM's folder): text that spells a special piece is its id, so "Paris is the <mask> of France" has
    the mask id where pipeline("fill-mask") and every masked-LM user put it.
    """
    try:
        from transformers import LlamaTokenizerFast
    except ImportError:  # transformers is a dev extra; training works without it
        warnings.warn(f"transformers is not installed: wrote only {MODEL_FILE} (no HF tokenizer files)")
        return
    pieces = special_pieces(load_tokenizer(out_dir))  # the model's own specials: a foreign layout keeps its ids
    tok = LlamaTokenizerFast(vocab_file=os.path.join(out_dir, MODEL_FILE), from_slow=True, legacy=False,
                             add_prefix_space=_dummy_prefix(os.path.join(out_dir, MODEL_FILE)), add_bos_token=False, add_eos_token=False,
                             split_special_tokens=not specials_in_text,
                             **{f"{name}_token": pieces.get(name) for name in SPECIAL_PIECES})
    tok.save_pretrained(out_dir)


def _dummy_prefix(path: str) -> bool:
    """Whether the model prepends "▁" to a text (ours: no; Llama-2's: yes), read from its normalizer spec."""
    from sentencepiece import sentencepiece_model_pb2  # needs protobuf, as transformers' conversion does

    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    return bool(proto.normalizer_spec.add_dummy_prefix)


def hf_encode(sp, text: str, specials_in_text: bool = False) -> list[int]:
    """The ids a folder written by ``save_hf_tokenizer(.., specials_in_text)`` gives `text` (no added specials):
    sentencepiece's; with specials_in_text, each spelled special piece is its id and the text between is
    sentencepiece's."""
    if not specials_in_text:
        return sp.encode(text)
    pieces = sorted(special_pieces(sp).values(), key=len, reverse=True)
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
    """The model's own special ids: {"unk", "bos", "eos", "pad", "mask", "eod"} -> id, from its trainer spec
    (unk_id / bos_id / eos_id / pad_id; an id of -1 means the model has none and the name is left out) and a
    "<mask>" piece if it has one. eod (the end-of-document token the loader appends) is eos, so eos must exist.
    megatrain's tokenizer gives unk 0, bos 1, eos 2, pad 3, mask 4; Llama-2's gives unk 0, bos 1, eos 2 only."""
    ids = {}
    for name, tid in (("unk", sp.unk_id()), ("bos", sp.bos_id()), ("eos", sp.eos_id()), ("pad", sp.pad_id())):
        if tid >= 0:
            ids[name] = int(tid)
    mask = sp.piece_to_id(SPECIAL_PIECES["mask"])
    if mask != sp.unk_id() and sp.id_to_piece(mask) == SPECIAL_PIECES["mask"]:
        ids["mask"] = int(mask)
    if "eos" not in ids:
        raise ValueError("tokenizer has no end-of-sequence piece (eos_id is -1): megatrain ends every document "
                         "with it; train the model with an eos_id")
    ids["eod"] = ids["eos"]
    return ids


def special_pieces(sp) -> dict[str, str]:
    """{"unk": "<unk>", ...}: the piece of each special id the model has (special_token_ids, eod left out)."""
    return {name: sp.id_to_piece(tid) for name, tid in special_token_ids(sp).items() if name != "eod"}


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


_LINE_PROBES = ("a\nb", " x \n\n  y z\n", "\n\tdef f():\n    return 1\n", "é\n中文\n")


def lines_encode_alike(sp) -> bool:
    """Whether encoding a text equals encoding its lines and joining them with the "\n" id: "\n" is one piece,
    no other piece holds a "\n", and probes with leading spaces and empty lines agree (a dummy prefix or
    whitespace normalization would differ). Cached on the processor."""
    cached = getattr(sp, "_megatrain_lines_alike", None)
    if cached is not None:
        return cached
    nl = sp.piece_to_id("\n")
    ok = nl != sp.unk_id() and sp.id_to_piece(nl) == "\n" and not any(
        "\n" in sp.id_to_piece(i) for i in range(sp.get_piece_size()) if i != nl)
    if ok:
        for text in _LINE_PROBES:
            joined = []
            for k, line in enumerate(text.split("\n")):
                joined += ([nl] if k else []) + sp.encode(line)
            ok = ok and joined == sp.encode(text)
    try:
        sp._megatrain_lines_alike = ok
    except AttributeError:  # pragma: no cover - a processor without a __dict__
        pass
    return ok


def encode_documents(sp, texts: list[str], threads: int, dtype) -> list:
    """sentencepiece ids of each text (numpy arrays of ``dtype``), encoded line by line when "\n" is its own token.

    Our tokenizers make "\n" a user-defined symbol, which sentencepiece never merges across, so encoding the
    lines separately and joining them with the "\n" id gives the same ids as encoding the whole document, about 2x
    faster (short inputs) and spread evenly over the threads. Other models (a piece spanning "\n", a dummy prefix,
    whitespace normalization: lines_encode_alike) encode whole documents.
    """
    import numpy as np

    nl = sp.piece_to_id("\n")
    if not lines_encode_alike(sp):
        return [np.asarray(ids, dtype=dtype) for ids in sp.encode(texts, num_threads=threads)]
    lines, counts = [], []
    for text in texts:
        parts = text.split("\n")
        lines.extend(parts)
        counts.append(len(parts))
    ids = sp.encode(lines, num_threads=threads)
    out, k = [], 0
    for c in counts:
        chunk = ids[k:k + c]
        k += c
        n = sum(len(z) for z in chunk) + c
        flat = np.fromiter(itertools.chain.from_iterable(z + [nl] for z in chunk), dtype=dtype, count=n)
        out.append(flat[:-1])  # no "\n" after the last line
    return out
