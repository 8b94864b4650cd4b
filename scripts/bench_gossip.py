#!/usr/bin/env python3
"""Gossip benchmarks for BENCHMARKS.md (issue 4), against real `tally` processes on loopback.

1. Propagation: a record acknowledged by one node, then polled (every 2 ms) on the two
   others until their `used` includes it. Reports p50/p99/max of ack -> visible on all.
2. Gossip volume: 10 000 active limits under steady record load (tally-load), reporting
   gossip bytes sent and received per second per node from /metrics.

Run: cargo build --release -p tally-server -p tally-load && python3 scripts/bench_gossip.py
"""
import json, os, shutil, subprocess, sys, tempfile, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TALLY = os.path.join(ROOT, "target", "release", "tally")
LOAD = os.path.join(ROOT, "target", "release", "tally-load")
KEY = "bench-cluster-key-0123456789"
INTERVAL_MS = int(os.environ.get("GOSSIP_INTERVAL_MS", "100"))
SAMPLES = int(os.environ.get("SAMPLES", "200"))


def http(method, url, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def start(i, tmp, base_port):
    d = os.path.join(tmp, f"d{i}")
    args = [TALLY, "serve", "--listen", "127.0.0.1:0", "--data-dir", d, "--node-id", f"node-{i}",
            "--gossip-listen", f"127.0.0.1:{base_port + i}", "--seed", f"127.0.0.1:{base_port}",
            "--cluster-key", KEY, "--gossip-interval-ms", str(INTERVAL_MS)]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    url = line.split()[3]
    return p, url


def metric(url, name):
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    for l in text.splitlines():
        if l.startswith(name + " "):
            return float(l.split()[1])
    return 0.0


def ready(u):
    try:
        return urllib.request.urlopen(u + "/readyz", timeout=5).status == 200
    except Exception:
        return False


def wait(cond, secs, what):
    deadline = time.time() + secs
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.05)
    sys.exit(f"timed out waiting for {what}")


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    tmp = tempfile.mkdtemp(prefix="tally-bench-gossip-")
    base = 17400 + os.getpid() % 500
    procs = []
    try:
        nodes = []
        for i in range(3):
            p, u = start(i, tmp, base)
            procs.append(p)
            nodes.append(u)
        wait(lambda: all(ready(u) for u in nodes), 30, "readiness")
        http("PUT", nodes[0] + "/v1/limits/prop", {"metric": "requests", "max": 10**12, "period": "1d"})
        def visible():
            try:
                return all(http("GET", u + "/v1/limits/prop")["id"] == "prop" for u in nodes)
            except Exception:
                return False
        wait(visible, 30, "limit on all nodes")
        lat = []
        for n in range(SAMPLES):
            src = n % 3
            http("POST", nodes[src] + "/v1/usage", {"id": f"prop-{n}", "attributes": {}})
            t0 = time.perf_counter()
            pending = [u for j, u in enumerate(nodes) if j != src]
            while pending:
                pending = [u for u in pending if http("GET", u + "/v1/limits/prop")["used"] < n + 1]
                if pending:
                    time.sleep(0.002)
                if time.perf_counter() - t0 > 10:
                    sys.exit(f"record {n} not visible after 10 s")
            lat.append((time.perf_counter() - t0) * 1000)
        print(f"propagation interval_ms={INTERVAL_MS} samples={len(lat)} p50_ms={pct(lat,50):.1f} "
              f"p99_ms={pct(lat,99):.1f} max_ms={max(lat):.1f}")

        # Gossip volume with 10 000 active limits: tally-load --setup makes 5 limits per key
        # set shape (vk, team, cust per key + provider + model); 3333 keys -> 10 001 limits.
        subprocess.run([LOAD, "--url", nodes[0], "--scenario", "record", "--setup", "--limits", "10001",
                        "--keys", "3333", "--connections", "8", "--duration-secs", "1", "--warmup-secs", "0"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(3)
        secs = 10
        before = [(metric(u, "tally_gossip_sent_bytes_total"), metric(u, "tally_gossip_received_bytes_total")) for u in nodes]
        loads = [subprocess.Popen([LOAD, "--url", u, "--scenario", "record", "--keys", "3333", "--connections", "4",
                                   "--duration-secs", str(secs), "--warmup-secs", "0", "--json"],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for u in nodes]
        t0 = time.time()
        outs = [json.loads(l.communicate()[0]) for l in loads]
        el = time.time() - t0
        after = [(metric(u, "tally_gossip_sent_bytes_total"), metric(u, "tally_gossip_received_bytes_total")) for u in nodes]
        rps = sum(o["rps"] for o in outs)
        for i, (b, a) in enumerate(zip(before, after)):
            print(f"gossip_volume node={i} active_limits=10001 fleet_records_per_s={rps:.0f} "
                  f"sent_bytes_per_s={(a[0]-b[0])/el:.0f} received_bytes_per_s={(a[1]-b[1])/el:.0f}")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=15)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
