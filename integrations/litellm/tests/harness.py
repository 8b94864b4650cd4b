"""Real processes for the tests: `tally serve` nodes and LiteLLM proxies on loopback.

The tally binary is $TALLY_BIN, else target/release/tally of this checkout."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
PKG = os.path.dirname(HERE)
ROOT = os.path.dirname(os.path.dirname(PKG))
ADMIN = "admin-token-litellm-tests"
CLIENT = "client-token-litellm-tests"


def tally_bin():
    return os.environ.get("TALLY_BIN") or os.path.join(ROOT, "target", "release", "tally")


def free_port(kind=socket.SOCK_STREAM):
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def http(url, method, path, body=None, token=ADMIN, timeout=30):
    st, reply, _ = http_full(url, method, path, body, token, timeout)
    return st, reply


def http_full(url, method, path, body=None, token=ADMIN, timeout=30):
    """(status, parsed body, headers with lower-case names)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null"), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        text = e.read()
        headers = {k.lower(): v for k, v in e.headers.items()}
        try:
            return e.code, json.loads(text), headers
        except ValueError:
            return e.code, text.decode(errors="replace"), headers


def note_pid(pid):
    """run.sh kills what is listed in $TALLY_LITELLM_PIDFILE if pytest dies first."""
    path = os.environ.get("TALLY_LITELLM_PIDFILE")
    if path:
        with open(path, "a") as f:
            f.write(f"{pid}\n")


def wait_for(cond, timeout=20.0, what="condition", every=0.05):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


class Tally:
    """One `tally serve` on loopback. `port` fixed so a restart keeps the URL."""

    def __init__(self, data_dir=None, port=None, extra=(), node_id=None):
        self.dir = data_dir or tempfile.mkdtemp(prefix="tally-litellm-")
        self.port = port or free_port()
        self.extra = list(extra)
        self.node_id = node_id
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.start()

    def start(self):
        args = [tally_bin(), "serve", "--listen", f"127.0.0.1:{self.port}", "--data-dir", self.dir,
                "--admin-token", ADMIN, "--client-token", CLIENT] + self.extra
        if self.node_id:
            args += ["--node-id", self.node_id]
        print("+", " ".join(args), flush=True)
        self.log = open(os.path.join(self.dir, "stderr.log"), "a")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log, text=True)
        note_pid(self.proc.pid)
        deadline = time.time() + 60
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"tally exited: {self.stderr()}")
            if line.startswith("tally listening on http://"):
                return
        raise RuntimeError("no listening line from tally")

    def stderr(self):
        self.log.flush()
        with open(os.path.join(self.dir, "stderr.log")) as f:
            return f.read()[-4000:]

    def http(self, method, path, body=None, token=ADMIN):
        return http(self.url, method, path, body, token)

    def ok(self, method, path, body=None, token=ADMIN):
        st, reply = self.http(method, path, body, token)
        assert st == 200, (method, path, body, st, reply)
        return reply

    def put_limit(self, id, scope, metric, max, period="1d", **more):
        return self.ok("PUT", f"/v1/limits/{id}", dict(scope=scope, metric=metric, max=max, period=period, **more))

    def used(self, id):
        return self.ok("GET", f"/v1/limits/{id}")["used"]

    def kill(self):
        """SIGKILL: no drain (a crash)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.log.close()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            code = self.proc.wait(timeout=30)
            assert code == 0, f"tally exited {code}: {self.stderr()}"
        if not self.log.closed:
            self.log.close()

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Proxy:
    """A real LiteLLM proxy (`litellm --config`) with the tally callback."""

    def __init__(self, config_path, env, port=None, workdir=None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = workdir or tempfile.mkdtemp(prefix="litellm-proxy-")
        full_env = dict(os.environ)
        full_env.update({
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "PYTHONPATH": PKG + os.pathsep + full_env.get("PYTHONPATH", ""),
            "NO_PROXY": "*",
            "DISABLE_SCHEMA_UPDATE": "True",
            "LITELLM_TELEMETRY": "False",
        })
        full_env.update(env)
        exe = os.path.join(os.path.dirname(sys.executable), "litellm")
        args = [exe, "--config", config_path, "--host", "127.0.0.1", "--port", str(self.port)]
        print("+", " ".join(args), flush=True)
        self.logpath = os.path.join(self.dir, "proxy.log")
        self.log = open(self.logpath, "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=full_env,
                                     cwd=self.dir)
        note_pid(self.proc.pid)

    def wait_ready(self, timeout=120):
        def up():
            if self.proc.poll() is not None:
                raise RuntimeError(f"litellm exited {self.proc.returncode}: {self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/health/liveliness", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False
        wait_for(up, timeout=timeout, what=f"litellm on {self.url}", every=0.25)

    def output(self):
        self.log.flush()
        with open(self.logpath) as f:
            return f.read()[-6000:]

    def chat(self, key, model, content="hi", extra=None):
        body = {"model": model, "messages": [{"role": "user", "content": content}]}
        body.update(extra or {})
        st, reply, self.last_headers = http_full(self.url, "POST", "/v1/chat/completions", body, token=key, timeout=60)
        return st, reply

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()
