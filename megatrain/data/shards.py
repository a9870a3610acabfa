"""Tokenized shard format: webdataset tars of one sample per document, plus an ``index.json`` manifest.

Use:
    from megatrain.data.shards import Manifest, ShardWriter, read_shard
    man = Manifest.load("shards/")               # or ".../index.json"
    for key, tokens in read_shard(man.shard_url(0), vocab_size=man.vocab_size):
        ...                                      # tokens: 1-D uint16/uint32 numpy array of one document

Sample layout inside a tar (webdataset convention, key = file name up to the first dot):
    {key}.tokens.npy   1-D token ids, uint16 when vocab_size <= 65536, else uint32 (no EOD appended)
    {key}.meta.json    {"source": input file, "doc": index of the document in that file, "tokens": count}
Keys are 10-digit document numbers within the build unit (build.py; no dots): a shard and a key name one document.
Tar members have fixed mtime/owner so equal inputs give equal bytes.

Manifest (index.json), written last by megatrain/data/build.py (data_tools/build_shards.py, tests, benches):
    {"format": "megatrain-shards", "version": 1, "vocab_size": V, "dtype": "uint16",
     "special_tokens": {"unk": 0, "bos": 1, "eos": 2, "eod": 2, "pad": 3, "mask": 4},
     "tokenizer_sha256": "...", "shards": [{"url": "shard-000000.tar", "docs": 12, "tokens": 34567, "bytes": 69632}],
     "docs": total, "tokens": total, "stats": {...build counters...}}
"bytes" is the shard file's size, checked before training (check_local_shards); 0 or absent (older manifests):
not checked until read.
Optional (written by build_shards, absent in older manifests): "doc_bytes" (UTF-8 bytes of each document, in
manifest order), "token_bytes" (UTF-8 bytes each token id decodes to: bits per byte, megatrain/eval) and "split"
(the train/held-out split this folder is one side of: data_tools/build_shards.py --heldout-fraction).
Shard urls are relative to the manifest's folder unless they contain "://" or start with "pipe:" or "/"; the
manifest itself may be local or remote (https://, s3://: remote.py), and relative names in a remote manifest
resolve against its URL's folder. Remote shards are read by ranges (streamed) and a transient failure restarts the
read at the first tar member of the next unread sample (read_shard), so no sample is lost or read twice.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import tarfile
import zlib
from typing import Iterator

import numpy as np

from megatrain.io import atomic_file
from megatrain.data.remote import (DataError, RetryPolicy, attempts, is_remote, is_url, open_at, parent, read_bytes,
                                   resolve, root_cause, stat_size, transient)

FORMAT = "megatrain-shards"
VERSION = 2  # 2: special_tokens holds the tokenizer's own ids (only eod required); written only when a version 1
# manifest could not say it (a special missing), so a megatrain-tokenizer build stays version 1, byte for byte
TOKENS_EXT = "tokens.npy"
META_EXT = "meta.json"
MANIFEST_NAME = "index.json"
REQUIRED_SPECIALS = {1: ("eod", "eos", "pad", "mask", "bos", "unk"), 2: ("eod",)}  # by manifest version
log = logging.getLogger("megatrain.data")


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id of a vocabulary of this size."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def doc_key(doc_index: int) -> str:
    return f"{doc_index:010d}"


@dataclasses.dataclass
class ShardInfo:
    url: str
    docs: int
    tokens: int
    bytes: int = 0


@dataclasses.dataclass
class Manifest:
    shards: list[ShardInfo]
    vocab_size: int
    special_tokens: dict[str, int]
    tokenizer_sha256: str = ""
    dtype: str = "uint16"
    stats: dict = dataclasses.field(default_factory=dict)
    doc_bytes: list = dataclasses.field(default_factory=list)    # optional, see the module docstring
    token_bytes: list = dataclasses.field(default_factory=list)
    split: dict = dataclasses.field(default_factory=dict)
    root: str = ""  # folder (path or URL) the relative shard urls are resolved against (not saved)

    def __post_init__(self):
        if self.vocab_size <= 0:
            raise DataError(f"manifest: vocab_size must be positive, got {self.vocab_size}")
        for name, tid in self.special_tokens.items():
            if not 0 <= int(tid) < self.vocab_size:
                raise DataError(f"manifest: special token {name}={tid} outside vocab of size {self.vocab_size}")
        for s in self.shards:
            if s.docs < 0 or s.tokens < 0:
                raise DataError(f"manifest: shard {s.url} has negative counts")

    @property
    def docs(self) -> int:
        return sum(s.docs for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def shard_url(self, i: int) -> str:
        url = self.shards[i].url
        return url if not self.root else resolve(self.root, url)

    def model_token_ids(self) -> dict[str, int | None]:
        """The model config's pad/bos/eos ids this data asks for: the tokenizer's own (None where it has none).
        Empty for a stream of bare shard urls (no tokenizer recorded: no "eos")."""
        if "eos" not in self.special_tokens:
            return {}
        return {f"{k}_token_id": self.special_tokens.get(k) for k in ("pad", "bos", "eos")}

    def fingerprint(self) -> str:
        """Hash of everything that decides the token stream (used to refuse resuming on other data)."""
        body = json.dumps([[s.url, s.docs, s.tokens] for s in self.shards] + [self.vocab_size, self.special_tokens],
                          sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        version = 1 if all(k in self.special_tokens for k in REQUIRED_SPECIALS[1]) else VERSION
        return {"format": FORMAT, "version": version, "vocab_size": self.vocab_size, "dtype": self.dtype,
                "special_tokens": dict(self.special_tokens), "tokenizer_sha256": self.tokenizer_sha256,
                "docs": self.docs, "tokens": self.tokens, "stats": self.stats,
                "shards": [dataclasses.asdict(s) for s in self.shards],
                **{k: getattr(self, k) for k in ("doc_bytes", "token_bytes", "split") if getattr(self, k)}}

    def save(self, path: str) -> None:
        """Atomic write (megatrain.io), so a reader never sees half a manifest."""
        with atomic_file(path) as f:
            json.dump(self.to_json(), f, indent=1, sort_keys=True)
            f.write("\n")

    @classmethod
    def load(cls, path: str, retry: RetryPolicy = RetryPolicy()) -> "Manifest":
        """A local file or folder, or an https:// / s3:// URL of an index.json (or of its folder, ending in /)."""
        path = os.fspath(path)
        if is_remote(path):
            if path.endswith("/"):
                path += MANIFEST_NAME
        elif os.path.isdir(path):
            path = os.path.join(path, MANIFEST_NAME)
        try:
            d = json.loads(read_bytes(path, retry))
        except FileNotFoundError:
            raise DataError(f"manifest {path}: file not found") from None
        except DataError as e:
            raise DataError(f"manifest {e}") from None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"manifest {path}: unreadable ({e})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise DataError(f"manifest {path}: not a {FORMAT} manifest (format={d.get('format') if isinstance(d, dict) else None!r})")
        if d.get("version") not in REQUIRED_SPECIALS:
            raise DataError(f"manifest {path}: unsupported version {d.get('version')!r} (expected 1 or {VERSION})")
        need = REQUIRED_SPECIALS[d["version"]]
        missing = [k for k in need if k not in d.get("special_tokens", {})]
        if missing:
            raise DataError(f"manifest {path}: special_tokens lacks {missing} (need {list(need)})")
        try:
            shards = [ShardInfo(url=s["url"], docs=int(s["docs"]), tokens=int(s["tokens"]), bytes=int(s.get("bytes", 0)))
                      for s in d["shards"]]
            return cls(shards=shards, vocab_size=int(d["vocab_size"]),
                       special_tokens={k: int(v) for k, v in d["special_tokens"].items()},
                       tokenizer_sha256=d.get("tokenizer_sha256", ""), dtype=d.get("dtype", "uint16"),
                       stats=d.get("stats", {}), doc_bytes=list(d.get("doc_bytes", [])),
                       token_bytes=list(d.get("token_bytes", [])), split=dict(d.get("split", {})), 
                       root=parent(path))
        except KeyError as e:
            raise DataError(f"manifest {path}: missing key {e}") from None


def check_local_shards(manifest: Manifest, on_mismatch=None, retry: RetryPolicy = RetryPolicy()) -> None:
    """Before any read: every shard exists, is readable and has the byte size the manifest records.

    No shard is read: a stat per local shard, a HEAD (https) / HeadObject (s3) per remote one. ``pipe:`` shards
    and entries without a recorded size (manifests from before sizes were recorded, streams built from urls) are
    checked when read instead. A size mismatch raises DataError, or goes to ``on_mismatch(message)`` when given
    (skip_corrupt); a missing or unreachable file always raises."""
    for i, info in enumerate(manifest.shards):
        url = manifest.shard_url(i)
        if is_url(url) and not is_remote(url):
            continue
        if is_remote(url):
            if not info.bytes:
                continue
            try:
                size = stat_size(url, retry)
            except DataError as e:
                raise DataError(f"shard {e} (listed in the manifest)") from None
        else:
            try:
                size = os.path.getsize(url)
            except FileNotFoundError:
                raise DataError(f"shard {url}: file not found (listed in the manifest)") from None
            except OSError as e:
                raise DataError(f"shard {url}: unreadable ({e.strerror})") from None
            if not os.access(url, os.R_OK):
                raise DataError(f"shard {url}: permission denied (not readable)")
        if info.bytes and size != info.bytes:
            msg = (f"shard {url}: {size} bytes on disk but the manifest records {info.bytes} bytes "
                   f"(truncated or rewritten after the build)")
            if on_mismatch is None:
                raise DataError(msg)
            on_mismatch(msg)


# ---------------------------------------------------------------------------------------------- writing
def _tar_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # fixed metadata: reproducible bytes
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


def encode_sample(tokens: np.ndarray, meta: dict) -> tuple[bytes, bytes]:
    buf = io.BytesIO()
    np.save(buf, tokens, allow_pickle=False)
    return buf.getvalue(), json.dumps(meta, sort_keys=True).encode()


class ShardWriter:
    """Writes ``shard-NNNNNN.tar`` files into ``out_dir``, starting a new one once ``shard_bytes`` is reached.

    A document is never split: one larger than the budget becomes a (big) shard of its own.
    Files are written through megatrain.io.atomic_file (a hidden temporary renamed when closed), so a killed build
    leaves no half shard behind.
    """

    def __init__(self, out_dir: str, shard_bytes: int, dtype: np.dtype, on_close=None):
        if shard_bytes <= 0:
            raise ValueError(f"shard size must be positive, got {shard_bytes}")
        self.out_dir, self.shard_bytes, self.dtype = out_dir, shard_bytes, np.dtype(dtype)
        self.shards: list[ShardInfo] = []
        self._tar = None
        self._file = None  # the open megatrain.io.atomic_file of the current shard
        self._cur: ShardInfo | None = None
        self.on_close = on_close  # called with each finished shard's file name (build.py uploads it)

    def write(self, key: str, tokens: np.ndarray, meta: dict) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        npy, js = encode_sample(np.asarray(tokens, dtype=self.dtype), meta)
        size = len(npy) + len(js) + 2048  # payloads + two tar headers (512 each) + padding
        if self._cur is not None and self._cur.docs > 0 and self._cur.bytes + size > self.shard_bytes:
            self._close_current()
        if self._cur is None:
            name = f"shard-{len(self.shards):06d}.tar"
            self._file = contextlib.ExitStack()
            f = self._file.enter_context(atomic_file(os.path.join(self.out_dir, name), "wb"))
            self._tar = tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT)
            self._cur = ShardInfo(url=name, docs=0, tokens=0, bytes=0)
        _tar_member(self._tar, f"{key}.{TOKENS_EXT}", npy)
        _tar_member(self._tar, f"{key}.{META_EXT}", js)
        self._cur.docs += 1
        self._cur.tokens += int(len(tokens))
        self._cur.bytes += size

    def _close_current(self) -> None:
        self._tar.close()
        self._file.close()  # renames the finished shard into place
        path = os.path.join(self.out_dir, self._cur.url)
        self._cur.bytes = os.path.getsize(path)
        self.shards.append(self._cur)
        self._tar, self._cur = None, None
        if self.on_close is not None:
            self.on_close(self.shards[-1].url)

    def close(self) -> list[ShardInfo]:
        if self._cur is not None:
            self._close_current()
        return self.shards


# ---------------------------------------------------------------------------------------------- reading
def _decode_tokens(url: str, key: str, payload: bytes | None, vocab_size: int) -> np.ndarray:
    if payload is None:
        raise DataError(f"shard {url} sample {key}: missing {TOKENS_EXT}")
    try:
        arr = np.load(io.BytesIO(payload), allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"shard {url} sample {key}: corrupt {TOKENS_EXT} ({e})") from None
    if arr.ndim != 1 or arr.dtype.kind not in "ui":
        raise DataError(f"shard {url} sample {key}: {TOKENS_EXT} must be a 1-D integer array, got {arr.dtype}{list(arr.shape)}")
    if arr.size and (int(arr.max()) >= vocab_size or int(arr.min()) < 0):
        bad = int(arr.max()) if int(arr.max()) >= vocab_size else int(arr.min())
        raise DataError(f"shard {url} sample {key}: token id {bad} outside vocab of size {vocab_size}")
    return arr


COMPRESSED = (".gz", ".tgz", ".bz2", ".xz", ".zst")
TAR_BUFSIZE = 64 << 10  # tarfile's read size in stream mode: a failed read loses at most this much progress


def read_shard(url: str, vocab_size: int, skip_corrupt: bool = False,
               on_skip=None, retry: RetryPolicy = RetryPolicy()) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(key, tokens)`` for every sample of one shard, in file order.

    Errors raise DataError naming the shard and sample key. With ``skip_corrupt`` a bad sample is passed to
    ``on_skip(message)`` instead and reading continues (a corrupt/truncated tar ends the shard there).
    Remote shards (https://, s3://): a transient failure (remote.transient) waits and reopens the shard at the
    first tar member of the next sample not yet yielded (a compressed shard: from the start, skipping the samples
    already yielded), so the caller sees every sample once; after ``retry.retries`` retries: one DataError naming
    the URL, the status and the retry count.
    """
    def fail(msg: str):
        if not skip_corrupt:
            raise DataError(msg)
        if on_skip is not None:
            on_skip(msg)

    def decoded(key, files):
        try:
            return _decode_tokens(url, key, files.get(TOKENS_EXT), vocab_size)
        except DataError as e:
            fail(str(e))
            return None

    compressed = url.endswith(COMPRESSED)
    restart, yielded = 0, 0  # byte offset of the next unread sample; samples handed out
    where = lambda: f" after {yielded} samples; resuming at byte {0 if compressed else restart}"  # noqa: E731
    for attempt in attempts(f"shard {url}", retry, "read", not_found="file not found", progress=where):
        with attempt:
            key, files, done, stream = None, {}, 0, None  # done: samples completed in this pass
            skip = yielded if compressed else 0           # a compressed shard restarts at 0: skip what was handed out
            try:
                stream = open_at(url, 0 if compressed else restart)
                base = 0 if compressed else restart
                with tarfile.open(fileobj=stream, mode="r|*" if compressed or not restart else "r|",
                                  bufsize=TAR_BUFSIZE) as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        k, _, ext = member.name.rsplit("/", 1)[-1].partition(".")
                        if k != key:
                            if key is not None:
                                done += 1
                                if done > skip:
                                    yielded += 1
                                    tokens = decoded(key, files)
                                    if tokens is not None:
                                        yield key, tokens
                            key, files = k, {}
                            if not compressed:
                                restart = base + member.offset  # this sample's first header: a retry resumes here
                        files[ext] = tar.extractfile(member).read()
                    if key is not None and done + 1 > skip:
                        yielded += 1
                        tokens = decoded(key, files)
                        if tokens is not None:
                            yield key, tokens
            except (DataError, GeneratorExit):
                raise
            except Exception as exc:  # noqa: BLE001 - a network hiccup goes to the retry loop, bad data ends here
                e = root_cause(exc)
                remote_fault = is_remote(url) and (transient(e) or not isinstance(
                    e, (tarfile.TarError, EOFError, zlib.error)))
                if isinstance(e, FileNotFoundError) or remote_fault:
                    raise
                fail(f"shard {url}: corrupt or truncated tar after sample {key} ({type(e).__name__}: {e})")
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    try:
                        close()
                    except Exception:  # noqa: BLE001 - a pipe: opener may complain about its exit status on close
                        pass
