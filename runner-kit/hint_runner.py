"""hint-router runner kit: make a Python model server (a fal.App, FastAPI, any ASGI app) a full
hint-router runner. Standard library only; copy it next to your app, with hint_queue.py
(fal's queue).

What it adds (docs/fal.md):
- `x-fal-runner-hints: a,b` on every HTTP response (fal's header; what a plain fal.App sends
  from `provide_hints()`), so the router learns a load the moment it answers;
- `GET /hints` with the runner's real `capacity`, `max_concurrency` and `in_flight` (HTTP
  requests it is serving, control paths excluded, and queued jobs not ended), so the router
  never has to guess them;
- `SingleFlight`: concurrent requests for one model share one load (a plain fal.App loads the
  model once per concurrent request).

    from hint_runner import HintRunner, SingleFlight

    loads = SingleFlight()
    models = {}                              # your cache: model -> weights

    def get_model(name):                     # call this in your endpoint
        return loads.get(name, lambda: models.setdefault(name, load_weights(name)))

    asgi = HintRunner(app, hints=lambda: list(models), capacity=2, max_concurrency=1)
    uvicorn.run(asgi, host="127.0.0.1", port=8000)

For a fal.App served by uvicorn: `HintRunner(MyApp(_allow_init=True)._build_app(), ...)`
(`serve_fal` does this). Hints must be 1-256 bytes of visible ASCII without commas (the
router's rule); others are left out of the header and `/hints` instead of breaking either.

fal's queue (docs/queue.md; `queue=True`, the default; the code is in `hint_queue.py`):
`POST /queue/submit[/<endpoint>]` accepts a job at once and runs it as `POST /<endpoint>`
through the app (at most `max_concurrency` at a time, blocking requests included),
`GET /queue/requests/<id>[/status]` and `PUT /queue/requests/<id>/cancel` answer for it, and
`/hints` reports the process's `queue_token` and counts waiting and running jobs in
`in_flight`. The app's own `/queue/...` paths are hidden while it is on.
"""

import json
import threading
from typing import Callable, Dict, List, Optional

try:  # in a package beside this file, or on sys.path
    from .hint_queue import JobQueue
except ImportError:
    from hint_queue import JobQueue

__all__ = ["HintRunner", "JobQueue", "SingleFlight", "serve_fal", "clean_hints"]

HINTS_HEADER = b"x-fal-runner-hints"
# Requests and jobs in progress here as the response starts, this request excluded: lets a
# router correct its busy count between polls (docs/queue.md).
IN_FLIGHT_HEADER = b"x-runner-in-flight"
MAX_HINT_BYTES = 256


def clean_hints(hints) -> List[str]:
    """The hints the router accepts, in order, repeats dropped."""
    out, seen = [], set()
    for h in hints:
        if not isinstance(h, str) or h in seen:
            continue
        if 0 < len(h) <= MAX_HINT_BYTES and all("!" <= c <= "~" and c != "," for c in h):
            seen.add(h)
            out.append(h)
    return out


class SingleFlight:
    """Runs `load` once per key while it is in progress: concurrent callers of `get` for the
    same key wait for the first one's result (or its exception). Thread-safe, for the
    worker threads fal and FastAPI run sync endpoints in; from async code, call it through
    `await asyncio.to_thread(flight.get, key, load)`. Keys being loaded are `loading()`."""

    def __init__(self):
        self._lock = threading.Lock()
        self._calls: Dict[str, "_Call"] = {}

    def get(self, key: str, load: Callable[[], object]):
        with self._lock:
            call = self._calls.get(key)
            leader = call is None
            if leader:
                call = self._calls[key] = _Call()
        if leader:
            try:
                call.result = load()
            except BaseException as e:  # handed to every waiter, then re-raised
                call.error = e
            finally:
                with self._lock:
                    del self._calls[key]
                call.done.set()
        else:
            call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    def loading(self) -> List[str]:
        with self._lock:
            return list(self._calls)


class _Call:
    def __init__(self):
        self.done = threading.Event()
        self.result = None
        self.error: Optional[BaseException] = None


class HintRunner:
    """ASGI middleware: the hints header on every HTTP response, `GET /hints`, in-flight count.

    `hints()` returns the models the runner serves now (resident and loading), most recently
    used first; `loading()` (optional) the ones still loading. `capacity` is how many models it
    keeps, `max_concurrency` how many requests it runs at once (fal's `max_multiplexing`).
    Paths in `control_paths` (`/hints`, `/health`, `/healthz`) do not count as in flight.

    `queue=True` serves fal's queue under `/queue/` (hint_queue.py): `max_pending_jobs` jobs
    may wait (default `4 * max_concurrency + 64`; one more is a 429), finished ones are kept
    `job_ttl_s` seconds and at most `max_finished_jobs` of them. `self.queue` is the
    `JobQueue` (None without the queue).
    """

    def __init__(
        self,
        app,
        *,
        hints: Callable[[], List[str]],
        capacity: int,
        max_concurrency: int = 1,
        loading: Optional[Callable[[], List[str]]] = None,
        hints_path: str = "/hints",
        control_paths=("/health", "/healthz"),
        queue: bool = True,
        job_ttl_s: float = 600,
        max_finished_jobs: int = 10000,
        max_pending_jobs: Optional[int] = None,
    ):
        self.app = app
        self.hints = hints
        self.loading = loading or (lambda: [])
        self.capacity = int(capacity)
        self.max_concurrency = max(1, int(max_concurrency))
        self.hints_path = hints_path
        self.control_paths = set(control_paths) | {hints_path}
        self._lock = threading.Lock()
        self._requests = 0  # blocking requests being served
        self.queue: Optional[JobQueue] = None
        if queue:
            self.queue = JobQueue(
                app,
                max_concurrency=self.max_concurrency,
                job_ttl_s=job_ttl_s,
                max_finished_jobs=max_finished_jobs,
                max_pending_jobs=max_pending_jobs,
            )

    @property
    def in_flight(self) -> int:
        """Blocking requests being served, and queued jobs not ended (waiting or running)."""
        return self._requests + (self.queue.in_flight if self.queue is not None else 0)

    def _current_hints(self) -> List[str]:
        try:
            return clean_hints(self.hints())
        except Exception:  # a failing hints() must not fail the request; say "none"
            return []

    def report(self) -> dict:
        hints = self._current_hints()
        report = {
            "hints": hints,
            "loading": [h for h in clean_hints(self.loading()) if h in hints],
            "capacity": self.capacity,
            "max_concurrency": self.max_concurrency,
            "in_flight": self.in_flight,
        }
        if self.queue is not None:
            report["queue_token"] = self.queue.token
        return report

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path == self.hints_path and scope.get("method") == "GET":
            if self.queue is not None:
                self.queue.prune()  # expire finished jobs even when no queue call comes
            report = self.report()
            body = json.dumps(report).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (HINTS_HEADER, ",".join(report["hints"]).encode()),
                    ],
                }
            )
            return await send({"type": "http.response.body", "body": body})
        queue = self.queue
        queue_call = queue is not None and (path == "/queue" or path.startswith("/queue/"))
        counted = not queue_call and path not in self.control_paths

        async def send_with_hints(message):
            if message["type"] == "http.response.start":
                # Computed when the response starts, after the request's own work: a miss's
                # answer already lists its model. Replaces the app's own headers, if any.
                ours = (HINTS_HEADER, IN_FLIGHT_HEADER)
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in ours]
                headers.append((HINTS_HEADER, ",".join(self._current_hints()).encode()))
                in_flight = max(0, self.in_flight - (1 if counted else 0))
                headers.append((IN_FLIGHT_HEADER, str(in_flight).encode()))
                message = dict(message, headers=headers)
            await send(message)

        if queue_call:
            return await queue.handle(scope, receive, send_with_hints)
        if counted:
            with self._lock:
                self._requests += 1
            if queue is not None:
                queue.enter()  # a running request takes a slot jobs would start in
        try:
            await self.app(scope, receive, send_with_hints)
        finally:
            if counted:
                with self._lock:
                    self._requests -= 1
                if queue is not None:
                    queue.leave()


def serve_fal(
    app_cls,
    *,
    host: str,
    port: int,
    capacity: int,
    max_concurrency: Optional[int] = None,
    queue: bool = True,
    job_ttl_s: float = 600,
    max_finished_jobs: int = 10000,
    max_pending_jobs: Optional[int] = None,
    **kw,
):
    """Serves a fal.App class on `host:port` under uvicorn as a full runner, its hints from
    `provide_hints()`, with fal's queue unless `queue=False`. Uses fal's private
    `_allow_init`/`_build_app` (fal 1.83.0): on fal's own platform the app is served by fal,
    and this kit is for running fal apps yourself."""
    import uvicorn

    instance = app_cls(_allow_init=True)
    asgi = instance._build_app()
    conc = max_concurrency or getattr(app_cls, "max_multiplexing", None) or 1

    def hints():
        try:
            return instance.provide_hints()
        except NotImplementedError:
            return []

    runner = HintRunner(
        asgi,
        hints=hints,
        capacity=capacity,
        max_concurrency=conc,
        queue=queue,
        job_ttl_s=job_ttl_s,
        max_finished_jobs=max_finished_jobs,
        max_pending_jobs=max_pending_jobs,
        **kw,
    )
    uvicorn.run(runner, host=host, port=port, log_level="warning")
