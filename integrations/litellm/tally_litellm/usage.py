"""Turning what LiteLLM reports into tally's attributes and token kinds (pure functions)."""

import hashlib
import re

ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
ATTR_VALUE_MAX = 128


def _get(obj, name, default=None):
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _int(v):
    try:
        n = int(v or 0)
    except (TypeError, ValueError):
        return 0
    return max(n, 0)


def token_kinds(usage):
    """Disjoint token kinds from a LiteLLM usage object (a `litellm.Usage` or its dict).

    LiteLLM reports OpenAI's way whatever the provider: `prompt_tokens` includes cached
    reads (`prompt_tokens_details.cached_tokens`) and cache writes
    (`prompt_tokens_details.cache_write_tokens`/`cache_creation_tokens`, or Anthropic's
    `cache_creation_input_tokens`), and `completion_tokens` includes
    `completion_tokens_details.reasoning_tokens`. tally's kinds are disjoint, so the
    parts are subtracted (never below zero). Returns only the non-zero kinds."""
    if usage is None:
        return {}
    prompt = _int(_get(usage, "prompt_tokens"))
    completion = _int(_get(usage, "completion_tokens"))
    ptd = _get(usage, "prompt_tokens_details")
    ctd = _get(usage, "completion_tokens_details")
    cache_read = _int(_get(ptd, "cached_tokens")) or _int(_get(usage, "cache_read_input_tokens"))
    cache_creation = (
        _int(_get(ptd, "cache_write_tokens"))
        or _int(_get(ptd, "cache_creation_tokens"))
        or _int(_get(usage, "cache_creation_input_tokens"))
    )
    reasoning = _int(_get(ctd, "reasoning_tokens"))
    kinds = {
        "input_tokens": max(prompt - cache_read - cache_creation, 0),
        "output_tokens": max(completion - reasoning, 0),
        "cache_read_tokens": cache_read,
        "cache_creation_tokens": cache_creation,
        "reasoning_tokens": reasoning,
    }
    return {k: v for k, v in kinds.items() if v}


def record_id(*candidates):
    """The first candidate that is a valid tally id, else a stable digest of the first."""
    cands = [str(c) for c in candidates if c]
    for c in cands:
        if ID_RE.match(c):
            return c
    if not cands:
        return None
    return "litellm-" + hashlib.sha256(cands[0].encode()).hexdigest()[:40]


def clean_value(v):
    """An attribute value tally accepts (1-128 bytes, no control characters), or None."""
    if v is None:
        return None
    s = "".join(ch for ch in str(v) if ch >= " " and ch != "\x7f")
    if not s:
        return None
    if len(s.encode()) > ATTR_VALUE_MAX:
        return "sha256:" + hashlib.sha256(s.encode()).hexdigest()[:64]
    return s


def attributes(settings, key_alias=None, key_hash=None, team=None, user=None, org=None, model=None):
    """tally attributes for these LiteLLM values under the settings' mapping; absent
    values (and fields mapped to "") are left out."""
    key = key_hash if settings.key_field == "hash" else (key_alias or key_hash)
    values = {"key": key, "team": team, "user": user, "org": org, "model": model}
    out = {}
    for field, name in settings.mapping.items():
        v = clean_value(values.get(field))
        if name and v is not None:
            out[name] = v
    return out
