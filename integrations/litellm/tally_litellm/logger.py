"""The LiteLLM callback: a check before each call, a usage record after it."""

import asyncio
import atexit
import datetime
import hashlib
import json
import logging
import threading
import weakref

import httpx
from litellm.integrations.custom_logger import CustomLogger
from litellm.proxy._types import ProxyException

from .sender import Sender
from .settings import Settings
from .usage import attributes, record_id, token_kinds

log = logging.getLogger("tally_litellm")

RESERVATION_KEY = "tally_reservation"
_REFUSED_ESTIMATE = object()


ERROR_TYPES = {402: "budget_exceeded", 403: "permission_denied", 429: "rate_limit_error",
               503: "service_unavailable"}


class TallyDenied(ProxyException):
    """A refused call. A ProxyException rather than fastapi's HTTPException because
    LiteLLM 1.108.7 keeps a ProxyException's headers (Retry-After) and drops an
    HTTPException's. `status_code` and `detail` are HTTPException's names."""

    def __init__(self, status_code, detail, headers=None):
        super().__init__(message=detail["error"], type=ERROR_TYPES.get(status_code, "tally_denied"),
                         param=None, code=status_code, headers=headers,
                         provider_specific_fields=detail)
        self.status_code = status_code
        self.detail = detail


class TallyLogger(CustomLogger):
    """Budgets, rate limits and key rules of a tally node for a LiteLLM proxy.

    Every argument is optional and wins over its environment variable (README.md):
    url, token, timeout_s, fail_open, key_field, mapping, reserve, reservation_ttl_s,
    estimate_tokens, queue_max, retry_max_delay_s, spool_path, cost_fallback."""

    def __init__(self, **settings):
        super().__init__()
        self.settings = Settings.load(**settings)
        self._sender = None
        self._lock = threading.Lock()
        self._clients = weakref.WeakKeyDictionary()  # event loop -> httpx.AsyncClient

    # -- plumbing -------------------------------------------------------------------------

    @property
    def sender(self):
        with self._lock:
            if self._sender is None:
                self._sender = Sender(self.settings)
                atexit.register(self._sender.stop)
            return self._sender

    def _client(self):
        loop = asyncio.get_running_loop()
        c = self._clients.get(loop)
        if c is None or c.is_closed:
            headers = {"Content-Type": "application/json"}
            if self.settings.token:
                headers["Authorization"] = f"Bearer {self.settings.token}"
            c = httpx.AsyncClient(base_url=self.settings.url, headers=headers,
                                  timeout=self.settings.timeout_s)
            self._clients[loop] = c
        return c

    def flush(self, timeout=10.0):
        """Wait until every usage record is delivered; True if the queue is empty."""
        return self.sender.flush(timeout)

    # -- before the call ------------------------------------------------------------------

    def check_attributes(self, user_api_key_dict, data):
        return attributes(
            self.settings,
            key_alias=getattr(user_api_key_dict, "key_alias", None),
            key_hash=_key_hash(user_api_key_dict),
            team=getattr(user_api_key_dict, "team_id", None),
            user=getattr(user_api_key_dict, "user_id", None),
            org=getattr(user_api_key_dict, "org_id", None),
            model=data.get("model"),
        )

    def _estimate(self, data):
        est = {}
        try:
            import litellm

            if data.get("messages"):
                est["input_tokens"] = int(litellm.token_counter(model=data.get("model") or "", messages=data["messages"]))
        except Exception as e:  # an estimate is best effort
            log.debug("tally: no token estimate: %s", e)
        out = data.get("max_completion_tokens") or data.get("max_tokens")
        if isinstance(out, int) and out > 0:
            est["output_tokens"] = out
        return est

    async def async_pre_call_hook(self, user_api_key_dict, cache, data, call_type):
        attrs = self.check_attributes(user_api_key_dict, data)
        body = {"attributes": attrs}
        if self.settings.reserve:
            body["reserve"] = True
            body["ttl_s"] = self.settings.reservation_ttl_s
        if self.settings.estimate_tokens:
            body.update(self._estimate(data))
        reply = await self._check(body)
        if reply is _REFUSED_ESTIMATE:
            # Refused with estimates (e.g. no price for the model): check without them.
            body = {k: v for k, v in body.items() if not k.endswith("_tokens")}
            reply = await self._check(body)
        if reply is None:
            return data
        if not reply.get("allowed", True):
            raise deny_exception(reply)
        res = reply.get("reservation")
        if res and res.get("id"):
            for key in ("metadata", "litellm_metadata"):
                if key == "metadata" or key in data:
                    md = data.get(key)
                    if not isinstance(md, dict):
                        md = {}
                        data[key] = md
                    md[RESERVATION_KEY] = res["id"]
        return data

    async def _check(self, body):
        """The check reply; None when the call may go on without one (fail open, or a
        400 that a retry without estimates may fix); raises 503 when failing closed."""
        try:
            r = await self._client().post("/v1/check", content=json.dumps(body))
        except httpx.HTTPError as e:
            return self._unavailable(f"tally unreachable: {e!r}")
        if r.status_code == 200:
            return r.json()
        if r.status_code == 400 and any(k.endswith("_tokens") for k in body):
            log.warning("tally refused the check's estimate: %s", r.text)
            return _REFUSED_ESTIMATE
        return self._unavailable(f"tally answered {r.status_code}: {r.text[:300]}")

    def _unavailable(self, why):
        if self.settings.fail_open:
            log.warning("%s; letting the call through (fail_open)", why)
            return None
        log.error("%s; refusing the call (fail_open is off)", why)
        raise TallyDenied(503, {"error": f"budget service unavailable: {why}"})

    # -- after the call -------------------------------------------------------------------

    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
        try:
            await self._after(kwargs, response_obj, success=True)
        except Exception:
            log.exception("tally: usage not recorded")

    async def async_log_failure_event(self, kwargs, response_obj, start_time, end_time):
        try:
            await self._after(kwargs, response_obj, success=False)
        except Exception:
            log.exception("tally: usage of a failed call not recorded")

    def usage_record(self, kwargs, response_obj, success=True):
        """(record, fallback cost) for a finished call; (None, None) for a failed call
        that used nothing. A successful call is always recorded (it counts as a request)."""
        slo = kwargs.get("standard_logging_object") or {}
        md = slo.get("metadata") or {}
        usage = getattr(response_obj, "usage", None) if response_obj is not None else None
        if usage is None and isinstance(response_obj, dict):
            usage = response_obj.get("usage")
        if not usage:
            usage = md.get("usage_object") or None
        if not usage and (slo.get("prompt_tokens") or slo.get("completion_tokens")):
            usage = {"prompt_tokens": slo.get("prompt_tokens"), "completion_tokens": slo.get("completion_tokens")}
        kinds = token_kinds(usage)
        cost = slo.get("response_cost")
        if not kinds and not cost and not success:
            return None, None
        # LiteLLM's call id (a uuid4 per proxy call, or the client's x-litellm-call-id),
        # not standard_logging_object["id"]: on success that is the provider's response
        # id, which need not be unique (a mock_response dict repeats it on every call).
        rid = record_id(slo.get("litellm_call_id"), kwargs.get("litellm_call_id"), slo.get("id"))
        if rid is None:
            return None, None
        record = {
            "id": rid,
            "attributes": attributes(
                self.settings,
                key_alias=md.get("user_api_key_alias"),
                key_hash=md.get("user_api_key_hash"),
                team=md.get("user_api_key_team_id"),
                user=md.get("user_api_key_user_id"),
                org=md.get("user_api_key_org_id"),
                model=slo.get("model_group") or kwargs.get("model"),
            ),
        }
        record.update(kinds)
        if slo.get("cache_hit"):
            record["cost"] = 0.0  # answered from LiteLLM's cache: the provider was not paid
        elif not kinds:
            record["cost"] = float(cost or 0)
        end = slo.get("endTime")
        if isinstance(end, (int, float)):
            record["at"] = datetime.datetime.fromtimestamp(end, datetime.timezone.utc).isoformat(
                timespec="milliseconds").replace("+00:00", "Z")
        fallback = float(cost) if isinstance(cost, (int, float)) else None
        return record, fallback

    async def _after(self, kwargs, response_obj, success):
        res = _reservation(kwargs)
        record, fallback = self.usage_record(kwargs, response_obj, success)
        if record is None:
            if res:
                await self.release(res)
            return
        if res:
            record["reservation"] = res
        self.sender.submit(record, fallback)

    async def release(self, reservation):
        try:
            r = await self._client().delete(f"/v1/reservations/{reservation}")
            if r.status_code not in (200, 404):
                log.warning("tally: reservation %s not released: %s %s", reservation, r.status_code, r.text[:200])
        except httpx.HTTPError as e:
            log.warning("tally: reservation %s not released (it expires by itself): %r", reservation, e)


def _key_hash(auth):
    """LiteLLM's hash of the key (`token`, what it logs as user_api_key_hash); never the
    key itself."""
    token = getattr(auth, "token", None)
    if token:
        return token
    raw = getattr(auth, "api_key", None)
    if not raw:
        return None
    if len(raw) == 64 and all(c in "0123456789abcdef" for c in raw):
        return raw
    return hashlib.sha256(raw.encode()).hexdigest()


def _reservation(kwargs):
    lp = kwargs.get("litellm_params") or {}
    for key in ("metadata", "litellm_metadata"):
        md = lp.get(key)
        if isinstance(md, dict) and md.get(RESERVATION_KEY):
            return md[RESERVATION_KEY]
    return None


def deny_status(reply):
    """403 for an access rule, 402 for a spent cost budget, else 429 (a rate limit)."""
    if reply.get("access"):
        return 403
    denied = set(reply.get("denied_by") or [])
    for lim in reply.get("limits") or []:
        if lim.get("id") in denied and lim.get("metric") == "cost":
            return 402
    return 429


def deny_message(reply):
    acc = reply.get("access")
    if acc:
        who = f"{acc.get('dimension')}={acc.get('value')}"
        rule = acc.get("rule")
        if rule == "inactive":
            return f"tally: {who} is disabled"
        if rule == "expired":
            return f"tally: {who} expired at {acc.get('expires_at')}"
        if rule == "allow":
            return f"tally: {who} does not allow {acc.get('attribute')}={acc.get('given')}"
        return f"tally: access rule {rule} of {who}"
    denied = set(reply.get("denied_by") or [])
    parts = []
    for lim in reply.get("limits") or []:
        if lim.get("id") in denied:
            p = f"{lim['id']} ({lim.get('metric')}: used {lim.get('used')} of {lim.get('max')}"
            if lim.get("resets_at"):
                p += f", resets at {lim['resets_at']}"
            if lim.get("reason") == "rights":
                p += ", this node holds too few rights now"
            parts.append(p + ")")
    return "tally: over limit " + "; ".join(parts) if parts else "tally: denied"


def deny_exception(reply):
    status = deny_status(reply)
    detail = {"error": deny_message(reply), "denied_by": reply.get("denied_by") or []}
    if reply.get("access"):
        detail["access"] = reply["access"]
    headers = None
    if status == 429:
        retry = _retry_after(reply)
        if retry is not None:
            headers = {"Retry-After": str(retry)}
    return TallyDenied(status, detail, headers)


def _retry_after(reply):
    denied = set(reply.get("denied_by") or [])
    now = datetime.datetime.now(datetime.timezone.utc)
    best = None
    for lim in reply.get("limits") or []:
        if lim.get("id") not in denied:
            continue
        if lim.get("retry_after_ms") is not None:
            s = max(1, -(-int(lim["retry_after_ms"]) // 1000))
        elif lim.get("resets_at"):
            try:
                t = datetime.datetime.fromisoformat(lim["resets_at"].replace("Z", "+00:00"))
            except ValueError:
                continue
            s = max(1, int((t - now).total_seconds() + 0.999))
        else:
            continue
        best = s if best is None else max(best, s)
    return best
