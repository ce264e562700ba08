"""Drives the real fal_client's queue calls for the end-to-end tests (tests/tests/queue.rs).

    FAL_QUEUE_RUN_HOST=127.0.0.1:PORT SSL_CERT_FILE=cert.pem FAL_KEY=any \
        .venv/bin/python tests/fal/queue_client.py APP STEPS_JSON

STEPS_JSON is a list of steps, run one after another; one JSON line is printed per step,
`{"ok": true, ...}` or `{"ok": false, "error": "..."}`, with `"ms"` (the step's wall time).
A step's `"name"` stores its request id for later steps (`"name"` again), or `"id"` gives one.
A step with `"async": true` uses the async client. Steps:

- `submit_result` {model, hint}: the seed example, `submit()` then `result(app, request_id)`;
- `subscribe` {model, hint, with_logs}: `subscribe()` with `on_queue_update`; the update kinds;
- `submit` {model, hint, sleep_ms?, name}: `submit()` only;
- `status` {name | id, with_logs}: one `status()` call;
- `wait` {name | id}: `status()` every 50 ms until COMPLETED; the kinds seen, in order;
- `result` {name | id}, `cancel` {name | id};
- `status_until_error` {name | id, limit_s}: `status()` every 50 ms until it raises; how long.
"""

import asyncio
import json
import sys
import time

import fal_client

IDS = {}


def error_text(e):
    """The exception with its HTTP status, which fal_client's message leaves out."""
    code = getattr(e, "status_code", None)
    return f"{type(e).__name__}" + (f" {code}" if code is not None else "") + f": {e}"


def kind(status):
    return type(status).__name__  # Queued, InProgress, Completed


def describe(status):
    out = {"status": kind(status)}
    if isinstance(status, fal_client.Queued):
        out["position"] = status.position
    if isinstance(status, (fal_client.InProgress, fal_client.Completed)):
        out["logs"] = status.logs
    if isinstance(status, fal_client.Completed):
        out["error"] = status.error
        out["error_type"] = status.error_type
        out["metrics"] = status.metrics
    return out


def request_id(step):
    return step["id"] if "id" in step else IDS[step["name"]]


def args(step):
    a = {"model": step["model"], "prompt": step.get("prompt", "hello")}
    if "sleep_ms" in step:
        a["sleep_ms"] = step["sleep_ms"]
    return a


async def call(app, step):
    c, is_async = step["call"], step.get("async", False)
    if c == "submit_result":
        if is_async:
            handle = await fal_client.submit_async(app, args(step), hint=step.get("hint"))
            result = await fal_client.result_async(app, handle.request_id)
        else:
            handle = fal_client.submit(app, args(step), hint=step.get("hint"))
            result = fal_client.result(app, handle.request_id)
        return {"request_id": handle.request_id, "result": result}
    if c == "subscribe":
        updates = []
        kw = dict(hint=step.get("hint"), with_logs=step.get("with_logs", False), interval=0.05)
        if is_async:
            result = await fal_client.subscribe_async(
                app, args(step), on_queue_update=lambda s: updates.append(describe(s)), **kw
            )
        else:
            result = fal_client.subscribe(app, args(step), on_queue_update=lambda s: updates.append(describe(s)), **kw)
        return {"result": result, "updates": updates}
    if c == "submit":
        if is_async:
            handle = await fal_client.submit_async(app, args(step), hint=step.get("hint"))
        else:
            handle = fal_client.submit(app, args(step), hint=step.get("hint"))
        IDS[step["name"]] = handle.request_id
        return {"request_id": handle.request_id}
    rid = request_id(step)
    if c == "status":
        if is_async:
            s = await fal_client.status_async(app, rid, with_logs=step.get("with_logs", False))
        else:
            s = fal_client.status(app, rid, with_logs=step.get("with_logs", False))
        return describe(s)
    if c == "wait":
        # Polls until the job is in state `until` (Completed unless told): a step that must act
        # on a running job waits for InProgress, since a job stays Queued while its model loads.
        until = step.get("until", "Completed")
        seen, end = [], time.monotonic() + step.get("limit_s", 30)
        while time.monotonic() < end:
            s = fal_client.status(app, rid)
            if not seen or seen[-1] != kind(s):
                seen.append(kind(s))
            if kind(s) == until:
                return {"seen": seen, **describe(s)}
            await asyncio.sleep(0.02)
        raise TimeoutError(f"not {until}; seen {seen}")
    if c == "result":
        if is_async:
            return {"result": await fal_client.result_async(app, rid)}
        return {"result": fal_client.result(app, rid)}
    if c == "cancel":
        if is_async:
            await fal_client.cancel_async(app, rid)
        else:
            fal_client.cancel(app, rid)
        return {}
    if c == "status_until_error":
        start, end = time.monotonic(), time.monotonic() + step.get("limit_s", 30)
        polls = 0
        while time.monotonic() < end:
            polls += 1
            try:
                s = fal_client.status(app, rid)
            except Exception as e:  # the point of the step
                return {"after_ms": (time.monotonic() - start) * 1000, "polls": polls, "raised": error_text(e)}
            await asyncio.sleep(0.05)
        raise TimeoutError(f"status still answers {kind(s)} after {step.get('limit_s', 30)} s")
    raise ValueError(f"unknown step {c}")


async def main():
    app, steps = sys.argv[1], json.loads(sys.argv[2])
    # One event loop for every step: fal_client's async client is bound to the first loop.
    for step in steps:
        t = time.monotonic()
        try:
            out = {"ok": True, **(await call(app, step))}
        except Exception as e:  # reported to the test, which asserts on it
            out = {"ok": False, "error": error_text(e)}
        out["ms"] = (time.monotonic() - t) * 1000
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
