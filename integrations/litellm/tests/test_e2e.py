"""End to end: two real LiteLLM proxies (1.108.7, mock responses, no network), each with
the tally callback pointing at its own tally node; the two nodes are one cluster
(gossip on loopback). Keys come from a key file through `tally_litellm.auth.file_keys`
(no LiteLLM database); prices from `tally prices import` of the price file shipped in
the installed litellm package.

What it shows: requests through both replicas count once each on both nodes; the team
budget, spent, is 402 on either replica; a disabled key and a model outside a key's allow
list are 403; a requests-per-minute limit is 429."""

import decimal
import json
import os
import random
import re
import shutil
import subprocess
import tempfile
import urllib.request

import litellm
import pytest

from harness import ADMIN, CLIENT, Proxy, Tally, free_port, tally_bin, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.new_api]

PRICE_FILE = os.path.join(os.path.dirname(litellm.__file__), "model_prices_and_context_window_backup.json")
MASTER = "sk-master-" + "e2e0" * 8
CLUSTER_KEY = "litellm-e2e-cluster-key-0123456789"

KEYS = {
    "sk-vk1": {"key_alias": "vk-1", "team_id": "eng", "user_id": "alice"},
    "sk-vk2": {"key_alias": "vk-2", "team_id": "eng", "user_id": "bob", "org_id": "acme"},
    "sk-off": {"key_alias": "vk-off", "team_id": "eng"},
    "sk-mini": {"key_alias": "vk-mini", "team_id": "lab"},
    "sk-rpm": {"key_alias": "vk-rpm", "team_id": "ops"},
    "sk-stream": {"key_alias": "vk-stream", "team_id": "streamers"},
}

# gpt-4o answers with a fixed usage in every kind: 1000 prompt tokens of which 400 cached
# reads and 100 cache writes, 300 completion tokens of which 120 reasoning.
USAGE = {"prompt_tokens": 1000, "completion_tokens": 300, "total_tokens": 1300,
         "prompt_tokens_details": {"cached_tokens": 400, "cache_write_tokens": 100},
         "completion_tokens_details": {"reasoning_tokens": 120}}

CONFIG = """
model_list:
  - model_name: gpt-4o
    litellm_params:
      model: openai/gpt-4o
      api_key: not-used
      mock_response: {mock}
  - model_name: gpt-4o-mini
    litellm_params:
      model: openai/gpt-4o-mini
      api_key: not-used
      mock_response: "hello from the mock"
litellm_settings:
  callbacks: tally_litellm.callback
general_settings:
  custom_auth: tally_litellm.auth.file_keys
"""


def per_token(entry, name, default):
    v = entry.get(name)
    return decimal.Decimal(repr(v)) if v is not None else default


def expected_cost(entry, kinds):
    """Σ tokens × the file's per-token price (cache prices default to the input price,
    reasoning to the output price), rounded up to the micro-dollar."""
    inp = per_token(entry, "input_cost_per_token", None)
    out = per_token(entry, "output_cost_per_token", None)
    prices = {
        "input_tokens": inp, "output_tokens": out,
        "cache_read_tokens": per_token(entry, "cache_read_input_token_cost", inp),
        "cache_creation_tokens": per_token(entry, "cache_creation_input_token_cost", inp),
        "reasoning_tokens": per_token(entry, "output_cost_per_reasoning_token", out),
    }
    exact = sum(n * prices[k] for k, n in kinds.items())
    return exact.quantize(decimal.Decimal("0.000001"), rounding=decimal.ROUND_UP), exact


@pytest.fixture(scope="module")
def fleet():
    g1, g2 = free_port(), free_port()
    common = ["--seed", f"127.0.0.1:{g1}", "--cluster-key", CLUSTER_KEY, "--gossip-interval-ms", "100"]
    n1 = Tally(node_id="n1", extra=["--gossip-listen", f"127.0.0.1:{g1}"] + common)
    n2 = Tally(node_id="n2", extra=["--gossip-listen", f"127.0.0.1:{g2}"] + common)
    nodes = [n1, n2]
    proxies = []
    work = None
    try:
        for n in nodes:
            wait_for(lambda n=n: n.http("GET", "/readyz")[0] == 200, timeout=30, what=f"{n.url} ready")

        # The price table, from the file LiteLLM ships.
        cmd = [tally_bin(), "prices", "import", PRICE_FILE, "--url", n1.url, "--token", ADMIN]
        print("+", " ".join(cmd), flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        print(out.stdout[-2000:], out.stderr[-2000:])
        assert out.returncode == 0, out.stderr
        for n in nodes:
            wait_for(lambda n=n: n.http("GET", "/v1/prices/gpt-4o-mini")[0] == 200, timeout=30,
                     what=f"prices on {n.url}")

        # Keys: the key file says who a key is; tally says what it may do.
        n1.ok("PUT", "/v1/entities/virtual_key/vk-off", {"parents": {"team": "eng"}, "active": False})
        n1.ok("PUT", "/v1/entities/virtual_key/vk-mini", {"parents": {"team": "lab"},
                                                            "allow": {"model": ["gpt-4o-mini"]}})
        n1.put_limit("eng-budget", {"team": "eng"}, "cost", 0.02, period="1M", calendar_aligned=True)
        n1.put_limit("eng-requests", {"team": "eng"}, "requests", 1000, period="1d")
        n1.put_limit("eng-tokens", {"team": "eng"}, "tokens", 10**9, period="1d")
        n1.put_limit("lab-cost", {"team": "lab"}, "cost", 100, period="never")
        n1.put_limit("streamers-tokens", {"team": "streamers"}, "tokens", 10**9, period="never")
        n1.put_limit("streamers-cost", {"team": "streamers"}, "cost", 100, period="never")
        n1.put_limit("vk-rpm-per-minute", {"virtual_key": "vk-rpm"}, "requests", 2, period="1m")
        for n in nodes:
            wait_for(lambda n=n: n.http("GET", "/v1/limits/vk-rpm-per-minute")[0] == 200
                     and n.http("GET", "/v1/entities/virtual_key/vk-mini")[0] == 200,
                     timeout=30, what=f"config on {n.url}")

        work = tempfile.mkdtemp(prefix="litellm-e2e-")
        keys_file = os.path.join(work, "keys.json")
        with open(keys_file, "w") as f:
            json.dump({"keys": KEYS}, f)
        config = os.path.join(work, "config.yaml")
        with open(config, "w") as f:
            f.write(CONFIG.format(mock=json.dumps({
                "id": "chatcmpl-mock", "model": "gpt-4o",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "hello"}}],
                "usage": USAGE})))
        for i, n in enumerate(nodes):
            d = os.path.join(work, f"proxy{i + 1}")
            os.makedirs(d)
            proxies.append(Proxy(config, workdir=d, env={
                "TALLY_URL": n.url, "TALLY_TOKEN": CLIENT, "TALLY_KEYS_FILE": keys_file,
                "TALLY_SPOOL_PATH": os.path.join(d, "tally-spool.jsonl"),
                "LITELLM_MASTER_KEY": MASTER,
            }))
        for p in proxies:
            p.wait_ready()
        yield nodes, proxies
    finally:
        for p in proxies:
            try:
                p.stop()
            except Exception as e:  # keep cleaning up
                print("proxy stop:", e)
        for n in nodes:
            n.cleanup()
        if work and not os.environ.get("TALLY_LITELLM_KEEP"):
            shutil.rmtree(work, ignore_errors=True)  # TALLY_LITELLM_KEEP=1 keeps the proxies' logs


def on_both(nodes, limit, value, what):
    for n in nodes:
        wait_for(lambda n=n: n.used(limit) == value, timeout=20, what=f"{what} on {n.url}")


def error_message(reply):
    return reply["error"]["message"] if isinstance(reply, dict) else str(reply)


def test_shared_team_budget_counted_once_per_request(fleet):
    nodes, (a, b) = fleet
    gpt4o = json.load(open(PRICE_FILE))["gpt-4o"]
    per_call, exact = expected_cost(gpt4o, {"input_tokens": 500, "output_tokens": 180, "cache_read_tokens": 400,
                                            "cache_creation_tokens": 100, "reasoning_tokens": 120})
    assert per_call == exact == decimal.Decimal("0.005")
    for proxy, k in [(a, "sk-vk1"), (b, "sk-vk2"), (a, "sk-vk1"), (b, "sk-vk2")]:
        st, reply = proxy.chat(k, "gpt-4o")
        assert st == 200, reply
        assert reply["usage"]["prompt_tokens"] == 1000
    # Each request once, on both nodes, and each node's share is its own replica's.
    on_both(nodes, "eng-requests", 4, "4 requests")
    on_both(nodes, "eng-budget", 0.02, "4 x 0.005 USD")
    on_both(nodes, "eng-tokens", 4 * 1300, "4 x 1300 tokens")
    for n in nodes:
        view = n.ok("GET", "/v1/limits/eng-budget")
        assert view["nodes"] == {"n1": 0.01, "n2": 0.01}
        assert view["remaining"] == 0.0

    # Spent: 402 on either replica, with the limit named.
    for proxy, k in [(a, "sk-vk1"), (b, "sk-vk1"), (b, "sk-vk2")]:
        st, reply = proxy.chat(k, "gpt-4o")
        assert st == 402, reply
        assert "eng-budget" in error_message(reply)
    # Denied calls were not counted.
    for n in nodes:
        assert n.used("eng-requests") == 4
        assert n.used("eng-budget") == 0.02


def test_disabled_key_is_403_on_either_replica(fleet):
    nodes, proxies = fleet
    for p in proxies:
        st, reply = p.chat("sk-off", "gpt-4o-mini")
        assert st == 403, reply
        assert error_message(reply) == "tally: virtual_key=vk-off is disabled"


def test_model_outside_allow_list_is_403(fleet):
    nodes, (a, b) = fleet
    st, reply = a.chat("sk-mini", "gpt-4o")
    assert st == 403, reply
    assert error_message(reply) == "tally: virtual_key=vk-mini does not allow model=gpt-4o"
    st, reply = b.chat("sk-mini", "gpt-4o-mini")
    assert st == 200, reply
    # gpt-4o-mini's mock usage (10 prompt, 20 completion tokens), priced from the file.
    mini = json.load(open(PRICE_FILE))["gpt-4o-mini"]
    cost, _ = expected_cost(mini, {"input_tokens": 10, "output_tokens": 20})
    on_both(nodes, "lab-cost", float(cost), "gpt-4o-mini's cost")


def test_requests_per_minute_is_429(fleet):
    nodes, (a, b) = fleet
    assert a.chat("sk-rpm", "gpt-4o-mini")[0] == 200
    assert b.chat("sk-rpm", "gpt-4o-mini")[0] == 200
    on_both(nodes, "vk-rpm-per-minute", 2, "2 requests")
    for p in (a, b):
        st, reply = p.chat("sk-rpm", "gpt-4o-mini")
        assert st == 429, reply
        assert "vk-rpm-per-minute" in error_message(reply)
        assert 1 <= int(p.last_headers["retry-after"]) <= 60


def test_streamed_call_is_recorded_once(fleet):
    nodes, (a, _) = fleet
    body = json.dumps({"model": "gpt-4o-mini", "stream": True, "stream_options": {"include_usage": True},
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    req = urllib.request.Request(a.url + "/v1/chat/completions", data=body, method="POST", headers={
        "Authorization": "Bearer sk-stream", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200
        lines = [line[6:] for line in r.read().decode().splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    usage = [json.loads(line)["usage"] for line in lines[:-1] if json.loads(line).get("usage")][-1]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    on_both(nodes, "streamers-tokens", usage["total_tokens"], "the streamed call's tokens")
    mini = json.load(open(PRICE_FILE))["gpt-4o-mini"]
    cost, _ = expected_cost(mini, {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"]})
    on_both(nodes, "streamers-cost", float(cost), "the streamed call's cost")


def test_unknown_key_is_401(fleet):
    _, (a, _) = fleet
    st, reply = a.chat("sk-nobody", "gpt-4o-mini")
    assert st == 401, reply


# Known models of litellm 1.108.7's file: gpt-4o (no cache-write price: the input price),
# claude-sonnet-4-5 (every cache price), o1, gpt-4o-mini (fractions of a micro-dollar per
# token) and dashscope/qwen-turbo (a reasoning price of its own; a `/` in the name).
@pytest.mark.parametrize("model", ["gpt-4o", "claude-sonnet-4-5", "gpt-4o-mini", "o1", "dashscope/qwen-turbo"])
def test_imported_prices_to_the_micro_dollar(fleet, model):
    """A usage record of a known model, priced by the imported table, to the micro-dollar;
    then random token counts (seeded), each record and the limit's total exact."""
    nodes, _ = fleet
    entry = json.load(open(PRICE_FILE))[model]
    n1, n2 = nodes
    view = n2.ok("GET", f"/v1/prices/{model}", token=CLIENT)
    assert view["model"] == model
    assert decimal.Decimal(repr(view["input"])) == decimal.Decimal(repr(entry["input_cost_per_token"])) * 10**6
    assert decimal.Decimal(repr(view["output"])) == decimal.Decimal(repr(entry["output_cost_per_token"])) * 10**6
    lim = "price-" + re.sub(r"[^A-Za-z0-9]", "-", model)
    n1.put_limit(lim, {"model": model, "team": "pricing"}, "cost", 1000, period="never")
    wait_for(lambda: n2.http("GET", f"/v1/limits/{lim}")[0] == 200, timeout=20, what="limit on n2")
    rng = random.Random(15)
    cases = [{"input_tokens": 123457, "output_tokens": 9871, "cache_read_tokens": 55555,
              "cache_creation_tokens": 3333, "reasoning_tokens": 777}]
    for _ in range(5):
        cases.append({k: rng.choice([0, 1, rng.randrange(1, 1000), rng.randrange(1, 2_000_000)])
                      for k in cases[0]})
    total = decimal.Decimal(0)
    for i, kinds in enumerate(cases):
        kinds = {k: v for k, v in kinds.items() if v} or {"input_tokens": 1}
        cost, exact = expected_cost(entry, kinds)
        node = nodes[i % 2]
        st, reply = node.http("POST", "/v1/usage", dict(id=f"{lim}-{i}",
                                                         attributes={"team": "pricing", "model": model},
                                                         **kinds), token=CLIENT)
        assert st == 200, reply
        print(model, kinds, "exact", exact, "charged", reply["priced"])
        assert reply["priced"]["model"] == model
        assert decimal.Decimal(reply["priced"]["exact_usd"]) == exact
        assert decimal.Decimal(repr(reply["priced"]["cost"])) == cost
        total += cost
    on_both(nodes, lim, float(total), f"{model} priced")


def test_usage_survives_tally_and_proxy_restarts(tmp_path):
    """A call made while the proxy's tally node is down is recorded once, after both the
    node and the proxy (stopped with SIGTERM meanwhile) are back: the spool."""
    t = Tally()
    proxies = []
    try:
        t.put_limit("eng-requests", {"team": "eng"}, "requests", 100)
        t.put_limit("eng-cost", {"team": "eng"}, "cost", 100)
        config = tmp_path / "config.yaml"
        config.write_text(CONFIG.format(mock=json.dumps("hello")))
        keys = tmp_path / "keys.json"
        keys.write_text(json.dumps({"keys": KEYS}))
        spool = tmp_path / "spool.jsonl"
        env = {"TALLY_URL": t.url, "TALLY_TOKEN": CLIENT, "TALLY_KEYS_FILE": str(keys),
               "TALLY_SPOOL_PATH": str(spool), "LITELLM_MASTER_KEY": MASTER}

        def proxy(name):
            d = tmp_path / name
            d.mkdir()
            p = Proxy(str(config), env=env, workdir=str(d))
            proxies.append(p)
            p.wait_ready()
            return p

        p = proxy("first")
        t.kill()  # the node crashes; fail_open lets calls through
        st, reply = p.chat("sk-vk1", "gpt-4o")
        assert st == 200, reply
        wait_for(lambda: spool.exists() and len(spool.read_text().splitlines()) == 1, timeout=10,
                 what="the record in the spool")
        p.stop()
        t.start()
        p = proxy("second")
        st, reply = p.chat("sk-vk1", "gpt-4o")
        assert st == 200, reply
        wait_for(lambda: t.used("eng-requests") == 2, timeout=20, what="both calls counted")
        wait_for(lambda: not spool.exists(), timeout=10, what="the spool emptied")
        # gpt-4o's 10 prompt and 20 completion tokens of the string mock, twice, priced by
        # LiteLLM's cost (this node has no price table): 2 x $0.000225.
        assert t.used("eng-cost") == 0.00045
        assert t.used("eng-requests") == 2
    finally:
        for p in proxies:
            p.stop()
        t.cleanup()
