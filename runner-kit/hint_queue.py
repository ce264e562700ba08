"""hint-router runner kit, part two: fal's queue served by the runner itself (docs/queue.md).
Standard library only; `hint_runner.HintRunner(..., queue=True)` uses it, so copy both files.

The runner owns its jobs: `POST /queue/submit[/<endpoint>]` accepts a job at once and answers
its request id `<token>-<32 hex digits>` (the token: 64 random bits per process, reported in
`/hints` as `queue_token`); the job then runs through the wrapped ASGI app as
`POST /<endpoint>` with the submitted body and headers (plus `x-fal-request-id`), at most
`max_concurrency` at a time, and its answer is kept for `GET /queue/requests/<id>`.
`.../status[?logs=1]` and `PUT .../cancel` behave as fal's queue does.

Bounded: at most `max_pending_jobs` jobs wait (one more is a 429 with `x-runner-overloaded:
queue-full`, nothing accepted), at most `max_concurrency` run, and finished jobs are kept
`job_ttl_s` seconds and at most `max_finished_jobs` of them (oldest dropped first). A job's
body is dropped when it starts; what is kept of a finished one is its answer and a few log
entries. Everything runs on the server's event loop: no threads, no locks.
"""

import asyncio
import collections
import json
import logging
import secrets
import time
from datetime import datetime, timezone
from http import HTTPStatus
from urllib.parse import parse_qs

__all__ = ["JobQueue", "is_request_id", "QUEUE_PATH_PREFIX"]

log = logging.getLogger("hint_runner.queue")

QUEUE_PATH_PREFIX = "/queue"
SUBMIT_PATH = "/queue/submit"
REQUESTS_PATH = "/queue/requests/"
MAX_BODY_BYTES = 1 << 20
MAX_URL_PART_BYTES = 1024
_HEX = frozenset("0123456789abcdef")
# Not passed from a submission to its job: hop-by-hop headers, the host, framing, and the
# queue's own routing header (the job's path is not the one it names).
_DROP_REQUEST = frozenset(
    b"host connection keep-alive proxy-connection proxy-authorization transfer-encoding te "
    b"trailer upgrade content-length expect x-envoy-original-path x-fal-request-id".split()
)
# Not kept of a job's answer: framing and what the server or the kit add when it is served.
_DROP_RESPONSE = frozenset(
    b"connection keep-alive proxy-authenticate transfer-encoding trailer upgrade "
    b"content-length date server x-fal-runner-hints".split()
)
QUEUED, RUNNING, DONE = "IN_QUEUE", "IN_PROGRESS", "COMPLETED"


def is_request_id(s: str, token: str = None) -> bool:
    """`<16 hex digits>-<32 hex digits>`, lowercase, the token not all zeros (and equal to
    `token` when given): the only ids a runner issues (core/src/queue.rs)."""
    if len(s) != 49 or s[16] != "-" or not _HEX.issuperset(s[:16]) or not _HEX.issuperset(s[17:]):
        return False
    return s[:16] != "0" * 16 and (token is None or s[:16] == token)


def _visible_ascii(s: str) -> bool:
    return 0 < len(s) <= MAX_URL_PART_BYTES and s.isascii() and s.isprintable() and " " not in s


class _Job:
    __slots__ = (
        "id", "scope", "body", "state", "logs", "started", "finished", "inference_time",
        "status", "headers", "result", "error", "error_type", "cancelled", "cancel_requested",
    )

    def __init__(self, job_id, scope, body):
        self.id = job_id
        self.scope = scope  # the job's own request, dropped when it starts
        self.body = body
        self.state = QUEUED
        self.logs = [(time.time(), "INFO", "accepted")]  # (unix time, level, message)
        self.started = self.finished = self.inference_time = None
        self.status, self.headers, self.result = 0, [], b""
        self.error = self.error_type = None
        self.cancelled = self.cancel_requested = False


class JobQueue:
    """The queue paths (`/queue/...`) of one runner process; `handle(scope, receive, send)`
    serves them. `enter()`/`leave()` let blocking requests share the `max_concurrency` slots
    (they are never delayed; jobs start only while fewer than `max_concurrency` requests and
    jobs run). `in_flight` is the jobs accepted and not ended. `clock` (monotonic seconds) is
    what the retention reads; tests replace it."""

    def __init__(
        self,
        app,
        *,
        max_concurrency: int = 1,
        job_ttl_s: float = 600,
        max_finished_jobs: int = 10000,
        max_pending_jobs: int = None,
        max_body_bytes: int = MAX_BODY_BYTES,
    ):
        self.app = app
        self.max_concurrency = max(1, int(max_concurrency))
        self.job_ttl_s = float(job_ttl_s)
        self.max_finished_jobs = max(0, int(max_finished_jobs))
        if max_pending_jobs is None:
            max_pending_jobs = 4 * self.max_concurrency + 64
        self.max_pending_jobs = max(0, int(max_pending_jobs))
        self.max_body_bytes = int(max_body_bytes)
        token = 0
        while token == 0:
            token = secrets.randbits(64)
        self.token = "%016x" % token
        self.clock = time.monotonic
        self.jobs = {}  # id -> _Job: every job known (waiting, running, finished)
        self.pending = collections.OrderedDict()  # id -> _Job, in order of acceptance
        self.finished = collections.OrderedDict()  # id -> _Job, in order of finishing
        self.open = 0  # jobs accepted and not ended
        self.running = 0  # jobs whose app call is under way
        self.active = 0  # slots taken: jobs started or starting, and blocking requests
        self._tasks = set()
        self._stopping = False

    @property
    def in_flight(self) -> int:
        return self.open

    def stats(self) -> dict:
        return {"pending": len(self.pending), "running": self.running, "finished": len(self.finished)}

    # --- slots -----------------------------------------------------------------------------

    def enter(self):
        self.active += 1

    def leave(self):
        self.active -= 1
        self._pump()

    def _pump(self):
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a job's coroutine closed after its loop stopped
            return
        if self._stopping:
            return
        while self.active < self.max_concurrency and self.pending:
            _, job = self.pending.popitem(last=False)
            self.active += 1  # IN_QUEUE (position 0) until its task starts the app call
            task = loop.create_task(self._run(job))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def prune(self):
        """Drops finished jobs past `job_ttl_s` or beyond `max_finished_jobs`, oldest first."""
        limit = self.clock() - self.job_ttl_s
        fin = self.finished
        while fin:
            job = next(iter(fin.values()))
            if len(fin) <= self.max_finished_jobs and job.finished > limit:
                break
            fin.popitem(last=False)
            del self.jobs[job.id]

    def _finish(self, job):
        self.open -= 1
        job.state = DONE
        job.finished = self.clock()
        job.scope = job.body = None
        self.finished[job.id] = job
        self.prune()

    # --- running a job ---------------------------------------------------------------------

    async def _run(self, job):
        if job.cancelled:  # cancelled between leaving `pending` and this task's start
            return self.leave()
        job.state = RUNNING
        job.started = self.clock()
        job.logs.append((time.time(), "INFO", "running"))
        self.running += 1
        status, headers, body = 500, [], b""
        try:
            try:
                status, headers, body = await self._call_app(job)
            except asyncio.CancelledError:  # the loop is stopping: the job dies with it
                self._stopping = True  # and the waiting ones are not started
                status, headers, body = 503, [(b"content-type", b"text/plain; charset=utf-8")], b""
                job.error, job.error_type = "The runner stopped", "RunnerStopped"
                raise
            except Exception as e:
                # What a blocking request gets from uvicorn when the app raises.
                log.exception("job %s failed", job.id)
                status = 500
                headers = [(b"content-type", b"text/plain; charset=utf-8")]
                body = b"Internal Server Error"
                job.error, job.error_type = "Internal Server Error (%s)" % type(e).__name__, "HTTPError"
            if status >= 400 and job.error is None:
                job.error, job.error_type = _error_text(status, body), "HTTPError"
        finally:
            job.inference_time = self.clock() - job.started
            job.status, job.headers, job.result = status, headers, body
            if job.error is None:
                job.logs.append((time.time(), "INFO", "completed"))
            else:
                job.logs.append((time.time(), "ERROR", "failed: " + job.error))
            self.running -= 1
            self._finish(job)
            self.leave()

    async def _call_app(self, job):
        scope, body = job.scope, job.body
        sent = False
        done = None  # made only for an app that reads past its body
        start = {}
        chunks = []

        async def receive():
            nonlocal sent, done
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            if done is None:
                done = asyncio.Event()
            if start.get("more", True):
                await done.wait()  # what a server does: a disconnect once the answer is out
            return {"type": "http.disconnect"}

        async def send(message):
            t = message["type"]
            if t == "http.response.start":
                start.update(message, more=True)
            elif t == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    start["more"] = False
                    if done is not None:
                        done.set()

        try:
            await self.app(scope, receive, send)
        finally:
            if done is not None:
                done.set()
        if not start:
            raise RuntimeError("the app sent no response")
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in _DROP_RESPONSE]
        return int(start.get("status", 200)), headers, b"".join(chunks)

    # --- the HTTP side ---------------------------------------------------------------------

    async def handle(self, scope, receive, send):
        path = scope.get("path", "")
        method = scope.get("method", "GET")
        self.prune()
        if path == SUBMIT_PATH or path.startswith(SUBMIT_PATH + "/"):
            if method != "POST":
                return await _json(send, 405, {"detail": "Method Not Allowed"}, [(b"allow", b"POST")])
            return await self._submit(scope, receive, send)
        if not path.startswith(REQUESTS_PATH):
            return await _json(send, 404, {"detail": "Not Found"})
        parts = path[len(REQUESTS_PATH):]
        if parts.endswith("/"):
            parts = parts[:-1]
        parts = parts.split("/")
        op = parts[1] if len(parts) == 2 and parts[1] in ("status", "cancel") else ""
        if len(parts) > 2 or (len(parts) == 2 and not op):
            return await _json(send, 404, {"detail": "Not Found"})
        want = "PUT" if op == "cancel" else "GET"
        if method != want:
            return await _json(send, 405, {"detail": "Method Not Allowed"}, [(b"allow", want.encode())])
        job = self.jobs.get(parts[0]) if is_request_id(parts[0], self.token) else None
        if job is None:
            return await _json(send, 404, {"detail": "Request not found"})
        if op == "cancel":
            return await self._cancel(job, send)
        if op == "status":
            return await self._status(job, scope, send)
        if job.state != DONE:
            return await _json(send, 400, {"detail": "Request is still in progress"})
        if job.cancelled:
            return await _json(send, 400, {"detail": "Request was cancelled"})
        await send({"type": "http.response.start", "status": job.status,
                    "headers": job.headers + [(b"content-length", b"%d" % len(job.result))]})
        await send({"type": "http.response.body", "body": job.result})

    def _full(self) -> bool:
        """One more job would be the `max_pending_jobs + 1`th waiting for a slot."""
        return len(self.pending) >= self.max_pending_jobs and self.active >= self.max_concurrency

    async def _submit(self, scope, receive, send):
        if self._full():
            return await _refuse(send)
        headers = _headers(scope)
        base = _base_url(scope, headers)
        if base.startswith("!"):
            return await _json(send, 400, {"detail": base[1:]})
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            return await _json(send, 413, {"detail": "Request body too large"})
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # gone before it was accepted: nothing ran, nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await _json(send, 413, {"detail": "Request body too large"})
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body and "json" in headers.get(b"content-type", "").lower():
            try:
                json.loads(body)
            except ValueError:
                return await _json(send, 400, {"detail": "The request body is not valid JSON"})
        if self._full():  # filled while the body was read
            return await _refuse(send)

        job_id = "%s-%032x" % (self.token, secrets.randbits(128))
        while job_id in self.jobs:
            job_id = "%s-%032x" % (self.token, secrets.randbits(128))
        job = _Job(job_id, _job_scope(scope, job_id, len(body)), body)
        self.jobs[job_id] = job
        self.open += 1
        position = len(self.pending)
        self.pending[job_id] = job
        self._pump()
        url = "%s/requests/%s" % (base, job_id)
        await _json(send, 200, {
            "request_id": job_id,
            "response_url": url,
            "status_url": url + "/status",
            "cancel_url": url + "/cancel",
            "status": QUEUED,
            "queue_position": position,
        })

    async def _status(self, job, scope, send):
        base = _base_url(scope, _headers(scope))
        if base.startswith("!"):
            return await _json(send, 400, {"detail": base[1:]})
        q = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        with_logs = q.get("logs", [""])[-1].lower() in ("1", "true")
        out = {"status": job.state}
        if job.state == QUEUED:
            out["queue_position"] = _index(self.pending, job.id)
        out["response_url"] = "%s/requests/%s" % (base, job.id)
        out["logs"] = [_log_entry(e) for e in job.logs] if with_logs else None
        if job.state == DONE:
            out["metrics"] = {} if job.inference_time is None else {"inference_time": job.inference_time}
            if job.error is not None:
                out["error"], out["error_type"] = job.error, job.error_type
        await _json(send, 200, out)

    async def _cancel(self, job, send):
        if job.state == DONE:
            return await _json(send, 400, {"status": "ALREADY_COMPLETED"})
        if job.state == RUNNING:
            if not job.cancel_requested:
                job.cancel_requested = True
                job.logs.append((time.time(), "WARNING", "cancellation requested: the job runs to its end"))
            return await _json(send, 202, {"status": "CANCELLATION_REQUESTED"})
        self.pending.pop(job.id, None)  # absent when its task is about to start
        job.cancelled = True
        job.error, job.error_type = "Request was cancelled", "Cancelled"
        job.logs.append((time.time(), "WARNING", "cancelled"))
        self._finish(job)
        await _json(send, 200, {"status": "OK"})


def _index(od, key) -> int:
    for i, k in enumerate(od):
        if k == key:
            return i
    return 0


def _log_entry(e) -> dict:
    t, level, message = e
    stamp = datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")
    return {"message": message, "level": level, "source": "runner", "timestamp": stamp}


def _error_text(status: int, body: bytes) -> str:
    """A short text for a failed job: the answer's `detail` when it is a string, else the
    status's reason phrase."""
    try:
        detail = json.loads(body).get("detail")
        if isinstance(detail, str) and detail:
            return detail[:200]
    except (ValueError, AttributeError, UnicodeDecodeError):
        pass
    try:
        return "%d %s" % (status, HTTPStatus(status).phrase)
    except ValueError:
        return "HTTP %d" % status


_READ = frozenset((b"host", b"content-length", b"content-type", b"x-forwarded-proto", b"x-envoy-original-path"))


def _headers(scope) -> dict:
    """The request headers the queue reads, lowercase name -> first value (latin-1)."""
    out = {}
    for k, v in scope.get("headers", ()):
        k = k.lower()
        if k in _READ and k not in out:
            out[k] = v.decode("latin-1")
    return out


def _base_url(scope, headers) -> str:
    """`{scheme}://{host}{prefix}`, or `!why` for a request whose URL cannot be written."""
    proto = headers.get(b"x-forwarded-proto", "http").split(",")[0].strip().lower()
    if proto not in ("http", "https"):
        return "!Unsupported x-forwarded-proto"
    host = headers.get(b"host")
    if host is None and scope.get("server"):
        host = "%s:%s" % tuple(scope["server"][:2])
    if host is None or not _visible_ascii(host):
        return "!Missing or invalid Host"
    prefix = QUEUE_PATH_PREFIX
    original = headers.get(b"x-envoy-original-path")
    if original is not None:
        segments = original.split("?", 1)[0].split("/")
        if len(segments) >= 3 and segments[0] == "" and segments[1] and segments[2]:
            prefix = "/%s/%s" % (segments[1], segments[2])
            if not _visible_ascii(prefix):
                return "!Invalid x-envoy-original-path"
    return "%s://%s%s" % (proto, host, prefix)


def _job_scope(scope, job_id: str, body_len: int) -> dict:
    """The job's request: `POST /<endpoint>` with the submission's query string and headers."""
    path = scope.get("path", "")[len(SUBMIT_PATH):] or "/"
    raw = scope.get("raw_path")
    if isinstance(raw, bytes) and raw.startswith(SUBMIT_PATH.encode()):
        raw = raw[len(SUBMIT_PATH):] or b"/"
    else:
        raw = path.encode("utf-8")
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in _DROP_REQUEST]
    headers.append((b"content-length", b"%d" % body_len))
    headers.append((b"x-fal-request-id", job_id.encode()))
    job = dict(scope, method="POST", path=path, raw_path=raw, headers=headers)
    if isinstance(scope.get("state"), dict):
        job["state"] = dict(scope["state"])
    return job


async def _json(send, status: int, obj, extra=()):
    body = json.dumps(obj).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _refuse(send):
    await _json(send, 429, {"detail": "Too many queued requests"},
                [(b"retry-after", b"1"), (b"x-runner-overloaded", b"queue-full")])
