"""Remote byte I/O for megatrain's data: local paths, ``pipe:`` commands, ``https://`` and ``s3://`` URLs, read
(shards, manifests, raw corpora) and written (build_shards' --out), with the one retry loop, and ``DataError``.

Use:
    from megatrain.data.remote import RetryPolicy, open_at, read_bytes, stat_size, resolve
    f = open_at("s3://bucket/corpus/shard-000001.tar", offset=0)   # a seekable, streaming binary file
    man_text = read_bytes("https://host/corpus/index.json", RetryPolicy(retries=5, backoff_s=1.0))
    resolve("https://host/corpus", "shard-000001.tar")   # -> https://host/corpus/shard-000001.tar

Remote files go through fsspec (``http``/``https``: aiohttp; ``s3``: s3fs/botocore), which reads by ranges: a
shard is streamed block by block, never downloaded whole, and a read can restart at any byte offset (shards.py
restarts at the first tar member of the next unread sample). S3 credentials and endpoint come from the standard
places botocore reads (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE, ~/.aws/config and credentials,
AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3 for S3-compatible stores). ``pipe:`` and other webdataset URLs go through
webdataset's gopen (no restart: a pipe cannot seek).

Failures: ``transient(e)`` decides what is retried -- connection errors (refused, reset, dropped mid-body),
timeouts, HTTP 5xx and 429, S3 throttling/5xx codes. A 4xx (403, 404) is not retried: it is a wrong URL or wrong
credentials, and waiting does not fix it. ``attempts`` is the one retry loop (``with_retries`` wraps a call in it;
read_shard's resuming reads and build.py's units run inside it): it waits backoff_s * 2**k (k = 0, 1, ...) between
tries and after ``retries`` retries raises one DataError naming the URL, the status and the retry count.
``is_url``: anything that is not a plain local path (remote, ``pipe:``, other webdataset schemes) -- the one test
config, evaluation and the loader use.
Writes (build_shards' --out): ``write_bytes`` / ``upload`` (one whole object per PUT), ``move`` (rename, or S3's
server-side copy), ``listdir``, ``exists``, ``remove_tree``.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
import tarfile
import time
from typing import Callable, TypeVar

log = logging.getLogger("megatrain.data")
T = TypeVar("T")
REMOTE_SCHEMES = ("http://", "https://", "s3://")
# botocore error codes that mean "slow down / try again" rather than "wrong request"
BLOCK_SIZE = 8 << 20  # bytes per range request: a shard streams in blocks of this size (a retry refetches one)
THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                  "RequestTimeout", "InternalError", "ServiceUnavailable", "503", "500"}


class DataError(ValueError):
    """Bad data or an unreadable source: names the shard / URL (and sample key) at fault."""


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    retries: int = 5          # retries after the first failure (0 = fail at once)
    backoff_s: float = 1.0    # first wait; doubles each retry (1, 2, 4, 8, 16 s by default)
    max_backoff_s: float = 60.0


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_SCHEMES)


def is_url(url: str) -> bool:
    """Anything that is not a plain local path (remote, pipe:, other webdataset schemes)."""
    return "://" in url or url.startswith("pipe:")


def parent(path_or_url: str) -> str:
    """The folder of a manifest path or URL (what its relative shard names resolve against)."""
    if is_remote(path_or_url):
        return posixpath.dirname(path_or_url)
    if is_url(path_or_url):  # a pipe: command has no folder: its shard names must be absolute paths or URLs
        return ""
    return os.path.dirname(os.path.abspath(path_or_url))


def resolve(folder: str, name: str) -> str:
    """A shard name from a manifest in ``folder`` (a path or URL): absolute names and URLs stay as they are."""
    if is_url(name) or os.path.isabs(name):
        return name
    return posixpath.join(folder, name) if is_remote(folder) else os.path.join(folder, name)


def status_of(e: BaseException) -> str:
    """A short status for error lines: the HTTP status, the S3 error code, or the exception's type."""
    if isinstance(e, FileNotFoundError):
        return "not found"
    if isinstance(e, PermissionError):
        return "permission denied"
    for attr in ("status", "code", "status_code"):
        v = getattr(e, attr, None)
        if isinstance(v, int):
            return f"HTTP {v}"
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        err = resp.get("Error", {})
        code = err.get("Code")
        http = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"S3 {code}" + (f" (HTTP {http})" if http else "")
    return type(e).__name__


def transient(e: BaseException) -> bool:
    """Worth retrying: the network or the server hiccuped; not: the request itself is wrong (4xx, not found)."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    for attr in ("status", "status_code"):
        v = getattr(e, attr, None)
        if isinstance(v, int):
            return v >= 500 or v == 429
    resp = getattr(e, "response", None)
    if isinstance(resp, dict) and "Error" in resp:
        code = str(resp["Error"].get("Code", ""))
        http = resp.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return code in THROTTLE_CODES or http >= 500 or http == 429
    try:
        import aiohttp
        if isinstance(e, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
            return True
    except ImportError:  # pragma: no cover - fsspec's http needs aiohttp; without it there are no http errors
        pass
    try:
        import botocore.exceptions as bx
        if isinstance(e, (bx.ConnectionError, bx.HTTPClientError, bx.ReadTimeoutError, bx.ResponseStreamingError)):
            return True
    except ImportError:  # pragma: no cover
        pass
    # a body cut short shows up as a short read inside tarfile; a reset as ConnectionError / OSError
    return isinstance(e, (ConnectionError, TimeoutError, EOFError, tarfile.ReadError, OSError))


def root_cause(e: BaseException) -> BaseException:
    """fsspec and tarfile wrap the network error (fsspec reports a failed HEAD or a refused connection as
    FileNotFoundError from it): classify by the innermost error that has a status, else by the deepest one
    under a FileNotFoundError, else by ``e`` itself."""
    chain, seen = [e], e
    while (seen.__cause__ or seen.__context__) is not None and len(chain) < 20:
        seen = seen.__cause__ or seen.__context__
        chain.append(seen)
    for x in chain[1:]:
        if getattr(x, "status", None) is not None or isinstance(getattr(x, "response", None), dict):
            return x
    if isinstance(e, FileNotFoundError) and len(chain) > 1:
        return chain[-1]
    return e


class _Attempt:
    """One try of a retry loop (``attempts``): its ``with`` block swallows a transient failure (after waiting) so
    the loop tries again, and turns anything else, or the last failure, into one DataError."""

    def __init__(self, loop: "attempts", number: int):
        self.loop, self.number = loop, number

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None:
            self.loop.done = True
            return False
        if isinstance(exc, ValueError) or not isinstance(exc, Exception):
            return False  # bad input (DataError included) already says what it is; waiting does not fix it
        inner = root_cause(exc)
        what, label, policy = self.loop.what, self.loop.label, self.loop.policy
        if isinstance(inner, FileNotFoundError) and self.loop.not_found:
            raise DataError(f"{label}: {self.loop.not_found}") from None
        if not transient(inner) or self.number >= policy.retries:
            tried = f" after {self.number} retries" if self.number else ""
            raise DataError(f"{label}: {what} failed{tried} ({status_of(inner)}: "
                            f"{str(inner) or type(inner).__name__})") from None
        wait = min(policy.backoff_s * 2 ** self.number, policy.max_backoff_s)
        log.warning("%s: %s failed%s (%s: %s); retry %d/%d in %.1fs", label, what, self.loop.progress(),
                    status_of(inner), inner, self.number + 1, policy.retries, wait)
        time.sleep(wait)
        return True  # swallowed: the loop makes the next attempt


class attempts:
    """The one retry loop of megatrain's remote I/O, usable around plain code and inside generators alike:

        for attempt in attempts("s3://b/k", policy, "read"):
            with attempt:
                ...            # raise on failure; attempt.number counts the retries so far

    A transient failure (``transient`` of its root cause) waits backoff_s * 2**k (k = 0, 1, ...; at most
    max_backoff_s) and runs the block again; a permanent one, or the failure after ``policy.retries`` retries,
    raises one DataError "{label}: {what} failed[ after N retries] ({status}: {error})". ``not_found``: the
    message for a missing file instead (a 404 / NoSuchKey / no such path). ``progress``: a callable giving text
    for the warning (e.g. where a read resumes)."""

    def __init__(self, label: str, policy: RetryPolicy, what: str = "read", not_found: str = "",
                 progress: Callable[[], str] = lambda: ""):
        self.label, self.policy, self.what, self.not_found, self.progress = label, policy, what, not_found, progress
        self.done = False

    def __iter__(self):
        number = 0
        while not self.done:
            yield _Attempt(self, number)
            number += 1


def with_retries(fn: Callable[[int], T], url: str, policy: RetryPolicy, what: str = "read") -> T:
    """``fn(attempt)`` until it succeeds, through ``attempts`` (transient failures wait and retry)."""
    for attempt in attempts(url, policy, what):
        with attempt:
            return fn(attempt.number)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def remote_fs(url: str):
    """The fsspec filesystem of a remote URL (S3 endpoint from AWS_ENDPOINT_URL when set)."""
    try:
        import fsspec
        kw = {}
        if url.startswith("s3://") and os.environ.get("AWS_ENDPOINT_URL"):
            # named explicitly: fsspec caches filesystems by their arguments, and a cached S3FileSystem keeps the
            # endpoint it was made with, so a changed AWS_ENDPOINT_URL would otherwise go unseen in this process
            kw["client_kwargs"] = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
        return fsspec.core.url_to_fs(url, **kw)[0]
    except ImportError as e:  # fsspec's http needs aiohttp, s3:// needs s3fs: say which package, not a traceback
        raise DataError(f"{url}: reading {url.split('://')[0]}:// needs {e.name or 'a package'} "
                        f"(pip install fsspec aiohttp s3fs)") from None


def open_at(url: str, offset: int = 0):
    """A binary file positioned at ``offset``: local files and fsspec URLs seek; pipe:/others start at 0 only."""
    if is_remote(url):
        f = remote_fs(url).open(url, "rb", block_size=BLOCK_SIZE)
        if offset:
            f.seek(offset)
        return f
    if not is_url(url):
        if not os.path.exists(url):
            raise FileNotFoundError(url)
        f = open(url, "rb")
        f.seek(offset)
        return f
    if offset:
        raise DataError(f"{url}: cannot restart a read in the middle (only local files, http(s):// and s3:// can)")
    from webdataset import gopen  # pipe: and other webdataset schemes exactly as webdataset resolves them
    return gopen(url, "rb")


def read_bytes(url: str, policy: RetryPolicy) -> bytes:
    """A whole (small) file, e.g. a manifest, with retries (remote) or through webdataset's gopen (pipe:)."""
    if is_url(url) and not is_remote(url):
        stream = open_at(url)
        try:
            return stream.read()
        finally:
            stream.close()
    if not is_remote(url):
        with open(url, "rb") as f:
            return f.read()

    def once(_):
        with remote_fs(url).open(url, "rb") as f:
            return f.read()
    return with_retries(once, url, policy, "read")


def stat_size(url: str, policy: RetryPolicy) -> int:
    """Byte size without reading: os.stat locally, HEAD (http) / HeadObject (s3) remotely."""
    if not is_remote(url):
        return os.path.getsize(url)
    return with_retries(lambda _: int(remote_fs(url).info(url)["size"]), url, policy, "size check (HEAD)")


# ---------------------------------------------------------------------------------------------- writing
# What data_tools/build_shards.py writes to its --out (a local folder or an s3:// prefix). Every remote write is one
# whole-object PUT (S3 has no half objects), retried with the same policy as reads; local files go through
# megatrain.io.atomic_file (a temporary renamed into place).
def join(folder: str, *names: str) -> str:
    return posixpath.join(folder, *names) if is_remote(folder) else os.path.join(folder, *names)


def write_bytes(url: str, data: bytes, policy: RetryPolicy = RetryPolicy()) -> None:
    """The whole file at once: a reader sees the old file, or none, or the new one."""
    if not is_remote(url):
        from megatrain.io import atomic_write
        os.makedirs(os.path.dirname(os.path.abspath(url)), exist_ok=True)
        atomic_write(url, data)
        return
    with_retries(lambda _: remote_fs(url).pipe_file(url, data), url, policy, "write")


def upload(local: str, url: str, policy: RetryPolicy = RetryPolicy()) -> None:
    """A finished local file to ``url`` (one PUT / multipart upload: the object appears whole or not at all)."""
    with_retries(lambda _: remote_fs(url).put_file(local, url), url, policy, "upload")


def move(src: str, dst: str, policy: RetryPolicy = RetryPolicy()) -> None:
    """Rename (local) or server-side copy + delete (S3: no bytes through this machine)."""
    if not is_remote(src):
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        os.replace(src, dst)
        return
    with_retries(lambda _: remote_fs(src).mv(src, dst), src, policy, "move")


def exists(url: str, policy: RetryPolicy = RetryPolicy()) -> bool:
    if not is_remote(url):
        return os.path.exists(url)
    return with_retries(lambda _: remote_fs(url).exists(url), url, policy, "existence check (HEAD)")


def listdir(url: str, policy: RetryPolicy = RetryPolicy()) -> list[str]:
    """Names directly under a folder / prefix ([] when there is none)."""
    if not is_remote(url):
        return sorted(os.listdir(url)) if os.path.isdir(url) else []

    def ls(_):
        try:
            return [posixpath.basename(p.rstrip("/")) for p in remote_fs(url).ls(url.rstrip("/"), detail=False)]
        except FileNotFoundError:
            return []
    return sorted(with_retries(ls, url, policy, "listing"))


def remove_tree(url: str, policy: RetryPolicy = RetryPolicy()) -> None:
    if not is_remote(url):
        import shutil
        shutil.rmtree(url, ignore_errors=True)
        return

    def rm(_):
        try:
            remote_fs(url).rm(url.rstrip("/"), recursive=True)
        except FileNotFoundError:
            pass
    with_retries(rm, url, policy, "delete")
