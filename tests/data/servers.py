"""Real loopback servers for the remote-data tests: an HTTP file server with a fault injector, and moto's S3.

    with http_server(folder) as (url, faults):        # url = "http://127.0.0.1:PORT/"
        faults.add("shard-000001.tar", "503", "503")  # the next two requests for it answer 503
        faults.add("shard-000002.tar", "drop")        # the next GET of it sends half its bytes, then closes
        faults.add("shard-000003.tar", "drop@4096")   # ... the next GET of a range starting at byte >= 4096
    with s3_server() as endpoint:                     # AWS_ENDPOINT_URL + fake credentials set while inside
        upload(folder, "s3://bucket/prefix/")
    with s3_server(faults=Faults()) as endpoint:      # the same, behind a proxy that injects S3 faults by key name:
        faults.add("shard-000001.tar", "503")         # "503": an S3 SlowDown (throttling) error, "drop": half a GET

The HTTP server speaks Range requests (206) and HEAD, like any static file host / CDN, because fsspec reads
remote files by ranges. Faults are consumed in order, one per matching request (HEAD requests only see "503" and "403").
"""
from __future__ import annotations

import collections
import contextlib
import http.server
import os
import socket
import threading

from megatrain.parallel.env import free_port


class Faults:
    def __init__(self):
        self.lock = threading.Lock()
        self.queue: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.hits: list[tuple[str, str]] = []   # (name, fault) as they were injected
        self.requests: list[tuple[str, str, str]] = []  # (method, name, range header)

    def add(self, name: str, *faults: str) -> None:
        with self.lock:
            self.queue[name].extend(faults)

    def take(self, name: str, method: str, start: int) -> str | None:
        with self.lock:
            q = self.queue.get(name)
            if not q or (method == "HEAD" and q[0] not in ("503", "403")):
                return None
            if q[0].startswith("drop@") and start < int(q[0][5:]):
                return None
            f = q.popleft().split("@")[0]
            self.hits.append((name, f))
            return f


def _send_body(handler: http.server.BaseHTTPRequestHandler, body: bytes, drop: bool) -> None:
    """A response's body; `drop`: the connection dies mid-body (half the promised bytes, then a closed socket)."""
    if not drop:
        handler.wfile.write(body)
        return
    handler.wfile.write(body[:len(body) // 2])
    handler.wfile.flush()
    handler.close_connection = True
    handler.connection.shutdown(socket.SHUT_RDWR)


def _handler(root: str, faults: Faults):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _serve(self, head: bool):
            name = self.path.split("?", 1)[0].lstrip("/")
            faults.requests.append((self.command, name, self.headers.get("Range", "")))
            path = os.path.join(root, name)
            rng = self.headers.get("Range") or ""
            fault = faults.take(name, self.command, int(rng[6:].partition("-")[0] or 0) if rng else 0)
            if fault in ("503", "403"):
                self.send_response(int(fault))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if not os.path.isfile(path):
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = open(path, "rb").read()
            start, end = 0, len(data) - 1
            if rng and rng.startswith("bytes="):
                a, _, b = rng[6:].partition("-")
                start = int(a) if a else 0
                end = min(int(b), len(data) - 1) if b else len(data) - 1
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:end + 1]
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if head:
                return
            _send_body(self, body, drop=fault == "drop")

        def do_GET(self):
            self._serve(head=False)

        def do_HEAD(self):
            self._serve(head=True)

    return Handler


@contextlib.contextmanager
def http_server(root: str):
    faults = Faults()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _handler(str(root), faults))
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", faults
    finally:
        server.shutdown()
        server.server_close()
        t.join(timeout=5)


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _s3_fault_proxy(upstream: str, faults: Faults):
    """A loopback HTTP proxy in front of moto: forwards every request as is (S3 requests are self-contained: method,
    path, query, headers and body) and answers from `faults` by object key instead -- "503": S3's throttling error
    (SlowDown, the XML body real S3 sends), "drop": the promised Content-Length, half the body, a closed socket."""
    import http.client
    import urllib.parse

    up = urllib.parse.urlsplit(upstream)

    class Proxy(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))
            out = b""  # botocore streams uploads in HTTP chunks: reassembled, sent on with a Content-Length
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()

        def _forward(self):
            key = urllib.parse.unquote(self.path.split("?", 1)[0]).rsplit("/", 1)[-1]
            rng = self.headers.get("Range") or ""
            faults.requests.append((self.command, key, rng))
            body = self._body()
            fault = faults.take(key, self.command, int(rng[6:].partition("-")[0] or 0) if rng else 0)
            if fault == "503":
                xml = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                       b'<Message>Please reduce your request rate.</Message></Error>')
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(xml)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(xml)
                return
            conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "content-length")}
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                    self.send_header(k, v)
            # a HEAD's Content-Length is the object's size (what the size check reads), not its empty body's
            self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD"
                             else str(len(data)))
            self.end_headers()
            if self.command == "HEAD":
                return
            _send_body(self, data, drop=fault == "drop")

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

    return Proxy


@contextlib.contextmanager
def s3_server(faults: Faults | None = None):
    """moto's S3 in server mode on loopback; the standard AWS variables point botocore (and s3fs) at it. With
    `faults`: at a fault-injecting proxy in front of it (_s3_fault_proxy)."""
    import logging
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    proxy = None
    if faults is not None:
        proxy = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _s3_fault_proxy(endpoint, faults))
        proxy.daemon_threads = True
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        endpoint = f"http://127.0.0.1:{proxy.server_address[1]}"
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update({**S3_ENV, "AWS_ENDPOINT_URL": endpoint})
    try:
        yield endpoint
    finally:
        if proxy is not None:
            proxy.shutdown()
            proxy.server_close()
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def upload(folder: str, prefix: str) -> None:
    """Copy every file of ``folder`` to ``s3://bucket/prefix/`` (creating the bucket)."""
    import boto3

    bucket, _, key = prefix[len("s3://"):].partition("/")
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    with contextlib.suppress(Exception):
        s3.create_bucket(Bucket=bucket)
    for name in sorted(os.listdir(folder)):
        s3.upload_file(os.path.join(folder, name), bucket, key.rstrip("/") + "/" + name if key else name)
