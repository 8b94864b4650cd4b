"""Virtual keys without LiteLLM's database: a `custom_auth` function that looks keys up
in a JSON file.

LiteLLM's own virtual keys and teams live in its Postgres database. With

    general_settings:
      custom_auth: tally_litellm.auth.file_keys

and TALLY_KEYS_FILE=/etc/litellm/keys.json holding

    {"keys": {"sk-vk1-...": {"key_alias": "vk-1", "team_id": "eng", "user_id": "alice",
                             "org_id": "acme"},
              "sha256:<hex of the key>": {"key_alias": "vk-2", "team_id": "eng"}}}

each request's key is looked up (by value, or by its SHA-256 hex digest so the file need
not hold secrets) and LiteLLM sees a key with that alias, team, user and org, which the
tally callback maps to attributes. Whether a key is active, when it expires and which
models it may use are tally entity rules (`tally entities put virtual_key/vk-1 ...`),
shared by every replica. The file is re-read when it changes. The proxy's master key
(LITELLM_MASTER_KEY) is still accepted, as the admin.
"""

import hashlib
import json
import os
import threading

from litellm.proxy._types import LitellmUserRoles, ProxyException, UserAPIKeyAuth

_lock = threading.Lock()
_cache = {"path": None, "mtime": None, "keys": {}}


def _load(path):
    st = os.stat(path)
    with _lock:
        if _cache["path"] == path and _cache["mtime"] == st.st_mtime_ns:
            return _cache["keys"]
    with open(path) as f:
        doc = json.load(f)
    keys = doc.get("keys", doc) if isinstance(doc, dict) else {}
    if not isinstance(keys, dict):
        raise ValueError(f"{path}: 'keys' must be an object")
    with _lock:
        _cache.update(path=path, mtime=st.st_mtime_ns, keys=keys)
    return keys


def _deny(message):
    return ProxyException(message=message, type="auth_error", param="api_key", code=401)


def lookup(api_key, path=None):
    """The UserAPIKeyAuth for this key, or None if the file does not list it."""
    path = path or os.environ.get("TALLY_KEYS_FILE")
    if not path:
        raise _deny("tally_litellm.auth: TALLY_KEYS_FILE is not set")
    keys = _load(path)
    digest = hashlib.sha256(api_key.encode()).hexdigest()
    entry = keys.get(api_key) or keys.get("sha256:" + digest)
    if entry is None:
        return None
    fields = {k: entry.get(k) for k in ("key_alias", "team_id", "user_id", "org_id") if entry.get(k)}
    return UserAPIKeyAuth(api_key=api_key, **fields)


async def file_keys(request, api_key):
    """LiteLLM `custom_auth` hook (general_settings: custom_auth: tally_litellm.auth.file_keys)."""
    if api_key and api_key.lower().startswith("bearer "):
        api_key = api_key[7:]
    if not api_key:
        raise _deny("missing API key")
    master = os.environ.get("LITELLM_MASTER_KEY")
    if master and api_key == master:
        return UserAPIKeyAuth(api_key=api_key, user_role=LitellmUserRoles.PROXY_ADMIN)
    found = lookup(api_key)
    if found is None:
        raise _deny("unknown API key")
    return found
