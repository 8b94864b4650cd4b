#!/usr/bin/env python3
"""Spend a hard limit until it is denied, the way a gateway would: check with a
reservation, then record the usage that settles it. Used by docker/e2e.sh.

    hard_spend.py http BASE_URL TOKEN PREFIX STEP PATIENCE_S
    hard_spend.py exec CONTAINER TOKEN PREFIX STEP PATIENCE_S

`http` talks to a node's published port; `exec` runs the tally CLI inside a container
(for a node cut off from the host's network). Spends STEP tokens at a time on
attributes {"app": "hard"}; stops at a `budget` denial, or when denied for `rights` for
PATIENCE_S seconds in a row (waiting retry_after_ms between tries). Prints one JSON line:
{"acked": tokens acknowledged, "checks": n, "denied_rights": n, "denied_budget": n,
 "overrun": tokens reported as overrun}.
"""
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

mode, target, token, prefix, step, patience = sys.argv[1:7]
step, patience = int(step), float(patience)


def http(method, path, body):
    req = urllib.request.Request(
        target + path,
        data=json.dumps(body).encode(),
        method=method,
        headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        sys.exit(f"{method} {path}: HTTP {e.code} {e.read().decode(errors='replace')}")


def cli(args):
    out = subprocess.run(
        ["docker", "exec", "-e", f"TALLY_TOKEN={token}", target, "tally", *args, "--json"],
        capture_output=True, text=True, timeout=30,
    )
    if out.returncode != 0:
        sys.exit(f"tally {' '.join(args)}: exit {out.returncode}: {out.stderr}{out.stdout}")
    return json.loads(out.stdout)


def check():
    if mode == "http":
        return http("POST", "/v1/check",
                    {"attributes": {"app": "hard"}, "tokens": step, "reserve": True})
    return cli(["check", "--attr", "app=hard", "--tokens", str(step), "--reserve"])


def usage(rid, reservation):
    if mode == "http":
        return http("POST", "/v1/usage", {"id": rid, "attributes": {"app": "hard"},
                                           "tokens": step, "reservation": reservation})
    return cli(["usage", "--id", rid, "--attr", "app=hard", "--tokens", str(step),
                "--reservation", reservation])


stats = {"acked": 0, "checks": 0, "denied_rights": 0, "denied_budget": 0, "overrun": 0}
denied_since = None
i = 0
while True:
    d = check()
    stats["checks"] += 1
    if d["allowed"]:
        denied_since = None
        i += 1
        u = usage(f"{prefix}-{i}", d["reservation"]["id"])
        if not u["applied"]:
            sys.exit(f"usage {prefix}-{i} not applied: {u}")
        stats["acked"] += step
        stats["overrun"] += sum(u.get("overrun", {}).values())
        continue
    reasons = [l.get("reason") for l in d["limits"] if l.get("reason")]
    if "budget" in reasons:
        stats["denied_budget"] += 1
        break
    stats["denied_rights"] += 1
    now = time.monotonic()
    denied_since = denied_since or now
    if now - denied_since >= patience:
        break
    wait = max([l.get("retry_after_ms", 200) for l in d["limits"] if l.get("reason")] + [200])
    time.sleep(min(wait, 1000) / 1000)
print(json.dumps(stats))
