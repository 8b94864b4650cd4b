"""Settings of the plug-in: constructor arguments win over environment variables, which
win over the defaults below."""

import os
from dataclasses import dataclass, field, fields

# LiteLLM field -> tally attribute name. An empty name leaves that field out.
DEFAULT_MAPPING = {
    "key": "virtual_key",
    "team": "team",
    "user": "user",
    "org": "org",
    "model": "model",
}

ENV = {
    "url": "TALLY_URL",
    "token": "TALLY_TOKEN",
    "timeout_s": "TALLY_TIMEOUT_S",
    "fail_open": "TALLY_FAIL_OPEN",
    "key_field": "TALLY_KEY_FIELD",
    "reserve": "TALLY_RESERVE",
    "reservation_ttl_s": "TALLY_RESERVATION_TTL_S",
    "estimate_tokens": "TALLY_ESTIMATE_TOKENS",
    "queue_max": "TALLY_QUEUE_MAX",
    "retry_max_delay_s": "TALLY_RETRY_MAX_DELAY_S",
    "spool_path": "TALLY_SPOOL_PATH",
    "cost_fallback": "TALLY_COST_FALLBACK",
}
# TALLY_ATTR_KEY, TALLY_ATTR_TEAM, TALLY_ATTR_USER, TALLY_ATTR_ORG, TALLY_ATTR_MODEL
# override one entry of the mapping each ("" drops the field).


def _bool(v):
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {v!r}")


@dataclass
class Settings:
    url: str = "http://127.0.0.1:7070"
    token: str | None = None
    # Per request to tally (check, usage, release), seconds.
    timeout_s: float = 2.0
    # When tally cannot answer a check (down, timeout, 5xx): let the call through (True)
    # or refuse it with 503 (False). Usage is queued and retried either way.
    fail_open: bool = True
    # Which value of the LiteLLM key becomes the key attribute: "alias" (the key alias,
    # else the hash), "hash" (always the SHA-256 hash LiteLLM logs).
    key_field: str = "alias"
    mapping: dict = field(default_factory=lambda: dict(DEFAULT_MAPPING))
    # Check with "reserve": true (holds the estimate on hard limits until settled).
    reserve: bool = True
    reservation_ttl_s: int = 120
    # Send estimated input/output tokens with the check (LiteLLM's token counter on the
    # messages, and max_tokens). Off by default: a check with token kinds for a model
    # without a price is refused by tally.
    estimate_tokens: bool = False
    # Usage records waiting for tally (in memory; also in spool_path when set).
    queue_max: int = 10000
    retry_max_delay_s: float = 30.0
    spool_path: str | None = None
    # When tally has no price for the model: record LiteLLM's response_cost instead.
    cost_fallback: bool = True

    @classmethod
    def load(cls, **overrides):
        s = cls()
        for f in fields(cls):
            env = ENV.get(f.name)
            if env and os.environ.get(env) not in (None, ""):
                raw = os.environ[env]
                setattr(s, f.name, _convert(f.name, raw))
        for dim in DEFAULT_MAPPING:
            env = "TALLY_ATTR_" + dim.upper()
            if env in os.environ:
                s.mapping[dim] = os.environ[env]
        for k, v in overrides.items():
            if v is None:
                continue
            if k == "mapping":
                s.mapping.update(v)
            elif k in {f.name for f in fields(cls)}:
                setattr(s, k, _convert(k, v) if isinstance(v, str) else v)
            else:
                raise TypeError(f"unknown setting {k!r}")
        if s.key_field not in ("alias", "hash"):
            raise ValueError(f"key_field must be 'alias' or 'hash', not {s.key_field!r}")
        unknown = set(s.mapping) - set(DEFAULT_MAPPING)
        if unknown:
            raise ValueError(f"unknown mapping fields {sorted(unknown)}; known: {sorted(DEFAULT_MAPPING)}")
        s.url = s.url.rstrip("/")
        return s


def _convert(name, raw):
    if name in ("fail_open", "reserve", "estimate_tokens", "cost_fallback"):
        return _bool(raw)
    if name in ("timeout_s", "retry_max_delay_s"):
        return float(raw)
    if name in ("queue_max", "reservation_ttl_s"):
        return int(raw)
    return raw
