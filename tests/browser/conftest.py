"""Harness of the dashboard's browser tests: real `tally` processes on loopback, a real
Chromium driven by Playwright, and nginx as the reverse proxy with a path prefix.

Everything is started here and stopped at the end of the session; nothing is mocked.
Environment:
  TALLY_BIN        the tally binary (default: target/release/tally)
  CHROMIUM         the browser (default: Debian's /usr/lib/chromium/chromium)
  NGINX            nginx (default: nginx on PATH or /usr/sbin/nginx)
  TALLY_UI_SCREENSHOTS_DIR  where test_screenshots writes its PNGs (default: a temp dir;
                   scripts/ui_screenshots.sh points it at docs/screenshots)
"""

import concurrent.futures
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[2]
ADMIN = "admin-token-0123456789"
CLIENT = "client-token-0123456789"
CLUSTER_KEY = "browser-test-cluster-key-0123456789"
START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 15
REQUEST_TIMEOUT_S = 30
PERF = []  # measurements the tests report, printed at the end of the run


def pytest_terminal_summary(terminalreporter):
    for line in PERF:
        terminalreporter.write_line(line)


def tally_bin():
    return os.environ.get("TALLY_BIN") or str(ROOT / "target" / "release" / "tally")


def chromium_path():
    for p in (os.environ.get("CHROMIUM"), "/usr/lib/chromium/chromium", "/usr/bin/chromium"):
        if p and os.path.exists(p):
            return p
    raise RuntimeError("no Chromium found: install Debian's chromium package or set CHROMIUM")


def free_port(kind=socket.SOCK_STREAM):
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ApiError(Exception):
    def __init__(self, status, body):
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class Node:
    """One `tally serve` process on 127.0.0.1 with its own data directory."""

    def __init__(self, name, tokens=True, args=()):
        self.name = name
        self.dir = tempfile.mkdtemp(prefix=f"tally-ui-{name}-")
        cmd = [tally_bin(), "serve", "--listen", "127.0.0.1:0", "--data-dir", self.dir, *args]
        if tokens:
            cmd += ["--admin-token", ADMIN, "--client-token", CLIENT]
        self.admin = ADMIN if tokens else None
        self.client = CLIENT if tokens else None
        env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
        self.log = open(os.path.join(self.dir, "stderr.log"), "wb")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        line = b""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith(b"tally listening on http://"):
                break
            if not line and self.proc.poll() is not None:
                break
        text = line.decode().strip()
        if not text.startswith("tally listening on http://"):
            self.stop()
            raise RuntimeError(f"{name}: tally did not start: {text!r}; see {self.log.name}")
        addr, node = text[len("tally listening on http://"):].split(" node=")
        self.host, self.port = addr.rsplit(":", 1)
        self.port = int(self.port)
        self.node_id = node
        self.url = f"http://{addr}"
        # Keep the pipe drained so the server never blocks on stdout.
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        self._local = threading.local()

    def _conn(self):
        c = getattr(self._local, "conn", None)
        if c is None:
            c = http.client.HTTPConnection(self.host, self.port, timeout=REQUEST_TIMEOUT_S)
            self._local.conn = c
        return c

    def call(self, method, path, body=None, token="admin"):
        """JSON request; `token` is 'admin', 'client', None or a literal token."""
        t = {"admin": self.admin, "client": self.client}.get(token, token)
        headers = {"Content-Type": "application/json"}
        if t:
            headers["Authorization"] = f"Bearer {t}"
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(2):
            c = self._conn()
            try:
                c.request(method, path, body=data, headers=headers)
                r = c.getresponse()
                raw = r.read()
                break
            except (http.client.HTTPException, ConnectionError):
                c.close()
                self._local.conn = None
                if attempt:
                    raise
        out = json.loads(raw) if raw else None
        if r.status >= 400:
            raise ApiError(r.status, out)
        return out

    def put_limit(self, id, **body):
        return self.call("PUT", f"/v1/limits/{urllib.parse.quote(id, safe='')}", body)

    def limit(self, id, token="admin"):
        return self.call("GET", f"/v1/limits/{urllib.parse.quote(id, safe='')}", token=token)

    def usage(self, attributes, **amounts):
        body = {"id": f"r-{random.getrandbits(64):016x}", "attributes": attributes, **amounts}
        return self.call("POST", "/v1/usage", body, token="client")

    def check(self, attributes, **amounts):
        return self.call("POST", "/v1/check", {"attributes": attributes, **amounts}, token="client")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_until(what, fn, timeout_s=15, every_s=0.05):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            v = fn()
            if v:
                return v
        except ApiError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(every_s)


# Period boundaries the tests' limits cross (calendar-aligned 1h/1d/1M in these zones):
# usage recorded just before one and read just after would be in a closed period.
BOUNDARY_ZONES = ("UTC", "Europe/Paris", "America/New_York")
BOUNDARY_MARGIN_S = 120


def next_boundaries(now_utc):
    """The next hour, day and month starts in each zone, as UTC instants."""
    from datetime import timedelta
    from zoneinfo import ZoneInfo

    out = []
    for name in BOUNDARY_ZONES:
        try:
            zone = ZoneInfo(name)
        except Exception:  # no time zone data on this machine: guard the zones it has
            continue
        local = now_utc.astimezone(zone)
        hour = (local.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1))
        day = (local.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1))
        month = (local.replace(day=28, hour=0, minute=0, second=0, microsecond=0)
                 + timedelta(days=4)).replace(day=1)
        out += [hour, day.replace(tzinfo=zone), month.replace(tzinfo=zone)]
    return out


@pytest.fixture(autouse=True)
def clear_of_period_boundaries():
    """Waits out an hour, day or month boundary that falls within the next two minutes, so
    a test never records usage in one period and reads it in the next."""
    from datetime import datetime, timezone

    now = datetime.now(timezone.utc)
    soon = [b for b in next_boundaries(now) if 0 <= (b - now).total_seconds() < BOUNDARY_MARGIN_S]
    if soon:
        wait = max((b - now).total_seconds() for b in soon) + 2
        print(f"waiting {wait:.0f} s for a period boundary to pass")
        time.sleep(wait)
    yield


@pytest.fixture(scope="session")
def node():
    """A node with admin and client tokens, for the functional tests."""
    n = Node("main")
    yield n
    n.stop()


@pytest.fixture(scope="session")
def open_node():
    """A node started without tokens (the default loopback mode)."""
    n = Node("open", tokens=False)
    yield n
    n.stop()


def create_limits(node, n, connections=16):
    """n limits over `connections` keep-alive connections (each PUT is a durable write)."""
    metrics = ["cost", "tokens", "requests"]

    def one(i):
        m = metrics[i % 3]
        mx = 100 + (i % 50) * 10 if m == "cost" else 10_000 + i
        node.put_limit(f"bulk-{i:05d}", scope={"virtual_key": f"vk-{i:05d}", "team": f"t{i % 40}"},
                       metric=m, max=mx, period=["1d", "1M", "1h"][i % 3], calendar_aligned=True,
                       timezone=["UTC", "Europe/Paris", "America/New_York"][i % 3])

    with concurrent.futures.ThreadPoolExecutor(connections) as pool:
        list(pool.map(one, range(n)))


@pytest.fixture(scope="session")
def big_node():
    """A node with 10 000 limits, some of them used."""
    n = Node("big")
    t0 = time.monotonic()
    create_limits(n, 10_000)
    # Usage on every 7th key: the list then has a clear "closest to max" order.
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: n.usage({"virtual_key": f"vk-{i:05d}", "team": f"t{i % 40}"},
                                        cost=float(i % 97), tokens=i, requests=1),
                      range(0, 10_000, 7)))
    n.setup_s = time.monotonic() - t0
    yield n
    n.stop()


@pytest.fixture(scope="session")
def fleet():
    """Three gossiping nodes with tokens (for the cluster view and per-node usage)."""
    ports = [free_port(socket.SOCK_DGRAM) for _ in range(3)]
    seed = f"127.0.0.1:{ports[0]}"
    nodes = []
    try:
        for i, p in enumerate(ports):
            nodes.append(Node(f"fleet{i + 1}", args=[
                "--node-id", f"node-{i + 1}", "--gossip-listen", f"127.0.0.1:{p}",
                "--seed", seed, "--cluster-key", CLUSTER_KEY]))
        for n in nodes:
            wait_until(f"{n.name} to see 3 live nodes", lambda n=n: sum(
                m["live"] for m in n.call("GET", "/v1/cluster", token="client")["nodes"]) == 3, timeout_s=30)
        yield nodes
    finally:
        for n in nodes:
            n.stop()


NGINX_CONF = """
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 64; }}
http {{
  access_log {dir}/access.log;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  server {{
    listen 127.0.0.1:{port};
    location /tally/ {{
      proxy_pass http://127.0.0.1:{upstream}/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
    location / {{ return 404 "not here: the node is under /tally/\\n"; }}
  }}
}}
"""


@pytest.fixture(scope="session")
def proxy(node):
    """nginx serving `node` under http://127.0.0.1:PORT/tally/ (prefix stripped)."""
    nginx = os.environ.get("NGINX") or shutil.which("nginx") or "/usr/sbin/nginx"
    d = tempfile.mkdtemp(prefix="tally-ui-nginx-")
    port = free_port()
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF.format(dir=d, port=port, upstream=node.port))
    proc = subprocess.Popen([nginx, "-p", d, "-c", conf], stderr=subprocess.PIPE)

    def up():
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True

    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            up()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not start: {proc.stderr.read().decode()}")
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/tally/"
    proc.send_signal(signal.SIGQUIT)
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path())
        yield b
        b.close()


class Page:
    """A fresh browser context and page that records what a test must check afterwards:
    page errors, CSP violations, and every request URL."""

    def __init__(self, browser):
        self.context = browser.new_context(viewport={"width": 1400, "height": 900})
        self.page = self.context.new_page()
        self.page.set_default_timeout(10_000)
        self.errors = []
        self.requests = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))

    def login(self, base, token):
        p = self.page
        p.goto(base + "ui/")
        p.fill("#token", token)
        p.click("#sign-in")
        p.wait_for_selector("#role")

    def assert_clean(self):
        assert self.errors == []
        assert self.page.evaluate("window.__tallyCspViolations || []") == []
        assert self.page.evaluate("window.__pwned === undefined")

    def close(self):
        self.context.close()


@pytest.fixture
def page(browser):
    p = Page(browser)
    yield p
    p.close()
