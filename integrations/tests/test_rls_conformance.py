"""Conformance of tally's Envoy rate limit service, driven by a real gRPC client built
from Envoy's published stubs (PyPI xds-protos + grpcio), against a real `tally serve`.

Ports the assertions of envoyproxy/ratelimit's integration test `testBasicBaseConfig`
(test/integration/integration_test.go, with its configs basic.yaml and another.yaml):
unknown descriptor -> OK without a limit; a 50/s limit -> 49 left and a reset duration;
25 calls on 20/min -> OK until the 20th, then OVER_LIMIT; two descriptors -> the worst
code, statuses in order; the reset duration ticks down. Then hits_addend 0 and > 1,
response headers, bad calls, and a partitioned fleet of two nodes that agree after heal.
"""

import random
import time

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import wrappers_pb2

from conftest import CLIENT, Tally, UdpRelay, free_port, wait_for

OK = rls_pb2.RateLimitResponse.OK
OVER = rls_pb2.RateLimitResponse.OVER_LIMIT
Unit = rls_pb2.RateLimitResponse.RateLimit
SECOND, MINUTE, HOUR, DAY = Unit.SECOND, Unit.MINUTE, Unit.HOUR, Unit.DAY

BASIC = """
domain: basic
descriptors:
  - key: key1
    rate_limit:
      unit: second
      requests_per_unit: 50
  - key: one_per_minute
    rate_limit:
      unit: minute
      requests_per_unit: 1
"""

ANOTHER = """
domain: another
descriptors:
  - key: key2
    rate_limit:
      unit: minute
      requests_per_unit: 20
  - key: key3
    rate_limit:
      unit: hour
      requests_per_unit: 10
  - key: key4
    rate_limit:
      unit: day
      requests_per_unit: 20
"""


def request(domain, descriptors, hits=1, per_descriptor_hits=None):
    """descriptors: [[(key, value), ...], ...], like ratelimit's common.NewRateLimitRequest."""
    ds = []
    for i, entries in enumerate(descriptors):
        d = ratelimit_pb2.RateLimitDescriptor(
            entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries]
        )
        if per_descriptor_hits and per_descriptor_hits[i] is not None:
            d.hits_addend.CopyFrom(wrappers_pb2.UInt64Value(value=per_descriptor_hits[i]))
        ds.append(d)
    return rls_pb2.RateLimitRequest(domain=domain, descriptors=ds, hits_addend=hits)


def status(code, rpu, unit, remaining):
    return (code, rpu, unit, remaining)


def shape(resp):
    return [
        (s.code, s.current_limit.requests_per_unit, s.current_limit.unit, s.limit_remaining)
        for s in resp.statuses
    ]


class Rls:
    def __init__(self, node):
        self.channel = grpc.insecure_channel(node.rls)
        self.stub = rls_pb2_grpc.RateLimitServiceStub(self.channel)
        self.meta = [("authorization", f"Bearer {CLIENT}")]

    def __call__(self, req, request_id=None):
        meta = list(self.meta)
        if request_id:
            meta.append(("x-request-id", request_id))
        return self.stub.ShouldRateLimit(req, metadata=meta, timeout=10)

    def close(self):
        self.channel.close()


@pytest.fixture
def rls(tally):
    for cfg in (BASIC, ANOTHER):
        st, body, _ = tally.import_ratelimit(cfg)
        assert st == 200, body
    c = Rls(tally)
    yield c
    c.close()


def test_basic_base_config(rls):
    # Unknown domain and descriptor: OK, no limit, nothing remaining.
    r = rls(request("foo", [[("hello", "world")]]))
    assert r.overall_code == OK
    assert len(r.statuses) == 1
    assert r.statuses[0] == rls_pb2.RateLimitResponse.DescriptorStatus(code=OK)

    # 50/s: 49 left, and a reset within the second.
    r = rls(request("basic", [[("key1", "foo")]]))
    assert r.overall_code == OK
    assert shape(r) == [status(OK, 50, SECOND, 49)]
    d = r.statuses[0].duration_until_reset
    assert 0 < d.seconds * 1000 + d.nanos // 1_000_000 <= 1000

    # A random key over a minute limit: OK until the 20th call, then OVER_LIMIT.
    v = str(random.getrandbits(62))
    for i in range(25):
        r = rls(request("another", [[("key2", v)]]))
        code, remaining = (OVER, 0) if i >= 20 else (OK, 20 - (i + 1))
        assert r.overall_code == code, i
        assert shape(r) == [status(code, 20, MINUTE, remaining)], i

    # Two keys in one call: the worst code wins, statuses in order. Over the limit,
    # nothing is counted (ratelimit with STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT), so
    # key2 stays at 10 left.
    v = str(random.getrandbits(62))
    for i in range(15):
        r = rls(request("another", [[("key2", v)], [("key3", v)]]))
        if i >= 10:
            code, rem1, rem2 = OVER, 10, 0
        else:
            code, rem1, rem2 = OK, 20 - (i + 1), 10 - (i + 1)
        assert r.overall_code == code, i
        assert shape(r) == [status(OK, 20, MINUTE, rem1), status(code, 10, HOUR, rem2)], i

    # The reset duration ticks down.
    r1 = rls(request("another", [[("key4", "durTest")]]))
    time.sleep(2)
    r2 = rls(request("another", [[("key4", "durTest")]]))
    assert r2.statuses[0].duration_until_reset.seconds < r1.statuses[0].duration_until_reset.seconds


def test_hits_addend(rls, tally):
    v = str(random.getrandbits(62))
    # Request-level 5 counts 5.
    r = rls(request("another", [[("key2", v)]], hits=5))
    assert shape(r) == [status(OK, 20, MINUTE, 15)]
    # Descriptor-level 0 wins over request-level 7: a check that counts nothing.
    r = rls(request("another", [[("key2", v)]], hits=7, per_descriptor_hits=[0]))
    assert shape(r) == [status(OK, 20, MINUTE, 15)]
    # Descriptor-level 15 reaches the max exactly: OK, 0 left.
    r = rls(request("another", [[("key2", v)]], hits=0, per_descriptor_hits=[15]))
    assert shape(r) == [status(OK, 20, MINUTE, 0)]
    # Per descriptor: 0 on one, 1 on the other; the first is over at hits 1, not at 0.
    w = str(random.getrandbits(62))
    r = rls(request("another", [[("key2", v)], [("key3", w)]], hits=0, per_descriptor_hits=[0, None]))
    assert r.overall_code == OK
    assert shape(r) == [status(OK, 20, MINUTE, 0), status(OK, 10, HOUR, 9)]
    r = rls(request("another", [[("key2", v)]], hits=1))
    assert r.overall_code == OVER


def test_headers_retries_and_bad_calls(rls, tally):
    v = str(random.getrandbits(62))
    r = rls(request("another", [[("key3", v)]]), request_id="req-1")
    headers = {h.key: h.value for h in r.response_headers_to_add}
    assert headers["x-ratelimit-limit"] == "10"
    assert headers["x-ratelimit-remaining"] == "9"
    assert 0 < int(headers["x-ratelimit-reset"]) <= 3600
    # The same call again with the same x-request-id is a retry: counted once.
    r = rls(request("another", [[("key3", v)]]), request_id="req-1")
    assert shape(r) == [status(OK, 10, HOUR, 9)]
    r = rls(request("another", [[("key3", v)]]), request_id="req-2")
    assert shape(r) == [status(OK, 10, HOUR, 8)]
    # Bad calls: INVALID_ARGUMENT, and no token: UNAUTHENTICATED.
    for bad in (request("", [[("k", "v")]]), request("another", [])):
        with pytest.raises(grpc.RpcError) as e:
            rls(bad)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        rls.stub.ShouldRateLimit(request("another", [[("key3", v)]]), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Refused calls are counted; unauthenticated ones are not (they never reach the service).
    assert tally.metric("tally_rls_errors_total") == 2


def test_partitioned_fleet_agrees_after_heal():
    """Two nodes (real processes) gossip through relays on loopback. The fleet imports one
    domain; the relays are cut; both sides take calls for the same new wildcard value
    (each side creates its instance on its own); the relays heal; both nodes then report
    the sum of both sides, exactly, through RLS and through the HTTP API."""
    ga, gb = free_port(), free_port()
    ra, rb = UdpRelay(ga), UdpRelay(gb)
    common = ["--cluster-key", "k" * 32, "--gossip-interval-ms", "100"]
    a = Tally(["--node-id", "a", "--gossip-listen", f"127.0.0.1:{ga}",
               "--gossip-advertise", f"127.0.0.1:{ra.port}", "--seed", f"127.0.0.1:{rb.port}"] + common)
    b = Tally(["--node-id", "b", "--gossip-listen", f"127.0.0.1:{gb}",
               "--gossip-advertise", f"127.0.0.1:{rb.port}", "--seed", f"127.0.0.1:{ra.port}"] + common)
    ca, cb = Rls(a), Rls(b)
    try:
        st, body, _ = a.import_ratelimit("""
domain: fleet
descriptors:
  - key: tenant
    rate_limit: {unit: hour, requests_per_unit: 100}
""")
        assert st == 200, body
        rule = body["rules"][0]["id"]
        wait_for(lambda: b.http("GET", f"/v1/limits/{rule}")[0] == 200, what="rule on b")

        ra.cut = rb.cut = True
        time.sleep(1.0)  # let what was in flight land or drop
        tenant = [[("tenant", "acme")]]
        for i in range(7):
            assert rls_code(ca(request("fleet", tenant))) == OK
        for i in range(5):
            assert rls_code(cb(request("fleet", tenant))) == OK
        # Each side counted only its own calls.
        assert shape(ca(request("fleet", tenant, hits=0, per_descriptor_hits=[0]))) == [status(OK, 100, HOUR, 93)]
        assert shape(cb(request("fleet", tenant, hits=0, per_descriptor_hits=[0]))) == [status(OK, 100, HOUR, 95)]

        ra.cut = rb.cut = False

        def agreed():
            ra_ = shape(ca(request("fleet", tenant, hits=0, per_descriptor_hits=[0])))
            rb_ = shape(cb(request("fleet", tenant, hits=0, per_descriptor_hits=[0])))
            return ra_ == rb_ == [status(OK, 100, HOUR, 88)] and (ra_, rb_)

        wait_for(agreed, timeout=30, what="both nodes to count 12")
        # The same through HTTP: one instance limit, 12 used, 7 from a and 5 from b.
        st, lst, _ = a.http("GET", f"/v1/limits?scope.rls_template={rule}")
        assert st == 200 and len(lst["limits"]) == 1, lst
        inst = lst["limits"][0]
        assert inst["used"] == 12
        assert inst["nodes"] == {"a": 7, "b": 5}
        assert b.used(inst["id"]) == 12
    finally:
        ca.close(), cb.close()
        a.stop(), b.stop()
        ra.close(), rb.close()


def rls_code(r):
    return r.overall_code


def test_sigterm_with_an_open_connection_exits_cleanly():
    """Envoy keeps its HTTP/2 connection to the RLS open; SIGTERM must still stop the node
    promptly and cleanly (exit 0 after committing), calls in flight answered."""
    t = Tally()
    st, body, _ = t.import_ratelimit("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: hour, requests_per_unit: 5}\n")
    assert st == 200, body
    c = Rls(t)
    try:
        assert c(request("d", [[("k", "v")]])).overall_code == OK
        started = time.time()
        t.stop()  # SIGTERM, asserts exit code 0
        assert time.time() - started < 10
    finally:
        c.close()
    # The hit was durable: a restart on the same data still counts it.
    t2 = Tally(data_dir=t.dir)
    c2 = Rls(t2)
    try:
        assert shape(c2(request("d", [[("k", "v")]], hits=0, per_descriptor_hits=[0]))) == [status(OK, 5, HOUR, 4)]
    finally:
        c2.close()
        t2.stop()
