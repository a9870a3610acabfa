"""Train megatrain's lossless sentencepiece tokenizer.

Run:
    python data_tools/train_tokenizer.py --input 'corpus/*.txt' data.jsonl.gz --vocab-size 32000 --out tok/
Inputs: what build_shards.py reads (megatrain/data/text.py): plain text (one file = one document), JSON lines
(field --text-field), Parquet / Arrow / `datasets` folders (column --text-field), optionally .gz/.bz2/.xz/.zst,
local or s3:// / https://. Writes tok/tokenizer.model plus HF files (AutoTokenizer.from_pretrained("tok/") gives the same ids).
Recipe and input sampling: see megatrain/data/tokenizer.py (BPE + byte fallback, identity normalization,
lines split at --max-sentence-length bytes, at most --input-sentence-size lines sampled).
--out must be new, empty or an earlier tokenizer folder (replaced whole); a failed training leaves nothing behind.
Bad input: one line on stderr naming it, exit 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tqdm import tqdm  # noqa: E402

from megatrain.cli import ArgumentParser, output_folder, run  # noqa: E402
from megatrain.data.text import TextConfig, expand_inputs, iter_documents  # noqa: E402
from megatrain.data.tokenizer import (MODEL_FILE, TokenizerConfig, load_tokenizer, special_token_ids,  # noqa: E402
                                      train_tokenizer)


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TokenizerConfig()
    p.add_argument("--input", nargs="+", required=True, help="files, globs or folders")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--text-field", default=TextConfig.text_field, help="jsonl field holding the text")
    p.add_argument("--model-type", default=d.model_type, choices=["bpe", "unigram"])
    p.add_argument("--input-sentence-size", type=int, default=d.input_sentence_size,
                   help="max training lines; larger corpora are sampled")
    p.add_argument("--max-sentence-length", type=int, default=d.max_sentence_length,
                   help="bytes; longer lines are split before training")
    p.add_argument("--threads", type=int, default=d.num_threads)
    p.add_argument("--seed", type=int, default=d.seed)
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    for flag, value in (("--threads", a.threads), ("--input-sentence-size", a.input_sentence_size),
                        ("--max-sentence-length", a.max_sentence_length)):
        if value < 1:
            raise ValueError(f"{flag} {value}: expected a positive number")
    try:
        cfg = TokenizerConfig(vocab_size=a.vocab_size, model_type=a.model_type,
                              input_sentence_size=a.input_sentence_size, max_sentence_length=a.max_sentence_length,
                              num_threads=a.threads, seed=a.seed)
    except ValueError as e:
        raise ValueError(f"--vocab-size {a.vocab_size}: {e}") from None
    files = expand_inputs(a.input)
    stats: dict = {}
    docs = (text for _, _, text in tqdm(iter_documents(files, TextConfig(text_field=a.text_field), stats),
                                        desc="reading", unit="doc", disable=None))
    t0 = time.time()
    with output_folder(a.out, "--out", replaceable=lambda names: MODEL_FILE in names) as tmp:
        try:
            train_tokenizer(docs, cfg, tmp)
        except ValueError as e:
            if "no text" in str(e):
                raise ValueError(f"--input {' '.join(a.input)}: no text to train on ({len(files)} files, "
                                 f"{stats.get('empty', 0)} empty documents)") from None
            raise ValueError(f"--vocab-size {a.vocab_size}: {e}" if "vocab_size" in str(e) else str(e)) from None
    sp = load_tokenizer(a.out)
    print(f"wrote {os.path.join(a.out, MODEL_FILE)} (vocab {sp.vocab_size()}, specials {special_token_ids(sp)}) "
          f"from {stats.get('docs_in', 0)} documents, {stats.get('bytes_in', 0) / 1e6:.1f} MB in "
          f"{time.time() - t0:.1f}s; empty {stats.get('empty', 0)}, invalid UTF-8 {stats.get('invalid_utf8', 0)}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main, "train_tokenizer"))
