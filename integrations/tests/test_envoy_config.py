"""Envoy itself does not install here, so its config is checked against Envoy's own
schema: integrations/envoy/envoy.yaml must parse as an `envoy.config.bootstrap.v3.Bootstrap`
with every typed_config resolved (the Python code generated from data-plane-api, PyPI
xds-protos), and integrations/envoy/ratelimit.yaml must import into tally and answer the
descriptors that config's rate_limits produce."""

import os

import yaml
from google.protobuf import json_format

# Importing the modules registers the messages the typed_configs name.
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.filters.http.ratelimit.v3 import rate_limit_pb2 as ratelimit_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401

from test_rls_conformance import OK, OVER, MINUTE, SECOND, Rls, request, shape, status

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_envoy_yaml_is_a_valid_bootstrap():
    with open(os.path.join(HERE, "envoy", "envoy.yaml")) as f:
        doc = yaml.safe_load(f)
    b = json_format.ParseDict(doc, bootstrap_pb2.Bootstrap())
    listener = b.static_resources.listeners[0]
    m = hcm.HttpConnectionManager()
    assert listener.filter_chains[0].filters[0].typed_config.Unpack(m)
    rl = ratelimit_pb2.RateLimit()
    assert m.http_filters[0].typed_config.Unpack(rl)
    assert rl.domain == "edge"
    assert rl.rate_limit_service.grpc_service.envoy_grpc.cluster_name == "tally_rls"
    clusters = {c.name for c in b.static_resources.clusters}
    assert clusters == {"api", "tally_rls"}


def test_ratelimit_yaml_imports_and_answers(tally):
    with open(os.path.join(HERE, "envoy", "ratelimit.yaml")) as f:
        st, body, _ = tally.import_ratelimit(f.read())
    assert st == 200, body
    assert [(r["descriptor"], r["action"]) for r in body["rules"]] == [
        ("virtual_key", "created"), ("virtual_key=internal", "created"), ("remote_address", "created"),
    ]
    rls = Rls(tally)
    try:
        # What the route's two rate_limits send for one request.
        r = rls(request("edge", [[("virtual_key", "vk-1")], [("remote_address", "10.0.0.1")]]))
        assert r.overall_code == OK
        assert shape(r) == [status(OK, 100, MINUTE, 99), status(OK, 20, SECOND, 19)]
        r = rls(request("edge", [[("virtual_key", "internal")]]))
        assert r.statuses[0].limit_remaining == 2**32 - 1
        r = rls(request("edge", [[("remote_address", "10.0.0.2")]], hits=21))
        assert r.overall_code == OVER
    finally:
        rls.close()
