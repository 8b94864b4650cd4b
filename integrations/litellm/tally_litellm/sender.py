"""Delivery of usage records to tally: a bounded queue drained by one background thread,
retried with backoff under the same id until tally acknowledges them.

tally applies an id once (within its dedup window, 24 h by default), so a record sent
twice (a reply lost after tally committed it, a retry after a restart) counts once.
"""

import collections
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request

log = logging.getLogger("tally_litellm")

BATCH_MAX = 500
# tally refuses records whose `at` is older than its dedup window (24 h by default);
# give up a little before that.
GIVE_UP_AFTER_S = 23 * 3600


class TransientError(Exception):
    pass


class PermanentError(Exception):
    def __init__(self, status, body):
        super().__init__(f"{status}: {body}")
        self.status = status
        self.body = body


def http_json(settings, method, path, body=None, timeout=None):
    """One request to tally. Returns (status, parsed body). Raises TransientError when
    tally could not answer (connection refused, timeout, 5xx, 408, 429) or refused the
    token (401, 403)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(settings.url + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if settings.token:
        req.add_header("Authorization", f"Bearer {settings.token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout or settings.timeout_s) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = raw.decode(errors="replace")
        # 401/403 too: a wrong token is fixed by a restart with the right one, and the
        # records wait for it (in the spool) rather than being dropped.
        if e.code >= 500 or e.code in (401, 403, 408, 429):
            raise TransientError(f"tally answered {e.code}: {parsed}") from None
        return e.code, parsed
    except (OSError, urllib.error.URLError) as e:
        raise TransientError(f"tally unreachable: {e}") from None


class Item:
    __slots__ = ("record", "fallback_cost", "first_at")

    def __init__(self, record, fallback_cost=None, first_at=None):
        self.record = record
        self.fallback_cost = fallback_cost
        self.first_at = first_at or time.time()

    def to_json(self):
        return {"record": self.record, "fallback_cost": self.fallback_cost, "first_at": self.first_at}

    @classmethod
    def from_json(cls, d):
        return cls(d["record"], d.get("fallback_cost"), d.get("first_at"))


class Sender:
    """Usage records in order, one background thread, batches of up to 500 records."""

    def __init__(self, settings):
        self.settings = settings
        self.queue = collections.deque()
        self.cond = threading.Condition()
        self.stopped = False
        self.in_flight = 0
        self.inflight = []
        self.dropped_full = 0
        self.dropped_refused = 0
        self.delivered = 0
        self.spool_dirty = False
        self.last_spool = 0.0
        if settings.spool_path:
            self._load_spool()
        self.thread = threading.Thread(target=self._run, name="tally-usage-sender", daemon=True)
        self.thread.start()

    # -- queue --------------------------------------------------------------------------

    def submit(self, record, fallback_cost=None):
        """Queue a record; never blocks. False when the queue is full (the record is
        dropped and logged with its content, so it can be replayed by hand)."""
        with self.cond:
            if len(self.queue) >= self.settings.queue_max:
                self.dropped_full += 1
                log.error("tally usage queue full (%d): dropped %s", len(self.queue), json.dumps(record))
                return False
            self.queue.append(Item(record, fallback_cost))
            self.spool_dirty = True
            self.cond.notify()
            return True

    def pending(self):
        with self.cond:
            return len(self.queue) + self.in_flight

    def flush(self, timeout=10.0):
        """Wait until every queued record is delivered (or dropped). True if so."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.pending() == 0:
                return True
            time.sleep(0.02)
        return self.pending() == 0

    def stop(self, timeout=5.0):
        """Try to deliver what is queued for up to `timeout`, then write what is left to
        the spool (when configured) and stop the thread."""
        self.flush(timeout)
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        self.thread.join(timeout=timeout)
        self._write_spool(force=True)

    # -- spool ----------------------------------------------------------------------------

    def _load_spool(self):
        path = self.settings.spool_path
        try:
            with open(path) as f:
                items = [Item.from_json(json.loads(line)) for line in f if line.strip()]
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError) as e:
            log.error("tally spool %s unreadable, ignored: %s", path, e)
            return
        self.queue.extend(items[: self.settings.queue_max])
        if items:
            log.warning("tally: %d usage records from the spool %s will be resent", len(items), path)

    def _write_spool(self, force=False):
        path = self.settings.spool_path
        if not path:
            self.spool_dirty = False
            return
        with self.cond:
            if not (self.spool_dirty or force):
                return
            items = [i.to_json() for i in list(self.inflight) + list(self.queue)]
            self.spool_dirty = False
        try:
            if not items:
                if os.path.exists(path):
                    os.unlink(path)
                return
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                for i in items:
                    f.write(json.dumps(i) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            log.error("tally spool %s not written: %s", path, e)
        self.last_spool = time.time()

    # -- delivery -------------------------------------------------------------------------

    def _run(self):
        delay = 0.0
        while True:
            with self.cond:
                while not self.queue and not self.stopped:
                    if self.spool_dirty:
                        break
                    self.cond.wait(timeout=1.0)
                if self.stopped:
                    return
                batch = [self.queue.popleft() for _ in range(min(BATCH_MAX, len(self.queue)))]
                self.inflight = batch
                self.in_flight = len(batch)
            if time.time() - self.last_spool >= 1.0 or not batch:
                # Keep the spool close to the queue (at most once a second).
                self._write_spool()
            if not batch:
                with self.cond:
                    if not self.queue and not self.stopped:
                        self.cond.wait(timeout=1.0)
                continue
            try:
                self._deliver(batch)
                delay = 0.0
                with self.cond:
                    self.inflight = []
                    self.in_flight = 0
                    self.spool_dirty = True
            except TransientError as e:
                now = time.time()
                keep = [i for i in batch if now - i.first_at < GIVE_UP_AFTER_S]
                for i in batch:
                    if i not in keep:
                        self.dropped_refused += 1
                        log.error("tally: gave up on a record older than 23 h: %s", json.dumps(i.record))
                with self.cond:
                    for item in reversed(keep):
                        self.queue.appendleft(item)
                    self.inflight = []
                    self.in_flight = 0
                delay = min(max(delay * 2, 0.25), self.settings.retry_max_delay_s)
                log.warning("tally: %d usage records pending, retrying in %.2fs: %s", len(self.queue), delay, e)
                with self.cond:
                    if not self.stopped:
                        self.cond.wait(timeout=delay)

    def _deliver(self, batch):
        """Deliver a batch; raises TransientError with nothing lost (the whole batch is
        retried: records already applied are answered `applied: false` the next time)."""
        if len(batch) == 1:
            self._deliver_one(batch[0])
            return
        status, body = http_json(self.settings, "POST", "/v1/usage/batch",
                                 {"records": [i.record for i in batch]}, timeout=max(self.settings.timeout_s, 10))
        if status == 200:
            self.delivered += len(batch)
            return
        # A record the node refuses (most often: no price for its model) refuses the
        # whole batch; send them one by one so each gets its own fallback.
        for item in batch:
            self._deliver_one(item)

    def _deliver_one(self, item):
        status, body = http_json(self.settings, "POST", "/v1/usage", item.record)
        if status == 200:
            self.delivered += 1
            return
        if (status == 400 and "cost" not in item.record and item.fallback_cost is not None
                and self.settings.cost_fallback):
            # tally has no price for this model: record what LiteLLM computed instead.
            log.warning("tally refused to price %s (%s); recording LiteLLM's response_cost %s",
                        item.record.get("id"), _message(body), item.fallback_cost)
            item.record = dict(item.record, cost=item.fallback_cost)
            status, body = http_json(self.settings, "POST", "/v1/usage", item.record)
            if status == 200:
                self.delivered += 1
                return
            kinds = [k for k in item.record if k.endswith("_tokens")]
            if status == 400 and kinds:
                # A node older than token kinds (issue 15) refuses the fields: the same
                # record as cost and a token total.
                rec = {k: v for k, v in item.record.items() if k not in kinds}
                rec["tokens"] = sum(item.record[k] for k in kinds)
                status, body = http_json(self.settings, "POST", "/v1/usage", rec)
                if status == 200:
                    item.record = rec
                    self.delivered += 1
                    return
        self.dropped_refused += 1
        log.error("tally refused a usage record (%s %s), dropped: %s", status, _message(body), json.dumps(item.record))


def _message(body):
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"].get("message")
    return body
