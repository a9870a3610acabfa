"""Raw-text inputs shared by the tokenizer trainer and the shard builder.

Use:
    from megatrain.data.text import TextConfig, expand_inputs, iter_documents
    files = expand_inputs(["corpus/*.txt", "more.jsonl.gz"])
    stats = {}
    for source, doc_index, text in iter_documents(files, TextConfig(), stats): ...

Formats (by file name; ``.gz`` may wrap either):
    *.jsonl, *.jsonl.gz   one JSON object per line, the document in the field ``TextConfig.text_field``
    anything else         the whole file is one document (*.gz decompressed)
Invalid UTF-8 is replaced with U+FFFD (``invalid_utf8="replace"``) or the document is dropped ("reject");
either way ``stats["invalid_utf8"]`` counts it. Empty documents are counted in ``stats["empty"]`` and dropped.
"""
from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import zlib
from typing import Iterable, Iterator


@dataclasses.dataclass
class TextConfig:
    text_field: str = "text"          # jsonl field holding the document
    invalid_utf8: str = "replace"     # "replace" | "reject"

    def __post_init__(self):
        if self.invalid_utf8 not in ("replace", "reject"):
            raise ValueError(f"invalid_utf8 must be 'replace' or 'reject', got {self.invalid_utf8!r}")


def expand_inputs(patterns: Iterable[str]) -> list[str]:
    """Files named by paths / globs / folders (recursively), sorted within each pattern; clear errors if none."""
    patterns = list(patterns)
    if not patterns:
        raise ValueError("no input files given")
    files: list[str] = []
    for p in patterns:
        if os.path.isdir(p):
            hits = sorted(os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs)
        else:
            hits = sorted(glob.glob(p, recursive=True)) if any(c in p for c in "*?[") else [p]
        if not hits:
            raise ValueError(f"input {p!r} matches no files")
        for f in hits:
            if not os.path.isfile(f):
                raise ValueError(f"input {f!r}: not a readable file")
            if not os.access(f, os.R_OK):
                raise ValueError(f"input {f!r}: permission denied")
        files.extend(hits)
    return files


def _is_jsonl(path: str) -> bool:
    return path.endswith(".jsonl") or path.endswith(".jsonl.gz")


def _decode(raw: bytes, where: str, cfg: TextConfig, stats: dict) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats["invalid_utf8"] = stats.get("invalid_utf8", 0) + 1
        if cfg.invalid_utf8 == "reject":
            return None
        return raw.decode("utf-8", errors="replace")


def iter_documents(files: list[str], cfg: TextConfig, stats: dict) -> Iterator[tuple[str, int, str]]:
    """Yield ``(source, doc_index_in_source, text)`` for every non-empty document; counters go into ``stats``."""
    for path in files:
        opener = gzip.open if path.endswith(".gz") else open
        try:
            with opener(path, "rb") as f:
                if not _is_jsonl(path):
                    docs: Iterable[tuple[int, bytes]] = [(0, f.read())]
                else:
                    docs = enumerate(f)
                for i, raw in docs:
                    if _is_jsonl(path):
                        if not raw.strip():
                            continue
                        text = _decode(raw, f"{path}:{i + 1}", cfg, stats)
                        if text is None:
                            continue
                        try:
                            rec = json.loads(text)
                        except json.JSONDecodeError as e:
                            raise ValueError(f"{path}:{i + 1}: invalid JSON ({e.msg})") from None
                        if not isinstance(rec, dict) or cfg.text_field not in rec:
                            raise ValueError(f"{path}:{i + 1}: no field {cfg.text_field!r} "
                                             f"(set the text field name with --text-field)")
                        text = rec[cfg.text_field]
                        if not isinstance(text, str):
                            raise ValueError(f"{path}:{i + 1}: field {cfg.text_field!r} is not a string")
                    else:
                        text = _decode(raw, path, cfg, stats)
                        if text is None:
                            continue
                    stats["docs_in"] = stats.get("docs_in", 0) + 1
                    stats["bytes_in"] = stats.get("bytes_in", 0) + len(raw)
                    if not text:
                        stats["empty"] = stats.get("empty", 0) + 1
                        continue
                    yield path, i, text
        except (OSError, EOFError, zlib.error) as e:  # zlib: a corrupt .gz
            raise ValueError(f"input {path!r}: unreadable ({e})") from None
