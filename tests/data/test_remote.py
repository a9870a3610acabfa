"""Remote shards on real loopback servers: an HTTP file server with injected faults, and moto's S3. The windows
equal the local run's; transient faults retry and resume the shard at the right sample; persistent ones end in one
error line naming the URL, the status and the retries; the size check runs remotely before any read.

Run: PYTHONPATH=. python -m pytest -q tests/data/test_remote.py
"""
import json
import logging
import os
import shutil

import pytest
import torch

from megatrain.data import DataError, ShardStream
from megatrain.data import remote, shards
from megatrain.data.remote import RetryPolicy
from megatrain.parallel.env import free_port
from tests.data.servers import Faults, http_server, s3_server, upload
from tests.data.test_elastic import rows

L = 16
FAST = RetryPolicy(retries=3, backoff_s=0.01)


@pytest.fixture(scope="module")
def local(synthetic):
    man, _ = synthetic
    s = ShardStream(man, seq_len=L, seed=4, loop=True)
    return os.path.dirname(man), rows(s, s.global_windows + 5)


def test_http_with_faults_gives_the_local_windows(local, monkeypatch, caplog):
    folder, ref = local
    # small reads and range requests (real shards are 256 MB): a connection dropped in the middle of a shard
    monkeypatch.setattr(remote, "BLOCK_SIZE", 1024)
    monkeypatch.setattr(shards, "TAR_BUFSIZE", 512)
    with http_server(folder) as (url, faults):
        faults.add("index.json", "503")
        names = sorted(n for n in os.listdir(folder) if n.endswith(".tar"))
        faults.add(names[1], "503", "503")          # answer 503 twice
        faults.add(names[2], "drop@4096")           # the connection breaks off half way through the shard
        with caplog.at_level(logging.WARNING, logger="megatrain.data"):
            s = ShardStream(url + "index.json", seq_len=L, seed=4, loop=True, retry=FAST)
            got = rows(s, 40)
        assert got == ref[:40]
        assert ("index.json", "503") in faults.hits and faults.hits.count((names[1], "503")) == 2
        assert (names[2], "drop") in faults.hits
        resumed = [m for m in caplog.messages if names[2] in m and "retry 1/3" in m]
        assert resumed and " at byte 0" not in resumed[0]  # restarted mid-shard, at a sample's first header
        # the sizes were checked by HEAD before the first shard was read (by range)
        first_get = next(i for i, r in enumerate(faults.requests) if r[1].endswith(".tar") and r[2])
        assert {r[1] for r in faults.requests[:first_get] if r[0] == "HEAD"} >= set(names)


def test_http_persistent_failure_is_one_line(local):
    folder, _ = local
    names = sorted(n for n in os.listdir(folder) if n.endswith(".tar"))
    with http_server(folder) as (url, faults):
        faults.add(names[0], *["503"] * 10)
        with pytest.raises(DataError) as e:
            ShardStream(url + "index.json", seq_len=L, seed=4, loop=True, retry=FAST)
        msg = str(e.value)
        assert url + names[0] in msg and "HTTP 503" in msg and "3 retries" in msg and "\n" not in msg
        faults.queue.clear()
        faults.add(names[0], "403", "403")  # fsspec asks HEAD, then GET
        with pytest.raises(DataError, match="HTTP 403") as e:  # not transient: no retries
            ShardStream(url + "index.json", seq_len=L, seed=4, loop=True, retry=FAST)
        assert "retries" not in str(e.value)
    nobody = f"http://127.0.0.1:{free_port()}/index.json"  # nothing listens there
    with pytest.raises(DataError, match=rf"manifest {nobody}: read failed after 1 retries \(ConnectionRefused"):
        ShardStream(nobody, seq_len=L, seed=4, loop=True, retry=RetryPolicy(1, 0.01))


def test_remote_size_check_before_any_read(local, tmp_path):
    folder, _ = local
    shutil.copytree(folder, tmp_path / "s")
    index = tmp_path / "s" / "index.json"
    d = json.loads(index.read_text())
    d["shards"][3]["bytes"] += 512
    index.write_text(json.dumps(d))
    with http_server(tmp_path / "s") as (url, faults):
        with pytest.raises(DataError, match=r"shard-000003\.tar: .* bytes on disk but the manifest records"):
            ShardStream(url + "index.json", seq_len=L, seed=4, loop=True, retry=FAST)
        assert not [r for r in faults.requests if r[1].endswith(".tar") and r[2]]


def test_s3_gives_the_local_windows(local):
    folder, ref = local
    with s3_server():
        upload(folder, "s3://corpus/v1/")
        s = ShardStream("s3://corpus/v1/index.json", seq_len=L, seed=4, loop=True, num_workers=2, retry=FAST)
        assert s.manifest.shard_url(0).startswith("s3://corpus/v1/shard-")  # names resolve against the manifest
        assert rows(s, len(ref)) == ref
        with pytest.raises(DataError, match="s3://corpus/v2/index.json"):
            ShardStream("s3://corpus/v2/index.json", seq_len=L, seed=4, loop=True, retry=FAST)


def test_s3_with_throttling_and_a_dropped_read_gives_the_local_windows(local, monkeypatch):
    """S3 answering SlowDown (throttling) and a GET cut off half way, through a proxy in front of moto: the windows
    are the local run's, and the read after the cut starts mid-shard, not at byte 0. (botocore and s3fs retry these
    themselves before megatrain's RetryPolicy sees them; either way no window is lost or repeated.)"""
    folder, ref = local
    monkeypatch.setattr(remote, "BLOCK_SIZE", 1024)   # small range reads, as in the HTTP test
    monkeypatch.setattr(shards, "TAR_BUFSIZE", 512)
    faults = Faults()
    with s3_server(faults=faults):
        upload(folder, "s3://corpus/v1/")
        names = sorted(n for n in os.listdir(folder) if n.endswith(".tar"))
        faults.add(names[1], "503", "503", "503")
        faults.add(names[2], "drop@4096")
        s = ShardStream("s3://corpus/v1/index.json", seq_len=L, seed=4, loop=True, retry=FAST)
        got = rows(s, 40)
    assert got == ref[:40]
    assert faults.hits.count((names[1], "503")) == 3 and (names[2], "drop") in faults.hits
    gets = [int(r[2][6:].partition("-")[0]) for r in faults.requests if r[:2] == ("GET", names[2]) and r[2]]
    cut = next(i for i, start in enumerate(gets) if start >= 4096)  # the GET the proxy cut off
    assert len(gets) > cut + 1 and gets[cut + 1] > 0, gets


def test_s3_persistent_throttling_is_one_line(local, monkeypatch):
    folder, _ = local
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries off: megatrain's RetryPolicy decides
    faults = Faults()
    with s3_server(faults=faults):
        upload(folder, "s3://corpus/v1/")
        name = sorted(n for n in os.listdir(folder) if n.endswith(".tar"))[0]
        faults.add(name, *["503"] * 200)
        with pytest.raises(DataError) as e:
            rows(ShardStream("s3://corpus/v1/index.json", seq_len=L, seed=4, loop=True, retry=FAST), 3)
    msg = str(e.value)
    assert "\n" not in msg and f"s3://corpus/v1/{name}" in msg and "HTTP 503" in msg and "3 retries" in msg, msg
    assert faults.hits.count((name, "503")) == 4  # the first try and 3 retries: the status came from the proxy


def test_what_is_retried():
    """Throttling, 5xx and dropped connections are retried; 4xx and missing files are not (waiting cannot fix them)."""
    import aiohttp
    from botocore.exceptions import ClientError

    def s3(code, http):
        return ClientError({"Error": {"Code": code, "Message": "x"}, "ResponseMetadata": {"HTTPStatusCode": http}},
                           "GetObject")

    retried = [s3("SlowDown", 503), s3("InternalError", 500), s3("ThrottlingException", 400),
               ConnectionResetError(104, "reset"), aiohttp.ClientPayloadError("cut short")]
    final = [s3("AccessDenied", 403), s3("NoSuchKey", 404), FileNotFoundError("x"), PermissionError("x")]
    assert [remote.transient(e) for e in retried] == [True] * len(retried)
    assert [remote.transient(e) for e in final] == [False] * len(final)
    assert remote.status_of(s3("SlowDown", 503)) == "S3 SlowDown (HTTP 503)"
    calls = []

    def flaky(attempt):
        calls.append(attempt)
        if attempt < 2:
            raise s3("SlowDown", 503)
        return "ok"
    assert remote.with_retries(flaky, "s3://b/k", RetryPolicy(3, 0.0)) == "ok" and calls == [0, 1, 2]
    with pytest.raises(DataError, match=r"s3://b/k: read failed after 1 retries \(S3 SlowDown \(HTTP 503\)"):
        remote.with_retries(lambda a: (_ for _ in ()).throw(s3("SlowDown", 503)), "s3://b/k", RetryPolicy(1, 0.0))


def test_eval_shards_may_be_a_pipe(synthetic, tmp_path):
    """eval.shards=pipe:... (a manifest read through a command) passes the config's file check (one is_url for
    config, eval and data) and gives the same evaluation windows as the file itself."""
    from megatrain.config import load_config
    from megatrain.data import Manifest
    from megatrain.eval.heldout import load_heldout
    from tests.tiny_data import TINY

    path, _ = synthetic
    man = Manifest.load(path)
    man.shards = [type(s)(url=man.shard_url(i), docs=s.docs, tokens=s.tokens, bytes=s.bytes)
                  for i, s in enumerate(man.shards)]  # a pipe has no folder: absolute shard names
    man.save(str(tmp_path / "index.json"))
    piped = f"pipe:cat {tmp_path / 'index.json'}"
    cfg = load_config(TINY, [f"data.shards={path}", f"eval.shards='{piped}'", "eval.every_steps=2",
                             "model.vocab_size=4000"])
    cfg.validate(check_files=True)  # was: "eval.shards=pipe:cat ...: no such file or directory"
    a, b = load_heldout(piped, 32, 256), load_heldout(str(tmp_path / "index.json"), 32, 256)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels) and a.input_ids.shape[0] == 8
