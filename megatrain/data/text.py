"""Raw-text inputs shared by the tokenizer trainer and the shard builder: formats, remote files, filters.

Use:
    from megatrain.data.text import TextConfig, expand_inputs, iter_documents
    files = expand_inputs(["corpus/*.txt", "s3://bucket/fineweb/**/*.parquet", "dolma.json.gz"])
    stats = {}
    for source, doc_index, text in iter_documents(files, TextConfig(where="language == 'en'"), stats): ...

Formats, by file name, each streamed (memory bounded by one batch / one Parquet row group, never a whole file):
    *.parquet                     the string column ``text_field`` (pyarrow, record batches of BATCH_ROWS rows)
    *.arrow, a `datasets` folder   what ``Dataset.save_to_disk`` writes (state.json + Arrow stream files; a
                                  DatasetDict folder: every split, in dataset_dict.json's order), column ``text_field``
    *.jsonl, *.json               JSON lines (one object per line; Dolma's .json.gz is JSON lines), field ``text_field``
    anything else                 the whole file is one document
    any of them + .gz .bz2 .xz .zst .zstd   decompressed while streaming (fsspec's codecs; zstandard for .zst)
Inputs may be local paths, folders (walked, sorted), globs, or ``s3://`` / ``https://`` URLs and ``s3://`` globs
(``s3://bucket/fineweb/**/*.parquet``), read through fsspec by ranges (megatrain/data/remote.py: credentials and
endpoint from the standard AWS places; listing retried with the policy training reads use).
Invalid UTF-8 is replaced with U+FFFD (``invalid_utf8="replace"``) or the document is dropped ("reject");
either way ``stats["invalid_utf8"]`` counts it. Empty documents (and null cells) are counted in ``stats["empty"]``
and dropped. Filters: ``min_chars`` (shorter documents dropped, ``stats["short"]``) and ``where``, a condition on
other columns / fields of the same record (``"language == 'en' and score >= 3"``; operators == != < <= > >= in,
not in, and, or, not; literals in Python syntax; ``stats["filtered"]``): Parquet and Arrow evaluate it in pyarrow
on the batch, JSON lines on the parsed object (a missing field is None). Errors name the file (and line).
"""
from __future__ import annotations

import ast
import dataclasses
import glob
import io
import json
import lzma
import os
import zlib
from typing import Any, Callable, Iterable, Iterator

from megatrain.data.remote import RetryPolicy, is_remote, open_at, remote_fs, with_retries

BATCH_ROWS = 1024  # Parquet / Arrow rows converted to Python strings at a time
CODECS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd", ".zstd": "zstd"}
JSON_LINES = (".jsonl", ".json")
TABLES = (".parquet", ".arrow")


@dataclasses.dataclass
class TextConfig:
    text_field: str = "text"          # jsonl field / Parquet / Arrow column holding the document
    invalid_utf8: str = "replace"     # "replace" | "reject"
    min_chars: int = 0                # documents with fewer characters are dropped (counted: "short")
    where: str | None = None          # a condition on the record's other fields (see the module docstring)

    def __post_init__(self):
        if self.invalid_utf8 not in ("replace", "reject"):
            raise ValueError(f"invalid_utf8 must be 'replace' or 'reject', got {self.invalid_utf8!r}")
        if self.min_chars < 0:
            raise ValueError(f"--min-chars {self.min_chars}: expected a number >= 0")
        self.condition = Condition(self.where) if self.where else None


# ---------------------------------------------------------------------------------------------- --where
_OPS = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.In: "in",
        ast.NotIn: "not in"}


class Condition:
    """``--where``: a boolean expression over a record's fields, parsed once (Python syntax, no calls, no
    attribute access), evaluated on a pyarrow batch (``mask``) or on a JSON object (``__call__``)."""

    def __init__(self, text: str):
        self.text = text
        try:
            self.tree = ast.parse(text, mode="eval").body
        except SyntaxError as e:
            raise ValueError(f"--where {text!r}: not an expression ({e.msg})") from None
        self.fields: set[str] = set()
        self._check(self.tree)

    def _bad(self, node, why: str):
        raise ValueError(f"--where {self.text!r}: {why} at {ast.unparse(node)!r} (expected comparisons of a field "
                         f"with literals, joined by and / or / not, e.g. \"language == 'en' and score >= 3\")")

    def _check(self, node) -> None:
        if isinstance(node, ast.BoolOp):
            for v in node.values:
                self._check(v)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            self._check(node.operand)
        elif isinstance(node, ast.Compare):
            if len(node.ops) != 1 or type(node.ops[0]) not in _OPS:
                self._bad(node, "one comparison operator per term")
            if not isinstance(node.left, ast.Name):
                self._bad(node, "the left side must be a field name")
            self.fields.add(node.left.id)
            try:
                value = ast.literal_eval(node.comparators[0])
            except ValueError:
                self._bad(node, "the right side must be a literal")
            if isinstance(node.ops[0], (ast.In, ast.NotIn)) and not isinstance(value, (list, tuple, set)):
                self._bad(node, "'in' needs a list")
        else:
            self._bad(node, "unsupported term")

    def __call__(self, record: dict) -> bool:
        return bool(self._eval(self.tree, record.get))

    def _eval(self, node, get: Callable[[str], Any]):
        if isinstance(node, ast.BoolOp):
            vals = (self._eval(v, get) for v in node.values)
            return all(vals) if isinstance(node.op, ast.And) else any(vals)
        if isinstance(node, ast.UnaryOp):
            return not self._eval(node.operand, get)
        a, op, b = get(node.left.id), _OPS[type(node.ops[0])], ast.literal_eval(node.comparators[0])
        if op in ("in", "not in"):
            return (a in b) == (op == "in")
        if op in ("==", "!="):
            return (a == b) == (op == "==")
        try:
            return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]
        except TypeError:  # a missing field (None) or another type: the record does not match
            return False

    def mask(self, batch):
        """A boolean pyarrow array: which rows of ``batch`` match (a null comparison: no)."""
        import pyarrow.compute as pc

        def ev(node):
            if isinstance(node, ast.BoolOp):
                out = ev(node.values[0])
                for v in node.values[1:]:
                    out = pc.and_kleene(out, ev(v)) if isinstance(node.op, ast.And) else pc.or_kleene(out, ev(v))
                return out
            if isinstance(node, ast.UnaryOp):
                return pc.invert(ev(node.operand))
            col, op, v = batch.column(node.left.id), _OPS[type(node.ops[0])], ast.literal_eval(node.comparators[0])
            if op in ("in", "not in"):
                import pyarrow as pa
                hit = pc.is_in(col, value_set=pa.array(list(v)))
                return hit if op == "in" else pc.invert(hit)
            fn = {"==": pc.equal, "!=": pc.not_equal, "<": pc.less, "<=": pc.less_equal, ">": pc.greater,
                  ">=": pc.greater_equal}[op]
            return fn(col, v)
        return pc.fill_null(ev(self.tree), False)


# ---------------------------------------------------------------------------------------------- inputs
def _datasets_folder(path: str) -> list[str] | None:
    """The Arrow files of a ``save_to_disk`` folder (a Dataset, or every split of a DatasetDict), else None."""
    state = os.path.join(path, "state.json")
    if os.path.isfile(state):
        with open(state) as f:
            return [os.path.join(path, d["filename"]) for d in json.load(f)["_data_files"]]
    dd = os.path.join(path, "dataset_dict.json")
    if os.path.isfile(dd):
        with open(dd) as f:
            return [p for split in json.load(f)["splits"] for p in _datasets_folder(os.path.join(path, split)) or []]
    return None


def _remote_matches(pattern: str, retry: RetryPolicy) -> list[str]:
    fs = remote_fs(pattern)
    scheme = pattern.split("://", 1)[0] + "://"
    if not any(c in pattern for c in "*?["):
        with_retries(lambda _: fs.info(pattern), pattern, retry, "size check (HEAD)")
        return [pattern]
    hits = with_retries(lambda _: fs.glob(pattern), pattern, retry, "listing")
    return sorted(h if h.startswith(scheme) else scheme + h for h in hits)


def expand_inputs(patterns: Iterable[str], retry: RetryPolicy = RetryPolicy()) -> list[str]:
    """Files named by paths / globs / folders (recursively) / URLs, sorted within each pattern; clear errors if
    none. A ``datasets`` folder expands to its Arrow files."""
    patterns = list(patterns)
    if not patterns:
        raise ValueError("no input files given")
    files: list[str] = []
    for p in patterns:
        if is_remote(p):
            hits = _remote_matches(p, retry)
            if not hits:
                raise ValueError(f"input {p!r} matches no files")
            files.extend(hits)
            continue
        hits = []
        for h in sorted(glob.glob(p, recursive=True)) if any(c in p for c in "*?[") else [p]:
            if os.path.isdir(h):  # a datasets folder: its Arrow files; any other folder: every file in it
                ds = _datasets_folder(h)
                hits += ds if ds is not None else sorted(os.path.join(d, f) for d, _, fs in os.walk(h) for f in fs)
            else:
                hits.append(h)
        if not hits:
            raise ValueError(f"input {p!r} matches no files")
        for f in hits:
            if not os.path.isfile(f):
                raise ValueError(f"input {f!r}: not a readable file")
            if not os.access(f, os.R_OK):
                raise ValueError(f"input {f!r}: permission denied")
        files.extend(hits)
    return files


def input_size(path: str, retry: RetryPolicy = RetryPolicy()) -> int:
    if is_remote(path):
        return with_retries(lambda _: int(remote_fs(path).info(path)["size"]), path, retry, "size check (HEAD)")
    return os.path.getsize(path)


def _kind(path: str) -> tuple[str, str | None]:
    """(format, codec) of a file name: format "table" / "jsonl" / "text"."""
    base, ext = os.path.splitext(path)
    codec = CODECS.get(ext)
    if codec:
        ext = os.path.splitext(base)[1]
    if ext in TABLES and codec is None:
        return "table", None
    return ("jsonl" if ext in JSON_LINES else "text"), codec


def open_input(path: str):
    """A binary stream of the file's bytes, decompressed by its suffix (local or remote, streamed)."""
    raw = open_at(path)
    codec = _kind(path)[1]
    if codec is None:
        return raw
    import fsspec.compression
    try:
        # buffered: line iteration (zstandard's reader has no readline) and large reads from the codec
        return io.BufferedReader(fsspec.compression.compr[codec](raw, mode="rb"), buffer_size=1 << 20)
    except (ImportError, KeyError):  # .zst needs zstandard
        raw.close()
        raise ValueError(f"input {path!r}: reading {codec} needs the zstandard package (pip install zstandard)"
                         ) from None


def _decode(raw: bytes, cfg: TextConfig, stats: dict) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats["invalid_utf8"] = stats.get("invalid_utf8", 0) + 1
        if cfg.invalid_utf8 == "reject":
            return None
        return raw.decode("utf-8", errors="replace")


def _count(stats: dict, key: str, n: int = 1) -> None:
    stats[key] = stats.get(key, 0) + n


def _table_batches(path: str, cfg: TextConfig):
    """Record batches of the text column (and the --where columns) of a Parquet or Arrow file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = open_at(path)
    try:
        if path.endswith(".parquet"):
            # no pre-buffering, 1 MiB reads: memory stays at about one row group (pre-buffered reads grew with the
            # file: BENCHMARKS.md, build rates)
            reader = pq.ParquetFile(f, pre_buffer=False, buffer_size=1 << 20)
            names = reader.schema_arrow.names
        else:  # datasets' save_to_disk: Arrow IPC stream files (a file-format .arrow also opens here)
            try:
                reader = pa.ipc.open_stream(f)
            except pa.ArrowInvalid:
                f.seek(0)
                reader = pa.ipc.open_file(f)
            names = reader.schema.names
        want = [cfg.text_field] + sorted(cfg.condition.fields - {cfg.text_field} if cfg.condition else [])
        missing = [c for c in want if c not in names]
        if missing:
            what = "--text-field" if missing[0] == cfg.text_field else "--where"
            raise ValueError(f"input {path!r}: no column {missing[0]!r} (columns: {', '.join(names[:20])}; "
                             f"set {what})")
        if path.endswith(".parquet"):
            yield from reader.iter_batches(batch_size=BATCH_ROWS, columns=want)
        elif isinstance(reader, pa.ipc.RecordBatchFileReader):
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i).select(want)
        else:
            for batch in reader:
                yield batch.select(want)
    finally:
        f.close()


def _table_documents(path: str, cfg: TextConfig, stats: dict) -> Iterator[tuple[int, bytes | None]]:
    import pyarrow as pa

    row = 0
    for batch in _table_batches(path, cfg):
        col = batch.column(cfg.text_field)
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
                or pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)):
            raise ValueError(f"input {path!r}: column {cfg.text_field!r} holds {col.type}, not text")
        keep = None
        if cfg.condition is not None:
            keep = cfg.condition.mask(batch).to_pylist()
        # binary view: bytes, so invalid UTF-8 is counted and handled like every other format's
        values = col.cast(pa.large_binary() if "large" in str(col.type) else pa.binary()).to_pylist()
        for i, raw in enumerate(values):
            if keep is not None and not keep[i]:
                _count(stats, "filtered")
            else:
                yield row + i, raw
        row += len(values)


def _json_documents(path: str, f, cfg: TextConfig, stats: dict) -> Iterator[tuple[int, bytes | str | None]]:
    for i, raw in enumerate(f):
        if not raw.strip():
            continue
        line = _decode(raw, cfg, stats)
        if line is None:
            continue  # rejected (counted by _decode)
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i + 1}: invalid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or cfg.text_field not in rec:
            raise ValueError(f"{path}:{i + 1}: no field {cfg.text_field!r} (set the text field name with --text-field)")
        text = rec[cfg.text_field]
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{path}:{i + 1}: field {cfg.text_field!r} is not a string")
        if cfg.condition is not None and not cfg.condition(rec):
            _count(stats, "filtered")
            continue
        _count(stats, "bytes_in", len(raw))
        yield i, "" if text is None else text


def _corrupt_errors() -> tuple:
    errs = [OSError, EOFError, zlib.error, lzma.LZMAError]
    try:
        import zstandard
        errs.append(zstandard.ZstdError)
    except ImportError:  # pragma: no cover
        pass
    try:
        import pyarrow as pa
        errs.append(pa.ArrowException)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errs)


def iter_documents(files: list[str], cfg: TextConfig, stats: dict) -> Iterator[tuple[str, int, str]]:
    """Yield ``(source, doc_index_in_source, text)`` for every kept document; counters go into ``stats``:
    docs_in (records read), bytes_in (their raw bytes), empty, invalid_utf8, short, filtered."""
    corrupt = _corrupt_errors()
    for path in files:
        fmt, _ = _kind(path)
        try:
            if fmt == "table":
                docs: Iterable = _table_documents(path, cfg, stats)
                stream = None
            else:
                stream = open_input(path)
                docs = _json_documents(path, stream, cfg, stats) if fmt == "jsonl" else [(0, stream.read())]
            try:
                for i, raw in docs:
                    if isinstance(raw, str):  # JSON lines: decoded and counted there
                        text = raw
                    else:
                        raw = raw or b""  # a null cell: an empty document
                        text = _decode(raw, cfg, stats)
                        if text is None:
                            continue
                        _count(stats, "bytes_in", len(raw))
                    _count(stats, "docs_in")
                    if not text:
                        _count(stats, "empty")
                        continue
                    if len(text) < cfg.min_chars:
                        _count(stats, "short")
                        continue
                    yield path, i, text
            finally:
                if stream is not None:
                    stream.close()
        except ValueError:
            raise
        except corrupt as e:  # zlib / lzma / zstd / Arrow: a corrupt or truncated file
            if is_remote(path) and not isinstance(e, (zlib.error, lzma.LZMAError, EOFError)) \
                    and type(e).__module__.split(".")[0] not in ("zstandard", "pyarrow"):
                raise  # a network failure: the caller's retry loop decides
            raise ValueError(f"input {path!r}: unreadable ({type(e).__name__}: {e})") from None
