"""The runner kit's queue (runner-kit/hint_queue.py, docs/queue.md).

    .venv/bin/python -m unittest tests/fal/test_kit_queue.py

Most tests call the kit's ASGI callable in process with fake scope/receive/send and inner
apps that hold their answer until the test lets go (no sockets, no sleeps). `RealFalApp`
serves `tests/fal/app.py --kit` on a free loopback port and drives `/queue/...` over HTTP
with httpx (and fal_client's own request handle, which parses the status answers).
"""

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "runner-kit"))
from hint_queue import is_request_id  # noqa: E402
from hint_runner import HintRunner  # noqa: E402

HOST = (b"host", b"runner.test:8080")
JSON = (b"content-type", b"application/json")


class Answer:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)

    def header(self, name):
        return dict(self.headers).get(name)

    def __repr__(self):
        return "Answer(%d, %r)" % (self.status, self.body[:300])


async def call(app, method, path, body=b"", headers=(HOST,), query=b""):
    """One HTTP request through the ASGI callable."""
    start, chunks = {}, []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()  # a client that stays connected

    async def send(message):
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http",
             "method": method, "path": path, "raw_path": path.encode(), "query_string": query,
             "headers": list(headers), "client": ("127.0.0.1", 5555), "server": ("127.0.0.1", 8080)}
    await app(scope, receive, send)
    return Answer(start["status"], [(k.decode(), v) for k, v in start["headers"]], b"".join(chunks))


async def until(cond, what="condition", rounds=10000):
    """Lets the event loop run until `cond()` holds (no timed sleeps)."""
    for _ in range(rounds):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("never happened: " + what)


class GatedApp:
    """An inner ASGI app: `POST /<anything>` echoes the request; a body with `"gate": name`
    waits until `release(name)`; `"status": N` answers N; `"raise": true` raises."""

    def __init__(self):
        self.gates = {}
        self.calls = []  # (path, headers dict) of every call, in order
        self.running = 0
        self.most_running = 0

    def gate(self, name):
        return self.gates.setdefault(name, asyncio.Event())

    def release(self, name):
        self.gate(name).set()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.calls.append((scope["path"], headers))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            try:
                req = json.loads(body) if body else {}
            except ValueError:
                req = {"raw": body.decode("latin-1")}
            if "gate" in req:
                await self.gate(req["gate"]).wait()
            if req.get("raise"):
                raise ValueError("boom")
            status = req.get("status", 200)
            out = {"path": scope["path"], "query": scope["query_string"].decode(), "echo": req}
            if status >= 400:
                out = {"detail": "nope: %s" % req.get("why", "bad")}
            data = json.dumps(out).encode()
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"), (b"x-app", b"1"),
                                    (b"content-length", b"%d" % len(data))]})
            await send({"type": "http.response.body", "body": data})
        finally:
            self.running -= 1


def kit(app, **kw):
    kw.setdefault("hints", lambda: ["m1", "m2"])
    kw.setdefault("capacity", 2)
    return HintRunner(app, **kw)


async def submit(runner, body, endpoint="", headers=(HOST, JSON), query=b""):
    path = "/queue/submit" + ("/" + endpoint if endpoint else "")
    return await call(runner, "POST", path, json.dumps(body).encode(), headers, query)


async def status(runner, rid, logs=None):
    q = b"" if logs is None else b"logs=" + logs.encode()
    return await call(runner, "GET", "/queue/requests/%s/status" % rid, query=q)


class QueueInProcess(unittest.IsolatedAsyncioTestCase):
    async def test_submit_status_transitions_and_result_equal_the_blocking_answer(self):
        app = GatedApp()
        r = kit(app)
        blocking = await call(r, "POST", "/gen", json.dumps({"x": 1}).encode(), (HOST, JSON), b"a=b")

        sub = await submit(r, {"x": 1, "gate": "g"}, endpoint="gen", query=b"a=b")
        self.assertEqual(sub.status, 200, sub)
        s = sub.json()
        rid = s["request_id"]
        self.assertTrue(is_request_id(rid), rid)
        self.assertEqual(rid[:16], r.queue.token)
        base = "http://runner.test:8080/queue/requests/" + rid
        self.assertEqual(
            s,
            {"request_id": rid, "response_url": base, "status_url": base + "/status",
             "cancel_url": base + "/cancel", "status": "IN_QUEUE", "queue_position": 0},
        )
        self.assertEqual(sub.header("x-fal-runner-hints"), b"m1,m2", "queue answers carry the hints header")

        # Right after the submission the job has not started: IN_QUEUE at position 0.
        st = (await status(r, rid)).json()
        self.assertEqual(st, {"status": "IN_QUEUE", "queue_position": 0, "response_url": base, "logs": None})
        early = await call(r, "GET", "/queue/requests/" + rid)
        self.assertEqual((early.status, early.json()), (400, {"detail": "Request is still in progress"}))

        await until(lambda: app.running == 1, "the job starts")
        st = await status(r, rid)
        self.assertEqual(st.json(), {"status": "IN_PROGRESS", "response_url": base, "logs": None})
        self.assertEqual(st.header("x-fal-runner-hints"), b"m1,m2")
        self.assertEqual((await call(r, "GET", "/queue/requests/" + rid)).status, 400)

        app.release("g")
        await until(lambda: r.queue.open == 0, "the job ends")
        st = (await status(r, rid)).json()
        self.assertEqual(st["status"], "COMPLETED", st)
        self.assertEqual(set(st), {"status", "response_url", "logs", "metrics"})
        self.assertGreaterEqual(st["metrics"]["inference_time"], 0)

        res = await call(r, "GET", "/queue/requests/" + rid)
        self.assertEqual(res.status, blocking.status)
        self.assertEqual(res.header("content-type"), blocking.header("content-type"))
        self.assertEqual(res.header("x-app"), b"1", "the app's own headers are kept")
        self.assertEqual(res.header("x-fal-runner-hints"), b"m1,m2")
        want = blocking.json()
        want["echo"]["gate"] = "g"
        self.assertEqual(res.json(), want)
        self.assertEqual(res.json()["path"], "/gen")
        self.assertEqual(res.json()["query"], "a=b")
        # The result may be read again while it is kept.
        self.assertEqual((await call(r, "GET", "/queue/requests/%s/" % rid)).body, res.body)

    async def test_endpoint_paths(self):
        app = GatedApp()
        r = kit(app)
        for path, inner in [("/queue/submit", "/"), ("/queue/submit/", "/"),
                            ("/queue/submit/other", "/other"), ("/queue/submit/a/b", "/a/b")]:
            a = await call(r, "POST", path, b"{}", (HOST, JSON))
            self.assertEqual(a.status, 200, (path, a))
            await until(lambda: r.queue.open == 0)
            self.assertEqual(app.calls[-1][0], inner, path)

    async def test_queue_position_with_max_concurrency_1(self):
        app = GatedApp()
        r = kit(app, max_concurrency=1)
        ids = []
        for i in range(4):
            a = await submit(r, {"gate": "g%d" % i})
            # The first takes the free slot at once; the others wait for it, in order.
            self.assertEqual(a.json()["queue_position"], max(0, i - 1))
            ids.append(a.json()["request_id"])
        await until(lambda: app.running == 1)

        async def positions():
            out = []
            for rid in ids:
                s = (await status(r, rid)).json()
                out.append(s.get("queue_position", s["status"]))
            return out

        self.assertEqual(await positions(), ["IN_PROGRESS", 0, 1, 2])
        self.assertEqual(app.most_running, 1)
        self.assertEqual(r.report()["in_flight"], 4, "waiting and running jobs are in flight")
        app.release("g0")
        await until(lambda: len(app.calls) == 2 and app.running == 1)
        self.assertEqual(await positions(), ["COMPLETED", "IN_PROGRESS", 0, 1])
        self.assertEqual(r.report()["in_flight"], 3)
        # Cancelling a waiting job moves the ones behind it up.
        self.assertEqual((await call(r, "PUT", "/queue/requests/%s/cancel" % ids[2])).status, 200)
        self.assertEqual(await positions(), ["COMPLETED", "IN_PROGRESS", "COMPLETED", 0])
        for g in ("g1", "g3"):
            app.release(g)
        await until(lambda: r.queue.open == 0)
        self.assertEqual(app.most_running, 1, "never more than max_concurrency jobs at once")
        self.assertEqual(r.report()["in_flight"], 0)
        self.assertEqual([c[0] for c in app.calls], ["/", "/", "/"], "the cancelled job never ran")

    async def test_cancel_queued_running_finished_unknown(self):
        app = GatedApp()
        r = kit(app, max_concurrency=1)
        running = (await submit(r, {"gate": "run"})).json()["request_id"]
        queued = (await submit(r, {"gate": "never"})).json()["request_id"]
        await until(lambda: app.running == 1)

        c = await call(r, "PUT", "/queue/requests/%s/cancel" % queued)
        self.assertEqual((c.status, c.json()), (200, {"status": "OK"}))
        self.assertEqual(c.header("x-fal-runner-hints"), b"m1,m2")
        st = (await status(r, queued)).json()
        self.assertEqual((st["status"], st["error_type"]), ("COMPLETED", "Cancelled"), st)
        self.assertEqual(st["error"], "Request was cancelled")
        res = await call(r, "GET", "/queue/requests/" + queued)
        self.assertEqual((res.status, res.json()), (400, {"detail": "Request was cancelled"}))
        again = await call(r, "PUT", "/queue/requests/%s/cancel" % queued)
        self.assertEqual((again.status, again.json()), (400, {"status": "ALREADY_COMPLETED"}))
        self.assertEqual(r.report()["in_flight"], 1, "a cancelled job is no longer in flight")

        c = await call(r, "PUT", "/queue/requests/%s/cancel" % running)
        self.assertEqual((c.status, c.json()), (202, {"status": "CANCELLATION_REQUESTED"}))
        c = await call(r, "PUT", "/queue/requests/%s/cancel" % running)
        self.assertEqual(c.status, 202)
        self.assertEqual((await status(r, running)).json()["status"], "IN_PROGRESS")
        app.release("run")
        await until(lambda: r.queue.open == 0)
        st = (await status(r, running, logs="1")).json()
        self.assertEqual(st["status"], "COMPLETED")
        self.assertNotIn("error", st, "a running job runs to its end and keeps its result")
        self.assertIn("cancellation requested: the job runs to its end", [e["message"] for e in st["logs"]])
        self.assertEqual((await call(r, "GET", "/queue/requests/" + running)).status, 200)
        done = await call(r, "PUT", "/queue/requests/%s/cancel" % running)
        self.assertEqual((done.status, done.json()), (400, {"status": "ALREADY_COMPLETED"}))

        unknown = "%s-%032x" % (r.queue.token, 12345)
        c = await call(r, "PUT", "/queue/requests/%s/cancel" % unknown)
        self.assertEqual((c.status, c.json()), (404, {"detail": "Request not found"}))
        self.assertEqual(len(app.calls), 1, "the cancelled job never reached the app")

    async def test_a_job_cancelled_while_its_task_is_starting_never_runs(self):
        app = GatedApp()
        r = kit(app)
        rid = (await submit(r, {})).json()["request_id"]
        # The job has left the waiting list, its task has not run yet: still cancellable.
        self.assertEqual(len(r.queue.pending), 0)
        c = await call(r, "PUT", "/queue/requests/%s/cancel" % rid)
        self.assertEqual(c.status, 200)
        await until(lambda: r.queue.active == 0)
        self.assertEqual(app.calls, [])
        self.assertEqual(r.queue.open, 0)
        rid = (await submit(r, {})).json()["request_id"]
        await until(lambda: r.queue.open == 0, "the next job runs")
        self.assertEqual(len(app.calls), 1)

    async def test_logs(self):
        app = GatedApp()
        r = kit(app)
        rid = (await submit(r, {})).json()["request_id"]
        await until(lambda: r.queue.open == 0)
        for q in (None, "0", "false"):
            self.assertIsNone((await status(r, rid, logs=q)).json()["logs"], q)
        for q in ("1", "true", "True"):
            logs = (await status(r, rid, logs=q)).json()["logs"]
            self.assertEqual([e["message"] for e in logs], ["accepted", "running", "completed"], q)
            for e in logs:
                self.assertEqual(set(e), {"message", "level", "source", "timestamp"})
                self.assertEqual((e["level"], e["source"]), ("INFO", "runner"))
                self.assertRegex(e["timestamp"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")
        bad = (await submit(r, {"status": 422, "why": "prompt missing"})).json()["request_id"]
        await until(lambda: r.queue.open == 0)
        logs = (await status(r, bad, logs="1")).json()["logs"]
        self.assertEqual(logs[-1]["level"], "ERROR")
        self.assertEqual(logs[-1]["message"], "failed: nope: prompt missing")

    async def test_failed_jobs_complete_with_an_error_and_keep_the_apps_answer(self):
        app = GatedApp()
        r = kit(app)
        rid = (await submit(r, {"status": 422, "why": "x"})).json()["request_id"]
        with self.assertLogs("hint_runner.queue", "ERROR") as logged:
            boom = (await submit(r, {"raise": True})).json()["request_id"]
            await until(lambda: r.queue.open == 0)
        self.assertIn("ValueError: boom", logged.output[0])
        st = (await status(r, rid)).json()
        self.assertEqual((st["status"], st["error"], st["error_type"]), ("COMPLETED", "nope: x", "HTTPError"))
        res = await call(r, "GET", "/queue/requests/" + rid)
        self.assertEqual((res.status, res.json()), (422, {"detail": "nope: x"}))
        st = (await status(r, boom)).json()
        self.assertEqual((st["status"], st["error_type"]), ("COMPLETED", "HTTPError"), st)
        self.assertIn("Internal Server Error", st["error"])
        res = await call(r, "GET", "/queue/requests/" + boom)
        self.assertEqual((res.status, res.body), (500, b"Internal Server Error"))

    async def test_429_when_pending_is_full_and_nothing_is_accepted(self):
        app = GatedApp()
        r = kit(app, max_concurrency=1, max_pending_jobs=2)
        for i in range(3):  # one runs, two wait
            self.assertEqual((await submit(r, {"gate": "g"})).status, 200)
            await until(lambda: app.running == 1)
        known = set(r.queue.jobs)
        full = await submit(r, {"gate": "g"})
        self.assertEqual(full.status, 429, full)
        self.assertEqual(full.header("x-runner-overloaded"), b"queue-full")
        self.assertEqual(full.header("retry-after"), b"1")
        self.assertEqual(full.header("x-fal-runner-hints"), b"m1,m2")
        self.assertEqual(set(r.queue.jobs), known, "nothing accepted")
        self.assertEqual(r.report()["in_flight"], 3)
        app.release("g")
        await until(lambda: r.queue.open == 0)
        self.assertEqual((await submit(r, {})).status, 200, "room again once jobs have run")
        self.assertEqual(r.report()["max_concurrency"], 1)

    async def test_no_pending_room_still_runs_a_job_in_a_free_slot(self):
        app = GatedApp()
        r = kit(app, max_concurrency=1, max_pending_jobs=0)
        self.assertEqual((await submit(r, {"gate": "g"})).status, 200)
        self.assertEqual((await submit(r, {})).status, 429, "the slot is taken, no room to wait")
        app.release("g")
        await until(lambda: r.queue.open == 0)
        self.assertEqual((await submit(r, {})).status, 200)
        await until(lambda: r.queue.open == 0)

    async def test_default_pending_bound(self):
        r = kit(GatedApp(), max_concurrency=3)
        self.assertEqual(r.queue.max_pending_jobs, 4 * 3 + 64)

    async def test_bad_ids_and_paths(self):
        r = kit(GatedApp())
        rid = (await submit(r, {})).json()["request_id"]
        await until(lambda: r.queue.open == 0)
        other = "%016x" % (int(r.queue.token, 16) ^ 1)
        for bad in ["123", rid.upper(), rid[:-1], rid + "0", rid.replace("-", "_"),
                    other + rid[16:], "0" * 16 + rid[16:], "..%2f..%2fhints", ""]:
            for method, suffix in [("GET", ""), ("GET", "/status"), ("PUT", "/cancel")]:
                a = await call(r, method, "/queue/requests/" + bad + suffix)
                self.assertEqual((a.status, a.json()), (404, {"detail": "Request not found"}), (bad, suffix))
        for path in ["/queue", "/queue/", "/queue/requests", "/queue/requests/%s/results" % rid,
                     "/queue/requests/%s/status/x" % rid, "/queue/submitx", "/queue/other"]:
            self.assertEqual((await call(r, "GET", path)).status, 404, path)
        self.assertEqual((await call(r, "GET", "/queue/submit")).status, 405)
        self.assertEqual((await call(r, "POST", "/queue/requests/%s/status" % rid)).status, 405)
        self.assertEqual((await call(r, "GET", "/queue/requests/%s/cancel" % rid)).status, 405)
        self.assertEqual((await call(r, "GET", "/queue/requests/%s/status" % rid)).status, 200)

    async def test_request_id_and_headers_reach_the_app(self):
        app = GatedApp()
        r = kit(app)
        headers = [HOST, JSON, (b"x-fal-runner-hint", b"m1"), (b"authorization", b"Key k"),
                   (b"connection", b"keep-alive"), (b"x-fal-request-id", b"forged"),
                   (b"x-envoy-original-path", b"/me/app/gen"), (b"transfer-encoding", b"chunked")]
        rid = (await submit(r, {"x": 1}, "gen", headers=headers)).json()["request_id"]
        await until(lambda: r.queue.open == 0)
        path, seen = app.calls[-1]
        self.assertEqual(path, "/gen")
        self.assertEqual(seen["x-fal-request-id"], rid)
        self.assertEqual(seen["x-fal-runner-hint"], "m1")
        self.assertEqual(seen["authorization"], "Key k", "end-to-end headers pass as sent")
        self.assertEqual(seen["content-type"], "application/json")
        self.assertEqual(seen["content-length"], str(len(json.dumps({"x": 1}))))
        for gone in ("host", "connection", "transfer-encoding", "x-envoy-original-path"):
            self.assertNotIn(gone, seen)
        # A blocking request gets no request id from the kit.
        await call(r, "POST", "/", b"{}", (HOST, JSON))
        self.assertNotIn("x-fal-request-id", app.calls[-1][1])

    async def test_urls_follow_the_proxy_headers(self):
        r = kit(GatedApp())
        a = (await submit(r, {}, headers=[(b"host", b"127.0.0.1:10444"), (b"x-forwarded-proto", b"https"),
                                          (b"x-envoy-original-path", b"/myuser/myapp/gen?x=1"), JSON])).json()
        self.assertEqual(a["status_url"], "https://127.0.0.1:10444/myuser/myapp/requests/%s/status" % a["request_id"])
        a = (await submit(r, {}, headers=[(b"host", b"h"), (b"x-envoy-original-path", b"/myuser/myapp"), JSON])).json()
        self.assertEqual(a["response_url"], "http://h/myuser/myapp/requests/" + a["request_id"])
        a = (await submit(r, {}, headers=[(b"x-envoy-original-path", b"/one"), JSON])).json()
        self.assertEqual(a["cancel_url"], "http://127.0.0.1:8080/queue/requests/%s/cancel" % a["request_id"],
                         "no Host: the server address; a one-segment original path: /queue")
        await until(lambda: r.queue.open == 0)
        st = (await call(r, "GET", "/queue/requests/%s/status" % a["request_id"],
                         headers=[(b"host", b"other:1"), (b"x-envoy-original-path", b"/o/a/requests/x/status")])).json()
        self.assertEqual(st["response_url"], "http://other:1/o/a/requests/" + a["request_id"])
        known = len(r.queue.jobs)
        for bad in [[(b"host", b"h\xe9")], [(b"host", b"a b")], [(b"host", b"h" * 1025)],
                    [HOST, (b"x-envoy-original-path", b"/o\x01/a")],
                    [HOST, (b"x-envoy-original-path", b"/" + b"o" * 1024 + b"/a")],
                    [HOST, (b"x-forwarded-proto", b"gopher")]]:
            a = await submit(r, {}, headers=bad + [JSON])
            self.assertEqual(a.status, 400, bad)
        self.assertEqual(len(r.queue.jobs), known, "refused submissions queue nothing")

    async def test_bodies_too_large_or_not_json_are_refused(self):
        app = GatedApp()
        r = kit(app)
        big = b'{"p": "' + b"x" * (1 << 20) + b'"}'
        a = await call(r, "POST", "/queue/submit", big, (HOST, JSON))
        self.assertEqual(a.status, 413)
        a = await call(r, "POST", "/queue/submit", big, (HOST, JSON, (b"content-length", b"%d" % len(big))))
        self.assertEqual(a.status, 413)
        a = await call(r, "POST", "/queue/submit", b"{not json", (HOST, JSON))
        self.assertEqual(a.status, 400)
        self.assertEqual(r.queue.jobs, {})
        a = await call(r, "POST", "/queue/submit", b"raw bytes", (HOST, (b"content-type", b"text/plain")))
        self.assertEqual(a.status, 200, "only JSON bodies are checked")

    async def test_blocking_requests_share_the_concurrency_limit(self):
        app = GatedApp()
        r = kit(app, max_concurrency=1)
        blocking = asyncio.ensure_future(call(r, "POST", "/", b'{"gate": "b"}', (HOST, JSON)))
        await until(lambda: app.running == 1)
        self.assertEqual(r.report()["in_flight"], 1)
        rid = (await submit(r, {})).json()["request_id"]
        self.assertEqual(r.report()["in_flight"], 2)
        for _ in range(100):
            await asyncio.sleep(0)
        self.assertEqual((await status(r, rid)).json()["status"], "IN_QUEUE", "waits for the blocking request")
        app.release("b")
        self.assertEqual((await blocking).status, 200)
        await until(lambda: r.queue.open == 0)
        self.assertEqual(app.most_running, 1)
        self.assertEqual(r.report()["in_flight"], 0)

    async def test_hints_report_and_no_queue(self):
        r = kit(GatedApp())
        h = await call(r, "GET", "/hints")
        rep = h.json()
        self.assertRegex(rep["queue_token"], r"^[0-9a-f]{16}$")
        self.assertNotEqual(rep["queue_token"], "0" * 16)
        self.assertEqual(rep["queue_token"], r.queue.token)
        self.assertNotEqual(kit(GatedApp()).queue.token, r.queue.token, "a token per runner")
        self.assertEqual(h.header("x-fal-runner-hints"), b"m1,m2")
        plain = kit(GatedApp(), queue=False)
        self.assertIsNone(plain.queue)
        self.assertNotIn("queue_token", (await call(plain, "GET", "/hints")).json())
        a = await call(plain, "POST", "/queue/submit", b"{}", (HOST, JSON))
        self.assertEqual(a.json()["path"], "/queue/submit", "without the queue the app gets the path")

    async def test_retention_by_ttl_and_count(self):
        app = GatedApp()
        r = kit(app, job_ttl_s=60, max_finished_jobs=3)
        now = [1000.0]
        r.queue.clock = lambda: now[0]
        ids = []
        for _ in range(5):
            ids.append((await submit(r, {})).json()["request_id"])
            await until(lambda: r.queue.open == 0)
            now[0] += 1
        self.assertEqual(len(r.queue.jobs), 3, "at most max_finished_jobs")
        for rid in ids[:2]:
            self.assertEqual((await status(r, rid)).status, 404, "oldest dropped first")
        for rid in ids[2:]:
            self.assertEqual((await status(r, rid)).status, 200)
        now[0] += 57.5  # now 1062.5: ids[2] finished at 1002 (60.5 s ago), ids[3] at 1003
        self.assertEqual((await status(r, ids[2])).status, 404, "past job_ttl_s")
        self.assertEqual((await status(r, ids[3])).status, 200)
        now[0] += 100
        await call(r, "GET", "/hints")  # a poll expires them too
        self.assertEqual(r.queue.jobs, {})
        # Waiting and running jobs never expire.
        rid = (await submit(r, {"gate": "g"})).json()["request_id"]
        now[0] += 10_000
        self.assertEqual((await status(r, rid)).status, 200)
        app.release("g")
        await until(lambda: r.queue.open == 0)


class Shutdown(unittest.TestCase):
    def test_jobs_die_with_the_loop_and_waiting_ones_never_start(self):
        app = GatedApp()
        r = kit(app, max_concurrency=1)

        async def main():
            ids = [(await submit(r, {"gate": "never"})).json()["request_id"] for _ in range(3)]
            await until(lambda: app.running == 1)
            return ids  # asyncio.run cancels the running job's task

        ids = asyncio.run(main())
        q = r.queue
        self.assertEqual(q.jobs[ids[0]].error_type, "RunnerStopped")
        self.assertEqual(len(app.calls), 1, "no job started while the loop stopped")
        self.assertEqual((q.running, len(q.pending), len(q._tasks)), (0, 2, 0))


class BoundedMemory(unittest.TestCase):
    """100,000 jobs through the ASGI callable: the store never holds more than
    `max_finished_jobs + max_pending_jobs + max_concurrency` jobs, and tracemalloc sees the
    same memory after the last job as while the store first filled.

    tracemalloc makes every allocation about 7 times slower, so it traces two windows of
    `TRACED` jobs (each longer than the store holds, so every job kept at its end was
    allocated while traced): one right after the store filled, one after 100,000 jobs."""

    JOBS = 100_000
    KEEP = 2_000  # max_finished_jobs under test (the default is 10,000)
    TRACED = 2_500

    def test_100000_jobs_keep_the_store_bounded(self):
        async def trivial(scope, receive, send):
            await receive()
            await send({"type": "http.response.start", "status": 200, "headers": [JSON]})
            await send({"type": "http.response.body", "body": b'{"ok":true}'})

        r = HintRunner(trivial, hints=lambda: ["m"], capacity=1, max_concurrency=8,
                       max_finished_jobs=self.KEEP)
        q = r.queue
        bound = q.max_finished_jobs + q.max_pending_jobs + q.max_concurrency
        scope = {"type": "http", "method": "POST", "path": "/queue/submit", "query_string": b"",
                 "headers": [HOST, JSON]}
        body = {"type": "http.request", "body": b'{"prompt": "hello"}', "more_body": False}
        answers = {}

        async def receive():
            return body

        async def send(message):
            if message["type"] == "http.response.start":
                answers[message["status"]] = answers.get(message["status"], 0) + 1

        state = {"accepted": 0, "biggest": 0}

        async def run(n):
            goal = state["accepted"] + n
            while state["accepted"] < goal:
                before = answers.get(200, 0)
                await r(scope, receive, send)
                if answers.get(200, 0) > before:
                    state["accepted"] += 1
                else:  # 429: let the jobs run, as a client would retry
                    while len(q.pending) >= q.max_pending_jobs:
                        await asyncio.sleep(0)
                state["biggest"] = max(state["biggest"], len(q.jobs))
            await until(lambda: q.open == 0, rounds=1_000_000)

        def traced(n):
            tracemalloc.start()
            asyncio.run(run(n))
            current, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            return current, peak

        t = time.monotonic()
        asyncio.run(run(self.KEEP))  # the store fills
        first = traced(self.TRACED)
        asyncio.run(run(self.JOBS - self.KEEP - 2 * self.TRACED))
        last = traced(self.TRACED)
        elapsed = time.monotonic() - t
        mib = 2.0**-20
        print("\n%d jobs in %.1f s (%d answered 429 and retried): store at most %d jobs (bound %d), "
              "%d finished kept; tracemalloc after %d jobs: peak %.2f MiB, current %.2f MiB; "
              "after %d jobs: peak %.2f MiB, current %.2f MiB (%.0f bytes a kept job)"
              % (state["accepted"], elapsed, answers.get(429, 0), state["biggest"], bound,
                 len(q.finished), self.KEEP + self.TRACED, first[1] * mib, first[0] * mib,
                 self.JOBS, last[1] * mib, last[0] * mib, last[0] / self.KEEP), file=sys.stderr)
        self.assertEqual(state["accepted"], self.JOBS)
        self.assertEqual(answers[200], self.JOBS)
        self.assertGreater(answers.get(429, 0), 0, "the pending bound was reached")
        self.assertLessEqual(state["biggest"], bound)
        self.assertEqual(len(q.finished), self.KEEP)
        self.assertEqual(len(q.jobs), self.KEEP)
        self.assertEqual(r.report()["in_flight"], 0)
        self.assertLess(last[1], first[1] * 1.25 + 2**20, "memory grows with the jobs kept, not the jobs seen")
        self.assertLess(last[0], self.KEEP * 4096, "a kept trivial job costs under 4 KiB")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RealFalApp(unittest.TestCase):
    """`tests/fal/app.py --kit` (a real fal.App under uvicorn) driven over HTTP."""

    @classmethod
    def setUpClass(cls):
        import httpx

        cls.port = free_port()
        cls.log = tempfile.TemporaryFile()
        cls.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "app.py"), "--kit", "--port", str(cls.port),
             "--load-ms", "200", "--infer-ms", "5", "--max-pending-jobs", "3"],
            stdout=cls.log, stderr=subprocess.STDOUT,
        )
        cls.base = "http://127.0.0.1:%d" % cls.port
        cls.http = httpx.Client(base_url=cls.base, timeout=10)
        deadline = time.monotonic() + 60
        while True:
            if cls.proc.poll() is not None:
                cls.tearDownClass()
                raise AssertionError("app.py exited early:\n" + cls.log_text())
            try:
                if cls.http.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                cls.tearDownClass()
                raise AssertionError("app.py not ready in 60 s:\n" + cls.log_text())
            time.sleep(0.05)  # readiness polling interval

    @classmethod
    def log_text(cls):
        cls.log.seek(0)
        return cls.log.read().decode(errors="replace")[-4000:]

    @classmethod
    def tearDownClass(cls):
        cls.http.close()
        if cls.proc.poll() is None:
            cls.proc.kill()
        cls.proc.wait()
        cls.log.close()

    def wait_done(self, status_url, limit=30):
        deadline = time.monotonic() + limit
        seen = []
        while time.monotonic() < deadline:
            s = self.http.get(status_url).json()
            if not seen or seen[-1] != s["status"]:
                seen.append(s["status"])
            if s["status"] == "COMPLETED":
                return s, seen
            time.sleep(0.01)  # polling interval, as fal_client polls
        raise AssertionError("job not completed in %d s (%s):\n%s" % (limit, seen, self.log_text()))

    def test_submit_poll_result_through_the_real_app(self):
        hdrs = {"x-fal-runner-hint": "qmodel", "x-forwarded-proto": "http",
                "x-envoy-original-path": "/me/myapp"}
        sub = self.http.post("/queue/submit", json={"model": "qmodel", "sleep_ms": 100}, headers=hdrs)
        self.assertEqual(sub.status_code, 200, sub.text)
        self.assertIn("x-fal-runner-hints", sub.headers)
        s = sub.json()
        rid = s["request_id"]
        self.assertEqual(s["status"], "IN_QUEUE")
        self.assertEqual(s["status_url"], "%s/me/myapp/requests/%s/status" % (self.base, rid))
        hints = self.http.get("/hints").json()
        self.assertEqual(rid[:16], hints["queue_token"])
        status_url = "/queue/requests/%s/status" % rid
        st, seen = self.wait_done(status_url)
        self.assertEqual(seen[-1], "COMPLETED")
        self.assertIn(seen[0], ("IN_QUEUE", "IN_PROGRESS"))
        self.assertNotIn("error", st)
        res = self.http.get("/queue/requests/" + rid)
        self.assertEqual(res.status_code, 200, res.text)
        self.assertEqual(res.headers["content-type"], "application/json")
        self.assertEqual(res.headers["x-fal-runner-hints"].split(",")[0], "qmodel")
        job = res.json()
        self.assertEqual(job["saw_request_id"], rid, "x-fal-request-id reached the fal app")
        self.assertEqual(job["saw_hint"], "qmodel")
        blocking = self.http.post("/", json={"model": "qmodel", "sleep_ms": 100}, headers=hdrs).json()
        self.assertEqual(blocking["saw_request_id"], "")
        for k in ("saw_request_id", "cache", "loads"):
            job.pop(k), blocking.pop(k)
        self.assertEqual(job, blocking, "the result is what a blocking request gets")
        logs = self.http.get(status_url, params={"logs": "true"}).json()["logs"]
        self.assertEqual([e["message"] for e in logs], ["accepted", "running", "completed"])

        # The other endpoint, and an invalid body: fal's 422 becomes the job's result.
        other = self.http.post("/queue/submit/other", json={"model": "m"}).json()
        bad = self.http.post("/queue/submit", json={"prompt": "no model"}).json()
        self.assertEqual(self.wait_done(other["status_url"].replace(self.base, ""))[0].get("error"), None)
        self.assertEqual(self.http.get("/queue/requests/" + other["request_id"]).json(),
                         {"runner": "fal", "endpoint": "other"})
        st, _ = self.wait_done("/queue/requests/%s/status" % bad["request_id"])
        self.assertEqual(st["error_type"], "HTTPError")
        res = self.http.get("/queue/requests/" + bad["request_id"])
        self.assertEqual(res.status_code, 422)
        self.assertEqual(res.json(), self.http.post("/", json={"prompt": "no model"}).json())

    def test_fal_clients_own_handle_reads_the_answers(self):
        import fal_client
        from fal_client.client import Completed, InProgress, Queued, SyncRequestHandle

        s = self.http.post("/queue/submit", json={"model": "qh", "sleep_ms": 300}).json()
        later = self.http.post("/queue/submit", json={"model": "qh"}).json()
        h = SyncRequestHandle(request_id=s["request_id"], response_url=s["response_url"],
                              status_url=s["status_url"], cancel_url=s["cancel_url"], client=self.http)
        h2 = SyncRequestHandle(request_id=later["request_id"], response_url=later["response_url"],
                               status_url=later["status_url"], cancel_url=later["cancel_url"], client=self.http)
        self.assertIsInstance(h.status(), (Queued, InProgress))
        st2 = h2.status()
        self.assertIsInstance(st2, (Queued, InProgress, Completed))
        h2.cancel()  # queued: removed (200); running: 202; either way fal_client accepts it
        res = h.get(interval=0.01)
        self.assertEqual(res["model"], "qh")
        done = h.status(with_logs=True)
        self.assertIsInstance(done, Completed)
        self.assertIsNone(done.error)
        self.assertEqual(done.logs[-1]["message"], "completed")
        self.assertIn("inference_time", done.metrics)
        with self.assertRaises(fal_client.client.FalClientHTTPError) as e:
            h.cancel()
        self.assertEqual(e.exception.status_code, 400)
        self.assertIsInstance(list(h2.iter_events(interval=0.01))[-1], Completed)

    def test_429_over_http_when_pending_is_full(self):
        # --max-pending-jobs 3, max_multiplexing 1: one runs, three wait, the fifth is refused.
        got = [self.http.post("/queue/submit", json={"model": "full", "sleep_ms": 300}) for _ in range(6)]
        codes = [g.status_code for g in got]
        self.assertIn(429, codes, codes)
        refused = got[codes.index(429)]
        self.assertEqual(refused.headers["x-runner-overloaded"], "queue-full")
        self.assertEqual(refused.headers["retry-after"], "1")
        self.assertLessEqual(codes.count(200), 5, codes)
        self.assertGreaterEqual(self.http.get("/hints").json()["in_flight"], 1)
        for g in got:
            if g.status_code == 200:
                self.wait_done(g.json()["status_url"].replace(self.base, ""))
        self.assertEqual(self.http.get("/hints").json()["in_flight"], 0)
        unknown = "%s-%032x" % (self.http.get("/hints").json()["queue_token"], 7)
        self.assertEqual(self.http.get("/queue/requests/%s/status" % unknown).status_code, 404)


if __name__ == "__main__":
    unittest.main()
