"""Shared fixtures of the integration suites: a real `tally serve` process, an HTTP
client, a stub upstream, and a UDP relay that can cut gossip between two nodes.

The binary is $TALLY_BIN, else target/release/tally of this checkout (built by .ci/run).
"""

import json
import os
import selectors
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ADMIN = "admin-token-for-tests"
CLIENT = "client-token-for-tests"


def tally_bin():
    return os.environ.get("TALLY_BIN") or os.path.join(ROOT, "target", "release", "tally")


def free_port(kind=socket.SOCK_STREAM):
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Tally:
    """One `tally serve` process on loopback, with the RLS and access-log listeners."""

    def __init__(self, extra=(), data_dir=None, tokens=True):
        self.dir = data_dir or tempfile.mkdtemp(prefix="tally-integ-")
        args = [
            tally_bin(), "serve", "--listen", "127.0.0.1:0", "--data-dir", self.dir,
            "--rls-listen", "127.0.0.1:0",
            "--log-listen-udp", "127.0.0.1:0", "--log-listen-tcp", "127.0.0.1:0",
        ]
        if tokens:
            args += ["--admin-token", ADMIN, "--client-token", CLIENT]
        args += list(extra)
        self.log = open(os.path.join(self.dir, "stderr.log"), "w")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.rls = self.udp = self.tcp = self.url = None
        deadline = time.time() + 60
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"tally exited: {self.stderr()}")
            line = line.strip()
            if line.startswith("tally rls listening on grpc://"):
                self.rls = line.split("grpc://")[1]
            elif line.startswith("tally access logs on udp://"):
                self.udp = line.split("udp://")[1]
            elif line.startswith("tally access logs on tcp://"):
                self.tcp = line.split("tcp://")[1]
            elif line.startswith("tally listening on http://"):
                self.url = "http://" + line.split("http://")[1].split()[0]
                break
        assert self.url, "no listening line"

    def stderr(self):
        self.log.flush()
        with open(os.path.join(self.dir, "stderr.log")) as f:
            return f.read()[-4000:]

    def http(self, method, path, body=None, token=ADMIN, headers=None, raw=None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"null"), dict(r.headers)
        except urllib.error.HTTPError as e:
            text = e.read()
            try:
                return e.code, json.loads(text), dict(e.headers)
            except ValueError:
                return e.code, text.decode(errors="replace"), dict(e.headers)

    def put_limit(self, id, spec):
        st, body, _ = self.http("PUT", f"/v1/limits/{id}", spec)
        assert st == 200, body
        return body

    def used(self, id):
        st, body, _ = self.http("GET", f"/v1/limits/{id}")
        assert st == 200, body
        return body["used"]

    def metric(self, name):
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        raise KeyError(name)

    def import_ratelimit(self, yaml_text, dry_run=False):
        path = "/v1/import/envoy-ratelimit" + ("?dry_run=true" if dry_run else "")
        return self.http("POST", path, raw=yaml_text.encode(), headers={"Content-Type": "application/yaml"})

    def stop(self):
        """SIGTERM; the node must drain and exit 0."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            code = self.proc.wait(timeout=30)
            assert code == 0, f"tally exited {code}: {self.stderr()}"
        self.log.close()


@pytest.fixture
def tally():
    t = Tally()
    yield t
    t.stop()


def wait_for(cond, timeout=20.0, what="condition"):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


class Upstream:
    """A stub API: answers 200 and reports what the request cost in response headers,
    as an LLM gateway or metered API would (X-Tally-Cost in USD, X-Tally-Tokens)."""

    def __init__(self, cost="0.25", tokens="100"):
        self.hits = 0
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits += 1
                body = b'{"ok":true}\n'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Tally-Cost", cost)
                self.send_header("X-Tally-Tokens", tokens)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upstream():
    u = Upstream()
    yield u
    u.close()


class UdpRelay:
    """Forwards UDP datagrams to `target` both ways; `cut = True` drops everything.
    Gossip goes through one relay per node (nodes advertise the relay's address), so a
    test can partition two real processes on loopback and heal them."""

    def __init__(self, target_port):
        self.target = ("127.0.0.1", target_port)
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", 0))
        self.port = self.front.getsockname()[1]
        self.cut = False
        self.backs = {}  # source address -> upstream socket
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.front, selectors.EVENT_READ, None)
        self.running = True
        threading.Thread(target=self.run, daemon=True).start()

    def run(self):
        while self.running:
            for key, _ in self.sel.select(timeout=0.1):
                sock, src = key.fileobj, key.data
                try:
                    data, addr = sock.recvfrom(65536)
                except OSError:
                    continue
                if self.cut:
                    continue
                if src is None:  # from a peer, to the node
                    back = self.backs.get(addr)
                    if back is None:
                        back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                        back.bind(("127.0.0.1", 0))
                        self.backs[addr] = back
                        self.sel.register(back, selectors.EVENT_READ, addr)
                    back.sendto(data, self.target)
                else:  # the node's answer, back to the peer
                    self.front.sendto(data, src)

    def close(self):
        self.running = False
