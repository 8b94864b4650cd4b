#!/usr/bin/env python3
"""/metrics of two real nodes through `promtool check metrics`, with exact counts, and the
Grafana dashboard checked against the real scrape. Started by tests/metrics/run.sh.

Standard library only. Every process it starts is stopped on exit.
"""
import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

CLUSTER_KEY = "metrics-test-cluster-key-0123456789"
START_TIMEOUT_S = 30
CHECKS = 40
RECORDS = 12
BATCHES = 3  # of 4 records each
FAILED = []
PASSED = []


def free_port(kind=socket.SOCK_STREAM):
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    def __init__(self, binary, name, gossip_port, seed_port, extra=()):
        self.name = name
        self.dir = tempfile.mkdtemp(prefix=f"tally-metrics-{name}-")
        self.log = open(os.path.join(self.dir, "stderr.log"), "w")
        cmd = [
            binary, "serve", "--listen", "127.0.0.1:0", "--data-dir", os.path.join(self.dir, "data"),
            "--node-id", name, "--gossip-listen", f"127.0.0.1:{gossip_port}",
            "--seed", f"127.0.0.1:{seed_port}", "--cluster-key", CLUSTER_KEY, *extra,
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True)
        deadline = time.time() + START_TIMEOUT_S
        self.url = None
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{name} exited: {open(self.log.name).read()[-2000:]}")
            m = re.search(r"tally listening on (http://\S+)", line)
            if m:
                self.url = m.group(1)
                break
        if not self.url:
            raise RuntimeError(f"{name} did not start in {START_TIMEOUT_S} s")

    def request(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=20) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def ok(self, method, path, body=None):
        status, text = self.request(method, path, body)
        if status != 200:
            raise AssertionError(f"{self.name} {method} {path}: {status} {text}")
        return json.loads(text)

    def scrape(self):
        status, text = self.request("GET", "/metrics")
        assert status == 200, text
        return text

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def parse(text):
    """{(name, frozenset(labels)): value} of every sample."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, value = line.rsplit(" ", 1)
        if "{" in series:
            name, rest = series.split("{", 1)
            labels = frozenset(tuple(kv.split("=", 1)) for kv in re.findall(r'[a-zA-Z_]+="[^"]*"', rest))
            labels = frozenset((k, v.strip('"')) for k, v in labels)
        else:
            name, labels = series, frozenset()
        out[(name, labels)] = float(value)
    return out


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    (PASSED if cond else FAILED).append(what)


def expect(samples, name, want, labels=()):
    got = samples.get((name, frozenset(labels)))
    check(got == want, f"{name}{dict(labels) or ''} == {want} (got {got})")


def histogram(samples, name, labels=()):
    """Checks a histogram's shape; returns its count."""
    labels = frozenset(labels)
    buckets = sorted(
        ((float(dict(l)["le"]), v) for (n, l), v in samples.items()
         if n == name + "_bucket" and l - {("le", dict(l).get("le"))} == labels),
        key=lambda b: b[0])
    check(len(buckets) >= 2 and buckets[-1][0] == float("inf"), f"{name}{dict(labels)} has buckets ending in +Inf")
    check(all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:])), f"{name}{dict(labels)} buckets are cumulative")
    count = samples.get((name + "_count", labels))
    check(buckets and buckets[-1][1] == count, f"{name}{dict(labels)} +Inf bucket == _count ({count})")
    check(samples.get((name + "_sum", labels), -1) >= 0, f"{name}{dict(labels)} has a _sum")
    return count


def promtool(text, who):
    p = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    out = (p.stdout + p.stderr).strip()
    check(p.returncode == 0 and out == "", f"promtool check metrics on {who}: exit {p.returncode} {out!r}")


def dashboard_names(dash):
    """Every metric name the dashboard's queries use, and its panel titles."""
    exprs = []
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            exprs.append(t["expr"])
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        exprs.append(q["query"] if isinstance(q, dict) else q)
    words = set()
    for e in exprs:
        e = re.sub(r'"[^"]*"', "", e)  # label values
        e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
        e = re.sub(r"\[[^\]]*\]", "", e)  # ranges
        words.update(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", e))
    keywords = {"sum", "by", "rate", "max", "histogram_quantile", "on", "label_values", "le",
                "instance", "limit", "metric", "endpoint", "peer", "without", "ignoring"}
    names = {w for w in words if w not in keywords and not w.startswith("__")}
    return names, [p["title"] for p in dash["panels"]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--dashboard", required=True)
    args = ap.parse_args()

    g1, g2 = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    nodes = []
    try:
        a = Node(args.bin, "node-a", g1, g2, ["--metrics-limits", "5"])
        nodes.append(a)
        b = Node(args.bin, "node-b", g2, g1)
        nodes.append(b)
        deadline = time.time() + 30
        while time.time() < deadline:
            if all(n.request("GET", "/readyz")[0] == 200 for n in nodes):
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the two nodes did not become ready")

        limits = {
            "team-eng-cost": {"scope": {"team": "eng"}, "metric": "cost", "max": 10, "period": "1d"},
            "team-eng-tokens": {"scope": {"team": "eng"}, "metric": "tokens", "max": 1000, "period": "1h"},
            "key-1-requests": {"scope": {"virtual_key": "vk-1"}, "metric": "requests", "max": 5, "period": "1d"},
        }
        for lid, body in limits.items():
            a.ok("PUT", f"/v1/limits/{lid}", body)
        a.ok("PUT", "/v1/entities/virtual_key/vk-1", {"parents": {"team": "eng"}})
        # Records on a: 12 single (cost 0.5, 10 tokens), 3 batches of 4 (cost 0.1) for vk-1.
        for i in range(RECORDS):
            a.ok("POST", "/v1/usage", {"id": f"s{i}", "attributes": {"team": "eng"}, "cost": 0.5, "tokens": 10})
        for bi in range(BATCHES):
            recs = [{"id": f"b{bi}-{i}", "attributes": {"virtual_key": "vk-1"}, "cost": 0.1} for i in range(4)]
            a.ok("POST", "/v1/usage/batch", {"records": recs})
        # Checks on a: vk-1 already made 12 requests of its 5: every check is denied by
        # key-1-requests; team=eng alone is allowed.
        denied = 0
        for i in range(CHECKS):
            attrs = {"virtual_key": "vk-1"} if i % 4 == 0 else {"team": "eng"}
            v = a.ok("POST", "/v1/check", {"attributes": attrs, "cost": 0.01})
            denied += 0 if v["allowed"] else 1
        check(denied == CHECKS // 4, f"{denied} checks denied, want {CHECKS // 4}")
        # b learns the usage by gossip: 12 * 0.5 + 12 * 0.1 = 7.2 USD.
        deadline = time.time() + 20
        used = None
        while time.time() < deadline:
            status, text = b.request("GET", "/v1/limits/team-eng-cost")
            if status == 200 and abs(json.loads(text)["used"] - 7.2) < 1e-9:
                used = 7.2
                break
            time.sleep(0.05)
        check(used == 7.2, "node-b counts the 7.2 USD recorded on node-a")
        # b checks too, and waits for a hello merged after the values.
        for i in range(7):
            b.ok("POST", "/v1/check", {"attributes": {"team": "eng"}})
        time.sleep(1.2)

        ta, tb = a.scrape(), b.scrape()
        promtool(ta, "node-a (--metrics-limits 5)")
        promtool(tb, "node-b")
        sa, sb = parse(ta), parse(tb)

        # Exact counts for the traffic sent.
        check(histogram(sa, "tally_check_duration_seconds") == CHECKS, f"node-a: {CHECKS} checks timed")
        check(histogram(sb, "tally_check_duration_seconds") == 7, "node-b: 7 checks timed")
        check(histogram(sa, "tally_record_duration_seconds", {("endpoint", "usage")}) == RECORDS,
              f"node-a: {RECORDS} records timed")
        check(histogram(sa, "tally_record_duration_seconds", {("endpoint", "usage_batch")}) == BATCHES,
              f"node-a: {BATCHES} batches timed")
        check(histogram(sa, "tally_commit_duration_seconds") == RECORDS + BATCHES,
              f"node-a: {RECORDS + BATCHES} group commits (requests sent one at a time)")
        check(histogram(sb, "tally_commit_duration_seconds") == 0, "node-b: no group commit of its own")
        expect(sa, "tally_commit_records_total", RECORDS + 4 * BATCHES)
        expect(sa, "tally_records_applied_total", RECORDS + 4 * BATCHES)
        expect(sa, "tally_checks_total", CHECKS)
        expect(sa, "tally_checks_denied_total", CHECKS // 4)
        # Gossip lag: b merged a's hellos; a merged b's.
        for who, s, peer in (("node-a", sa, "node-b"), ("node-b", sb, "node-a")):
            n = histogram(s, "tally_gossip_lag_seconds")
            check(n is not None and n >= 2, f"{who}: gossip lag observed ({n})")
            lag = s.get(("tally_gossip_peer_lag_seconds", frozenset({("peer", peer)})))
            check(lag is not None and 0 <= lag < 5, f"{who}: lag of {peer} {lag}")
            expect(s, "tally_gossip_live_nodes", 2)
            expect(s, "tally_gossip_dead_nodes", 0)
            for name in ("tally_gossip_sent_bytes_total", "tally_gossip_received_bytes_total"):
                check(s.get((name, frozenset()), 0) > 0, f"{who}: {name} > 0")
        # Per-limit series on a (opt-in; 3 limits under the cap of 5), none on b.
        expect(sa, "tally_limits", 3)
        want = {("team-eng-cost", "cost"): (7.2, 10), ("team-eng-tokens", "tokens"): (120, 1000),
                ("key-1-requests", "requests"): (12, 5)}
        for (lid, metric), (u, m) in want.items():
            labels = {("limit", lid), ("metric", metric)}
            got = sa.get(("tally_limit_used", frozenset(labels)))
            check(got is not None and abs(got - u) < 1e-9, f"tally_limit_used{{{lid}}} == {u} (got {got})")
            expect(sa, "tally_limit_max", m, labels)
        expect(sa, "tally_limit_denials_total", CHECKS // 4, {("limit", "key-1-requests")})
        expect(sa, "tally_limit_denials_untracked_total", 0)
        check(not any(n.startswith("tally_limit") for n, _ in sb), "node-b: no per-limit series without the flag")
        # Process metrics.
        for s, who in ((sa, "node-a"), (sb, "node-b")):
            for name in ("process_resident_memory_bytes", "process_open_fds", "process_cpu_seconds_total",
                         "process_start_time_seconds", "process_virtual_memory_bytes"):
                check(s.get((name, frozenset()), 0) > 0, f"{who}: {name} > 0")
            start = s[("process_start_time_seconds", frozenset())]
            check(time.time() - 120 < start <= time.time() + 1, f"{who}: process started {time.time() - start:.1f} s ago")

        # The dashboard.
        with open(args.dashboard) as f:
            dash = json.load(f)
        names, titles = dashboard_names(dash)
        scraped = {n for n, _ in sa} | {n for n, _ in sb}
        missing = sorted(n for n in names if n not in scraped)
        check(not missing, f"every metric the dashboard queries is in the scrape ({len(names)} names; missing {missing})")
        for want_title in ("Budgets burning down", "Check latency p50 / p99", "Record latency p50 / p99",
                           "Denials by limit", "Gossip lag", "Cluster membership"):
            check(any(t.startswith(want_title) for t in titles), f"dashboard has a panel {want_title!r}")
        ids = [p["id"] for p in dash["panels"]]
        check(len(ids) == len(set(ids)), "dashboard panel ids are unique")
    finally:
        for n in nodes:
            n.stop()
    for f in FAILED:
        print("failed: " + f)
    print(f"metrics: {len(PASSED)} passed, {len(FAILED)} failed")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
