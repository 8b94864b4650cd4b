"""The callback's hooks called as LiteLLM calls them, against a real tally node: mapping,
statuses, retries with the same id, fail open/closed, token kinds.

(test_e2e.py runs the same callback inside real LiteLLM proxies.)"""

import asyncio
import decimal
import os
import time
import types
import uuid

import litellm
import pytest
from tally_litellm.logger import TallyDenied
from litellm.proxy._types import UserAPIKeyAuth

from harness import CLIENT, Tally, wait_for
from tally_litellm import TallyLogger, token_kinds
from tally_litellm.sender import Sender
from tally_litellm.settings import Settings

HASH = "a4a6d307ad00fa67176e1099fdbc4f4a09bb527a7f24718a5030f2f173d11f7f"


@pytest.fixture
def tally():
    t = Tally()
    yield t
    t.cleanup()


def logger(t, **kw):
    kw.setdefault("url", t.url)
    kw.setdefault("token", CLIENT)
    kw.setdefault("retry_max_delay_s", 0.5)
    return TallyLogger(**kw)


def key(alias="vk-1", team="eng", user="alice", org="acme"):
    return UserAPIKeyAuth(token=HASH, key_alias=alias, team_id=team, user_id=user, org_id=org)


def pre(lg, model="gpt-4o", k=None):
    data = {"model": model, "messages": [{"role": "user", "content": "hi"}], "metadata": {}}
    return asyncio.run(lg.async_pre_call_hook(k or key(), None, data, "acompletion"))


def deny(lg, model="gpt-4o", k=None):
    with pytest.raises(TallyDenied) as e:
        pre(lg, model, k)
    return e.value


def call_kwargs(call_id=None, model="gpt-4o", usage=None, cost=0.0, reservation=None,
                alias="vk-1", team="eng", user="alice", org="acme", cache_hit=None):
    """What LiteLLM 1.108.7 passes to async_log_success_event (the fields the callback
    reads, in the shapes a real proxy produced; see test_e2e.py for the real thing)."""
    call_id = call_id or str(uuid.uuid4())
    u = usage.model_dump() if usage is not None else {}
    slo = {
        "id": "chatcmpl-same-for-every-call", "litellm_call_id": call_id, "model_group": model,
        "response_cost": cost, "cache_hit": cache_hit, "endTime": time.time(),
        "prompt_tokens": u.get("prompt_tokens", 0), "completion_tokens": u.get("completion_tokens", 0),
        "metadata": {"user_api_key_hash": HASH, "user_api_key_alias": alias,
                     "user_api_key_team_id": team, "user_api_key_user_id": user,
                     "user_api_key_org_id": org, "usage_object": u},
    }
    md = {"tally_reservation": reservation} if reservation else {}
    return {"standard_logging_object": slo, "litellm_call_id": call_id, "litellm_params": {"metadata": md}}


def success(lg, kwargs, usage=None):
    resp = types.SimpleNamespace(usage=usage)
    asyncio.run(lg.async_log_success_event(kwargs, resp, None, None))


def failure(lg, kwargs):
    asyncio.run(lg.async_log_failure_event(kwargs, None, None, None))


def usage(prompt=10, completion=20, cached=0, cache_write=0, reasoning=0):
    ptd = {"cached_tokens": cached, "cache_write_tokens": cache_write} if (cached or cache_write) else None
    ctd = {"reasoning_tokens": reasoning} if reasoning else None
    return litellm.Usage(prompt_tokens=prompt, completion_tokens=completion,
                         prompt_tokens_details=ptd, completion_tokens_details=ctd)


# -- pure arithmetic -----------------------------------------------------------------------


def test_token_kinds_are_disjoint():
    u = usage(prompt=1000, completion=300, cached=400, cache_write=100, reasoning=120)
    assert token_kinds(u) == {"input_tokens": 500, "output_tokens": 180, "cache_read_tokens": 400,
                              "cache_creation_tokens": 100, "reasoning_tokens": 120}
    # Anthropic's names, as LiteLLM keeps them on the Usage object.
    a = litellm.Usage(prompt_tokens=1000, completion_tokens=300, cache_read_input_tokens=400,
                      cache_creation_input_tokens=100)
    assert token_kinds(a) == {"input_tokens": 500, "output_tokens": 300, "cache_read_tokens": 400,
                              "cache_creation_tokens": 100}
    assert token_kinds(u.model_dump()) == token_kinds(u)
    assert token_kinds(usage(prompt=10, completion=20)) == {"input_tokens": 10, "output_tokens": 20}
    assert token_kinds(None) == {}
    # Never negative, whatever a provider reports.
    assert token_kinds({"prompt_tokens": 5, "completion_tokens": 1,
                        "prompt_tokens_details": {"cached_tokens": 9},
                        "completion_tokens_details": {"reasoning_tokens": 4}}) == {
        "cache_read_tokens": 9, "reasoning_tokens": 4}


def test_settings_from_env_and_arguments(monkeypatch):
    monkeypatch.setenv("TALLY_URL", "http://10.0.0.1:7070/")
    monkeypatch.setenv("TALLY_FAIL_OPEN", "false")
    monkeypatch.setenv("TALLY_ATTR_ORG", "")
    monkeypatch.setenv("TALLY_ATTR_KEY", "api_key")
    s = Settings.load(timeout_s="0.5", mapping={"team": "project"})
    assert (s.url, s.fail_open, s.timeout_s) == ("http://10.0.0.1:7070", False, 0.5)
    assert s.mapping == {"key": "api_key", "team": "project", "user": "user", "org": "", "model": "model"}
    with pytest.raises(ValueError):
        Settings.load(mapping={"project": "x"})


# -- against a real node ----------------------------------------------------------------------


def test_mapping_default_and_configured(tally):
    # A requests limit of 0 denies every check; the node's denial log shows exactly the
    # attributes each check carried.
    tally.put_limit("nothing", {}, "requests", 0)
    e = deny(logger(tally))
    assert e.status_code == 429
    e = deny(logger(tally, key_field="hash", mapping={"key": "api_key", "org": "", "model": "llm"}),
             model="openai/gpt-4o")
    assert e.status_code == 429
    e = deny(logger(tally), k=UserAPIKeyAuth(token=HASH))  # no alias, team, user or org
    denials = tally.ok("GET", "/v1/denials?limit=3")["denials"]
    assert [d["attributes"] for d in denials] == [
        {"virtual_key": HASH, "model": "gpt-4o"},
        {"api_key": HASH, "team": "eng", "user": "alice", "llm": "openai/gpt-4o"},
        {"virtual_key": "vk-1", "team": "eng", "user": "alice", "org": "acme", "model": "gpt-4o"},
    ]


def test_usage_record_mapping_and_counts(tally):
    for dim, val in [("virtual_key", "vk-1"), ("team", "eng"), ("user", "alice"), ("org", "acme"),
                     ("model", "gpt-4o")]:
        tally.put_limit(f"req-{dim}", {dim: val}, "requests", 100)
    tally.put_limit("cost-eng", {"team": "eng"}, "cost", 100)
    lg = logger(tally)
    # No token usage (e.g. an image call): LiteLLM's response_cost is the cost.
    kw = call_kwargs(cost=0.0125)
    success(lg, kw, usage=None)
    assert lg.flush(10)
    for dim in ("virtual_key", "team", "user", "org", "model"):
        assert tally.used(f"req-{dim}") == 1, dim
    assert tally.used("cost-eng") == 0.0125
    # The same call logged again (LiteLLM retrying its logging, a replica resending)
    # counts once: the id is the call id.
    success(lg, kw, usage=None)
    assert lg.flush(10)
    assert tally.used("req-team") == 1
    assert tally.used("cost-eng") == 0.0125
    # Another call with the same provider response id is another call.
    success(lg, call_kwargs(cost=0.0125), usage=None)
    assert lg.flush(10)
    assert tally.used("req-team") == 2
    assert tally.used("cost-eng") == 0.025
    # A successful call that reports neither tokens nor cost is still a request.
    success(lg, call_kwargs(cost=0.0), usage=None)
    assert lg.flush(10)
    assert tally.used("req-team") == 3
    assert tally.used("cost-eng") == 0.025


def test_status_mapping_budget_and_rate(tally):
    tally.put_limit("eng-budget", {"team": "eng"}, "cost", 1)
    tally.put_limit("alice-rpm", {"user": "alice"}, "requests", 2, period="1m")
    lg = logger(tally)
    pre(lg)
    pre(lg)  # checks count nothing
    success(lg, call_kwargs(cost=0.4))
    success(lg, call_kwargs(cost=0.6))
    assert lg.flush(10)
    assert tally.used("eng-budget") == 1.0
    e = deny(lg)
    # Both limits deny; a spent cost budget wins: 402.
    assert e.status_code == 402
    assert sorted(e.detail["denied_by"]) == ["alice-rpm", "eng-budget"]
    assert "eng-budget (cost: used 1.0 of 1.0" in e.detail["error"]
    # Another team, same user: only the requests limit denies: 429 with Retry-After.
    e = deny(lg, k=key(team="ops"))
    assert e.status_code == 429
    assert e.detail["denied_by"] == ["alice-rpm"]
    assert 1 <= int(e.headers["Retry-After"]) <= 60
    # Another user of another team passes.
    assert pre(lg, k=key(team="ops", user="bob"))["model"] == "gpt-4o"


def test_reservation_settled_or_released(tally):
    tally.put_limit("eng-hard", {"team": "eng"}, "cost", 10, mode="hard")
    lg = logger(tally)
    data = pre(lg)
    res = data["metadata"]["tally_reservation"]
    assert res
    # Success settles it with the usage.
    success(lg, call_kwargs(cost=0.5, reservation=res))
    assert lg.flush(10)
    assert tally.used("eng-hard") == 0.5
    st, _ = tally.http("DELETE", f"/v1/reservations/{res}", token=CLIENT)
    assert st == 404  # settled
    # A failure that used nothing records nothing and releases the reservation.
    data = pre(lg)
    res = data["metadata"]["tally_reservation"]
    failure(lg, call_kwargs(cost=0.0, reservation=res))
    assert lg.flush(10)
    st, _ = tally.http("DELETE", f"/v1/reservations/{res}", token=CLIENT)
    assert st == 404  # released by the callback
    assert tally.used("eng-hard") == 0.5
    # A failure that used some: recorded.
    failure(lg, call_kwargs(cost=0.25))
    assert lg.flush(10)
    assert tally.used("eng-hard") == 0.75


def test_fail_open_and_closed(tally):
    tally.put_limit("none", {}, "requests", 0)
    url = tally.url
    tally.stop()
    opened = TallyLogger(url=url, token=CLIENT, timeout_s=0.5)
    closed = TallyLogger(url=url, token=CLIENT, timeout_s=0.5, fail_open=False)
    data = pre(opened)
    assert "tally_reservation" not in data["metadata"]
    e = deny(closed)
    assert e.status_code == 503
    assert "budget service unavailable" in e.detail["error"]
    tally.start()
    # Up again: the limit of 0 denies both.
    assert deny(opened).status_code == 429
    assert deny(closed).status_code == 429


def test_retry_after_tally_restart_same_id(tally):
    """Records made while the node is down are delivered when it is back, once each,
    even when a reply was lost after the node committed (the same id sent twice)."""
    tally.put_limit("eng-cost", {"team": "eng"}, "cost", 100)
    tally.put_limit("eng-req", {"team": "eng"}, "requests", 100)
    lg = logger(tally)
    first = call_kwargs(cost=0.1)
    success(lg, first)
    assert lg.flush(10)
    tally.kill()  # a crash
    pending = [call_kwargs(cost=0.2), call_kwargs(cost=0.3), first]  # `first` again: a resend
    for kw in pending:
        success(lg, kw)
    time.sleep(1.0)
    assert lg.sender.pending() == 3
    assert lg.sender.delivered == 1
    tally.start()  # same data directory and port
    assert lg.flush(20)
    assert tally.used("eng-cost") == 0.6  # 0.1 + 0.2 + 0.3, `first` once
    assert tally.used("eng-req") == 3
    assert lg.sender.dropped_full == 0 and lg.sender.dropped_refused == 0


def test_spool_survives_a_proxy_restart(tally, tmp_path):
    tally.put_limit("eng-cost", {"team": "eng"}, "cost", 100)
    spool = str(tmp_path / "tally-spool.jsonl")
    tally.kill()
    lg = logger(tally, spool_path=spool)
    success(lg, call_kwargs(cost=0.7))
    success(lg, call_kwargs(cost=0.05))
    lg.sender.stop(timeout=1.0)  # the proxy stops while tally is down
    with open(spool) as f:
        assert len(f.readlines()) == 2
    tally.start()
    s = Sender(Settings.load(url=tally.url, token=CLIENT, spool_path=spool))  # the proxy again
    assert s.flush(20)
    assert tally.used("eng-cost") == 0.75
    wait_for(lambda: not os.path.exists(spool), what="the spool removed once delivered")
    s.stop()


def test_queue_full_drops_and_says_so(tally):
    tally.put_limit("eng-req", {"team": "eng"}, "requests", 100)
    tally.kill()
    lg = logger(tally, queue_max=2)
    for _ in range(3):
        success(lg, call_kwargs(cost=0.01))
    assert lg.sender.dropped_full == 1
    tally.start()
    assert lg.flush(20)
    assert tally.used("eng-req") == 2


# -- token kinds priced by tally (the price table) -------------------------------------------


def d(x):
    return decimal.Decimal(repr(x))


@pytest.mark.new_api
def test_token_kinds_priced_by_tally(tally):
    tally.ok("PUT", "/v1/prices/gpt-4o", {"input": 2.5, "output": 10.0, "cache_read": 1.25})
    tally.put_limit("eng-cost", {"team": "eng"}, "cost", 100)
    tally.put_limit("eng-tokens", {"team": "eng"}, "tokens", 10**9)
    lg = logger(tally)
    u = usage(prompt=1000, completion=300, cached=400, cache_write=100, reasoning=120)
    success(lg, call_kwargs(usage=u, cost=99.0), usage=u)  # LiteLLM's cost is not used
    assert lg.flush(10)
    # input 500 x 2.5 + output 180 x 10 + cache read 400 x 1.25 + cache creation 100 x 2.5
    # (the input price) + reasoning 120 x 10 (the output price), per million tokens.
    exact = (500 * d(2.5) + 180 * d(10.0) + 400 * d(1.25) + 100 * d(2.5) + 120 * d(10.0)) / 10**6
    assert exact == decimal.Decimal("0.005")
    assert tally.used("eng-cost") == 0.005
    assert tally.used("eng-tokens") == 1300
    # Odd counts: rounded up to the micro-dollar.
    u = usage(prompt=7, completion=3)
    success(lg, call_kwargs(usage=u), usage=u)
    assert lg.flush(10)
    extra = (7 * d(2.5) + 3 * d(10.0)) / 10**6  # 0.0000475 -> 0.000048
    assert extra.quantize(decimal.Decimal("0.000001"), rounding=decimal.ROUND_UP) == decimal.Decimal("0.000048")
    assert tally.used("eng-cost") == pytest.approx(0.005048, abs=1e-12)
    assert tally.used("eng-tokens") == 1310


@pytest.mark.new_api
def test_no_price_falls_back_to_litellm_cost(tally):
    tally.put_limit("eng-cost", {"team": "eng"}, "cost", 100)
    tally.put_limit("eng-tokens", {"team": "eng"}, "tokens", 10**9)
    lg = logger(tally)
    u = usage(prompt=100, completion=50)
    success(lg, call_kwargs(model="my-private-model", usage=u, cost=0.0042), usage=u)
    assert lg.flush(10)
    assert tally.used("eng-cost") == 0.0042
    assert tally.used("eng-tokens") == 150
    assert lg.sender.dropped_refused == 0
    # Without the fallback the record is refused and dropped (and logged).
    lg2 = logger(tally, cost_fallback=False)
    success(lg2, call_kwargs(model="my-private-model", usage=u, cost=0.0042), usage=u)
    assert lg2.flush(10)
    assert lg2.sender.dropped_refused == 1
    assert tally.used("eng-cost") == 0.0042


@pytest.mark.new_api
def test_access_rules_are_403(tally):
    tally.ok("PUT", "/v1/entities/virtual_key/vk-off", {"parents": {"team": "eng"}, "active": False})
    tally.ok("PUT", "/v1/entities/virtual_key/vk-4o", {"allow": {"model": ["gpt-4o", "gpt-4o-mini"]}})
    tally.ok("PUT", "/v1/entities/virtual_key/vk-old", {"expires_at": "2020-01-01T00:00:00Z"})
    lg = logger(tally)
    e = deny(lg, k=key(alias="vk-off"))
    assert e.status_code == 403
    assert e.detail["access"] == {"dimension": "virtual_key", "value": "vk-off", "rule": "inactive"}
    assert e.detail["error"] == "tally: virtual_key=vk-off is disabled"
    assert pre(lg, model="gpt-4o-mini", k=key(alias="vk-4o"))["model"] == "gpt-4o-mini"
    e = deny(lg, model="gpt-5", k=key(alias="vk-4o"))
    assert e.status_code == 403
    assert e.detail["access"]["rule"] == "allow"
    assert e.detail["access"]["attribute"] == "model"
    assert e.detail["access"]["given"] == "gpt-5"
    assert e.detail["error"] == "tally: virtual_key=vk-4o does not allow model=gpt-5"
    e = deny(lg, k=key(alias="vk-old"))
    assert e.status_code == 403
    assert e.detail["access"]["rule"] == "expired"
    # An access rule wins over a spent budget.
    tally.put_limit("eng-budget", {"team": "eng"}, "cost", 0)
    assert deny(lg, k=key(alias="vk-off")).status_code == 403
    assert deny(lg).status_code == 402


@pytest.mark.new_api
def test_estimated_tokens_in_the_check(tally):
    tally.ok("PUT", "/v1/prices/gpt-4o", {"input": 2.5, "output": 10.0})
    tally.put_limit("eng-cost", {"team": "eng"}, "cost", 0.001)
    plain = logger(tally)
    estimating = logger(tally, estimate_tokens=True)
    data = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "metadata": {},
            "max_tokens": 1000}
    # Without an estimate the budget (nothing used yet) lets it through.
    asyncio.run(plain.async_pre_call_hook(key(), None, dict(data, metadata={}), "acompletion"))
    # With one, 1000 output tokens at $10/M ($0.01) do not fit in $0.001: 402.
    with pytest.raises(TallyDenied) as e:
        asyncio.run(estimating.async_pre_call_hook(key(), None, dict(data, metadata={}), "acompletion"))
    assert e.value.status_code == 402
    # 50 output tokens ($0.0005, plus a few input tokens) fit.
    asyncio.run(estimating.async_pre_call_hook(key(), None, dict(data, metadata={}, max_tokens=50), "acompletion"))
    # A model without a price: the estimate cannot be priced, so the check goes again
    # without it and passes.
    asyncio.run(estimating.async_pre_call_hook(key(), None, dict(data, model="no-price", metadata={}), "acompletion"))


def test_wrong_token_keeps_records_until_fixed(tally, tmp_path):
    tally.put_limit("eng-req", {"team": "eng"}, "requests", 100)
    spool = str(tmp_path / "spool.jsonl")
    lg = logger(tally, token="not-the-token", spool_path=spool)
    success(lg, call_kwargs(cost=0.01))
    time.sleep(1.5)
    assert lg.sender.pending() == 1 and lg.sender.dropped_refused == 0
    lg.sender.stop(timeout=0.5)
    # Restarted with the right token: the spooled record is delivered.
    s = Sender(Settings.load(url=tally.url, token=CLIENT, spool_path=spool))
    assert s.flush(20)
    assert tally.used("eng-req") == 1
    s.stop()
